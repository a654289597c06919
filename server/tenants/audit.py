"""The audit log: one JSON line per change (upload, delete, rollback, key or tenant change) on the logger
`prefixserve.audit`, and in the file --audit-log when set."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger("prefixserve.audit")
logger.setLevel(logging.INFO)  # audited changes are logged whatever the server's level


def audit(event: str, *, tenant: str, client: str | None, **fields: Any) -> None:
    """Log one audited change: what, who (the acting tenant), when (UTC), from where, and its details."""
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
              "tenant": tenant, "client": client, **{k: v for k, v in fields.items() if v is not None}}
    logger.info(json.dumps(record, separators=(",", ":")))


def add_audit_file(path: str) -> logging.Handler:
    """Also append the audit lines (the JSON alone) to `path`; returns the handler so it can be removed."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return handler
