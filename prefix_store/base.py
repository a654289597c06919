"""The store interface: bytes and manifests only, no device code, no engine imports."""
from __future__ import annotations

import re
from typing import Protocol

from prefix_store.artifact import Manifest

_TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class StoreError(RuntimeError):
    """The store cannot do what was asked (I/O failure, unreachable backend, read-only, full)."""


class PrefixNotFound(KeyError):
    """No prefix under that name."""

    def __str__(self) -> str:
        return f"no prefix named {self.args[0]!r}"


class InvalidTaskName(ValueError):
    """A task name outside the allowed alphabet or length."""


def validate_task_name(name: str) -> str:
    """Return `name` if it is 1-128 of letters, digits, '-', '_', '.' (not starting with '.' or '-'); else raise."""
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        shown = name if isinstance(name, str) and len(name) <= 140 else f"{str(name)[:140]}..."
        raise InvalidTaskName(f"invalid task name {shown!r}: use 1-128 letters, digits, '-', '_' or '.', "
                              "starting with a letter, digit or '_'")
    return name


class PrefixStore(Protocol):
    """Where prefix artifacts live (disk or Redis).

    Contract: `put` is atomic (a reader sees the old artifact or the new one, never a manifest without its
    tensors or a mix of two versions); names are validated with `validate_task_name`; `get` returns the manifest
    and the exact safetensors bytes that were put; every method raises PrefixNotFound for an unknown name and
    StoreError when the backend fails. Implementations never import torch device code or the engine.
    """

    url: str

    async def put(self, name: str, manifest: Manifest, tensors: bytes) -> Manifest:
        """Store (or atomically replace) `name`; return the stored manifest."""
        ...

    async def get(self, name: str) -> tuple[Manifest, bytes]:
        """Return the manifest and the safetensors bytes of `name`."""
        ...

    async def get_manifest(self, name: str) -> Manifest:
        """Return the manifest of `name` without reading its tensors."""
        ...

    async def list(self) -> dict[str, Manifest]:
        """All names with their manifests."""
        ...

    async def delete(self, name: str) -> None:
        """Remove `name`."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


def open_store(url: str) -> PrefixStore:
    """Open a store from a URL or path: a directory path or file:// URL is a disk store."""
    from prefix_store.disk import DiskStore

    if url.startswith("file://"):
        return DiskStore(url[len("file://"):])
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r}: give a directory path (Redis support: redis://)")
    return DiskStore(url)
