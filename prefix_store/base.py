"""The store interface: bytes and manifests only, no device code, no engine imports."""
from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, NamedTuple, Protocol
from urllib.parse import parse_qsl, urlsplit

from prefix_store.artifact import Manifest

TENANT_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"  # a tenant's name (server/tenants)
NAMESPACE_SEP = "~"  # the stored name TENANT~TASK is TENANT's private task (docs/tenants.md); TASK alone is shared
TASK_NAME = rf"(?:{TENANT_NAME}{NAMESPACE_SEP})?[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"  # checked whole (fullmatch)
VERSION = r"[0-9a-f]{7,64}"  # a version reference: the sha256 or a unique prefix of it
_TASK_NAME = re.compile(TASK_NAME)
_VERSION = re.compile(VERSION)
DEFAULT_KEEP_VERSIONS = 5


class StoreError(RuntimeError):
    """The store cannot do what was asked (I/O failure, unreachable backend, read-only, full)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached now (down, restarting, timed out); retrying later may work."""


class PrefixNotFound(KeyError):
    """No prefix under that name."""

    def __str__(self) -> str:
        return f"no prefix named {self.args[0]!r}"


class VersionNotFound(PrefixNotFound):
    """The name exists (or existed) but has no such version."""

    def __init__(self, name: str, version: str):
        super().__init__(name, version)
        self.name, self.version = name, version

    def __str__(self) -> str:
        return f"prefix {self.name!r} has no version {self.version!r}"


class VersionConflict(Exception):
    """Optimistic concurrency failed: the name's current version is not the expected one (HTTP 412)."""

    def __init__(self, name: str, expected: str, found: str | None):
        super().__init__(f"prefix {name!r} is at version {found or 'none (absent)'}, not {expected}")
        self.name, self.expected, self.found = name, expected, found


class InvalidTaskName(ValueError):
    """A task name outside the allowed alphabet or length."""


class VersionInfo(NamedTuple):
    """One stored version of a name: its id (sha256), its manifest, when it was stored (unix seconds)."""

    version: str
    manifest: Manifest
    created: float


class StoreEvent(NamedTuple):
    """A change seen by `watch`: `name` now points to `version` (None: the name was deleted)."""

    name: str
    version: str | None


RESYNC = StoreEvent("*", None)  # after a (re)connection: events may have been missed, reconcile with snapshot()
EventCallback = Callable[[StoreEvent], "Awaitable[None] | None"]
ANY_VERSION = "*"  # expected_version that only requires the name to exist (If-Match: *)


def validate_task_name(name: str) -> str:
    """Return `name` if it is 1-128 of letters, digits, '-', '_', '.' (not starting with '.' or '-'), optionally
    after `TENANT~` (a tenant's namespace); else raise."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 140 else f"{str(name)[:140]}..."
        raise InvalidTaskName(f"invalid task name {shown!r}: use 1-128 letters, digits, '-', '_' or '.', "
                              "starting with a letter, digit or '_'")
    return name


def validate_version(version: str) -> str:
    """Return a version reference (7-64 lowercase hex digits of a sha256) or raise InvalidTaskName."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise InvalidTaskName(f"invalid version {str(version)[:80]!r}: use 7-64 hex digits of the sha256")
    return version


def split_task_ref(ref: str) -> tuple[str, str | None]:
    """Split `NAME@VERSION` (version: full sha256 or a unique prefix of >= 7 hex digits) into (name, version)."""
    name, sep, version = ref.partition("@") if isinstance(ref, str) else (ref, "", "")
    return validate_task_name(name), (validate_version(version) if sep else None)


def check_expected(name: str, expected: str | None, current: str | None) -> None:
    """Raise VersionConflict unless `current` satisfies `expected` (None: no check; '*': must exist)."""
    if expected is None or (expected == ANY_VERSION and current is not None) or expected == current:
        return
    raise VersionConflict(name, expected, current)


class PrefixStore(Protocol):
    """Where prefix artifacts live (disk or Redis), as immutable versions behind movable names.

    Contract: every `put` stores an immutable version (the manifest's sha256, i.e. the tensors' content hash) and
    moves the name (an alias) to it atomically: a reader sees the old version or the new one, never a manifest
    without its tensors or a mix of two versions. `version=` pins a version (full sha256 or a unique prefix);
    `expected_version=` makes a write conditional (VersionConflict otherwise; '*' = the name must exist). Only
    the newest `keep_versions` versions of a name are kept, and never is the current one removed. Names are
    validated with `validate_task_name`; unknown names raise PrefixNotFound (VersionNotFound for a version),
    backend failures StoreError (StoreUnavailable when unreachable), always within bounded time. Implementations
    never import torch device code or the engine.
    """

    url: str

    async def put(self, name: str, manifest: Manifest, tensors: bytes, *, expected_version: str | None = None,
                  created: float | None = None) -> Manifest:
        """Store a version and point `name` at it; return the stored manifest (`created`: for migration)."""
        ...

    async def get(self, name: str, version: str | None = None) -> tuple[Manifest, bytes]:
        """The manifest and safetensors bytes of `name` (its current version, or `version`)."""
        ...

    async def get_manifest(self, name: str, version: str | None = None) -> Manifest:
        """The manifest of `name` (current or `version`) without reading its tensors."""
        ...

    async def list(self) -> dict[str, Manifest]:
        """All names with the manifests of their current versions."""
        ...

    async def list_versions(self, name: str) -> list[VersionInfo]:
        """The kept versions of `name`, newest first."""
        ...

    async def set_version(self, name: str, version: str, *, expected_version: str | None = None) -> Manifest:
        """Point `name` at one of its kept versions (rollback); return that version's manifest."""
        ...

    async def delete(self, name: str, *, expected_version: str | None = None) -> None:
        """Remove `name` and all its versions (blobs other names share are kept)."""
        ...

    async def snapshot(self) -> dict[str, str]:
        """Every name with its current version, for reconciling a replica's caches."""
        ...

    async def watch(self, callback: EventCallback) -> None:
        """Call `callback(StoreEvent)` for every change until cancelled, reconnecting by itself.

        After every (re)connection it first delivers an event per name that changed since the last one it saw,
        then RESYNC (name "*"): anything cached from the store meanwhile must be checked against `snapshot()`.
        """
        ...

    async def health(self) -> dict[str, Any]:
        """{"ok": bool, "detail": str} for /ready; never raises, returns within a few seconds."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


def store_options(url: str) -> tuple[str, dict[str, str]]:
    """Split `?keep_versions=..&prefix=..` store options off a URL; return (url without them, options)."""
    parts = urlsplit(url)
    ours = {"keep_versions", "prefix", "timeout", "poll"}
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = {k: v for k, v in query if k in ours}
    rest = "&".join(f"{k}={v}" for k, v in query if k not in ours)
    return parts._replace(query=rest).geturl(), options
