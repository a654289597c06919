"""API keys: `psk_<id>_<secret>`. The id (12 hex digits) finds the record; only the key's sha256 is stored and it is
compared in constant time. The secret is 32 random bytes from `secrets`, so a plain sha256 cannot be brute-forced
(a slow hash would only slow every request down)."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from prefix_store.keys import KeyRecord

KEY_RE = re.compile(r"^psk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


def key_hash(key: str) -> str:
    """The stored form of a key: sha256 hex of the whole key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(tenant: str, label: str = "") -> tuple[str, KeyRecord]:
    """A fresh key (shown once, never stored) and the record to store."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    key = f"psk_{key_id}_{secret}"
    return key, KeyRecord(key_id, tenant, key_hash(key), time.time(), label)


def key_id(key: str) -> str | None:
    """The id part of a well-formed key, or None."""
    m = KEY_RE.match(key)
    return m.group(1) if m else None


def matches(key: str, record: KeyRecord) -> bool:
    """Whether `key` is the key `record` was made from (constant-time comparison of the hashes)."""
    return hmac.compare_digest(key_hash(key).encode(), record.hash.encode())
