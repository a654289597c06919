"""The embedded default store: a directory of content-addressed tensor blobs plus one manifest file per task.

    ROOT/blobs/<sha256>.safetensors   immutable tensors, named by their content hash (the version)
    ROOT/tasks/<name>.json            the task's current manifest; its sha256 names the blob

A put writes the blob (temp file, fsync, rename), then swaps the manifest file with one atomic rename, so a crash
at any point leaves either the old task or the new one visible, never half an artifact. Blobs no task points to
are removed on delete and replace (a running request keeps its copy on the device, so it is unaffected).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import tempfile
from pathlib import Path

from prefix_store.artifact import Manifest
from prefix_store.base import PrefixNotFound, StoreError, validate_task_name

logger = logging.getLogger(__name__)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DiskStore:
    """A `PrefixStore` on a local directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"
        self._blobs, self._tasks = self.root / "blobs", self.root / "tasks"
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._tasks.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store directory {self.root}: {e.strerror}") from None
        self._lock = asyncio.Lock()

    def _task_file(self, name: str) -> Path:
        return self._tasks / f"{validate_task_name(name)}.json"

    def _blob(self, version: str) -> Path:
        return self._blobs / f"{version}.safetensors"

    # -- sync implementations (run in a worker thread) --
    def _put(self, name: str, manifest: Manifest, tensors: bytes) -> Manifest:
        path = self._task_file(name)
        old = self._read_manifest(path) if path.exists() else None
        try:
            blob = self._blob(manifest.sha256)
            if not blob.exists():
                _atomic_write(blob, tensors)
            _atomic_write(path, manifest.to_json())
        except OSError as e:
            what = "full" if e.errno == errno.ENOSPC else "read-only" if e.errno in (errno.EROFS, errno.EACCES) \
                else e.strerror
            raise StoreError(f"disk store {self.root} cannot be written ({what})") from None
        if old is not None and old.sha256 != manifest.sha256:
            self._collect(old.sha256)
        return manifest

    def _read_manifest(self, path: Path) -> Manifest:
        try:
            return Manifest.from_json(path.read_bytes())
        except FileNotFoundError:
            raise PrefixNotFound(path.stem) from None
        except OSError as e:
            raise StoreError(f"disk store {self.root}: cannot read {path.name}: {e.strerror}") from None

    def _get(self, name: str) -> tuple[Manifest, bytes]:
        for _ in range(3):  # the manifest may be swapped between the two reads: read again
            m = self._read_manifest(self._task_file(name))
            try:
                return m, self._blob(m.sha256).read_bytes()
            except FileNotFoundError:
                continue
        raise StoreError(f"disk store {self.root}: the tensors of {name!r} ({m.sha256}) are missing")

    def _list(self) -> dict[str, Manifest]:
        out: dict[str, Manifest] = {}
        for p in sorted(self._tasks.glob("*.json")):
            try:
                out[p.stem] = self._read_manifest(p)
            except PrefixNotFound:  # deleted while listing
                continue
        return out

    def _delete(self, name: str) -> None:
        path = self._task_file(name)
        m = self._read_manifest(path)
        try:
            path.unlink()
        except FileNotFoundError:
            raise PrefixNotFound(name) from None
        except OSError as e:
            raise StoreError(f"disk store {self.root} cannot be written ({e.strerror})") from None
        self._collect(m.sha256)

    def _collect(self, version: str) -> None:
        """Remove a blob that no task points to any more."""
        if any(m.sha256 == version for m in self._list().values()):
            return
        try:
            self._blob(version).unlink(missing_ok=True)
        except OSError as e:
            logger.warning("could not remove unused blob %s: %s", version, e)

    # -- the async PrefixStore interface --
    async def put(self, name: str, manifest: Manifest, tensors: bytes) -> Manifest:
        """Store or atomically replace `name`."""
        validate_task_name(name)
        async with self._lock:
            return await asyncio.to_thread(self._put, name, manifest, tensors)

    async def get(self, name: str) -> tuple[Manifest, bytes]:
        """Manifest and tensor bytes of `name`."""
        return await asyncio.to_thread(self._get, name)

    async def get_manifest(self, name: str) -> Manifest:
        """Manifest of `name`."""
        return await asyncio.to_thread(self._read_manifest, self._task_file(name))

    async def list(self) -> dict[str, Manifest]:
        """All tasks and their manifests."""
        return await asyncio.to_thread(self._list)

    async def delete(self, name: str) -> None:
        """Remove `name` (its blob too, unless another task shares it)."""
        async with self._lock:
            await asyncio.to_thread(self._delete, name)

    async def close(self) -> None:
        """Nothing to release."""
