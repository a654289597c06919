"""The embedded default store: a directory of content-addressed tensor blobs, immutable versions, one alias per task.

    ROOT/blobs/<sha256>.safetensors       immutable tensors, named by their content hash (the version)
    ROOT/versions/<name>/<sha256>.json    one record per kept version: {"manifest": {...}, "created": unix secs}
    ROOT/tasks/<name>.json                the alias: the current version's manifest, swapped by one atomic rename
    ROOT/generation                       change counter, bumped on every change (what `watch` polls)
    ROOT/.lock                            flock held by writers, so several processes may share the directory

A put writes the blob and the version record (temp file, fsync, rename), then swaps the alias file: a crash at
any point leaves the old version or the new one visible, never half an artifact. Versions beyond `keep_versions`
(never the current one) and blobs no kept version points to are removed (a running request keeps its copy on
the device, so it is unaffected).
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefix_store.artifact import Manifest
from prefix_store.base import (DEFAULT_KEEP_VERSIONS, RESYNC, EventCallback, PrefixNotFound, StoreError, VersionInfo,
                               check_expected, validate_task_name, validate_version)
from prefix_store.watch import Backoff, deliver, diff_snapshots, resolve_version

logger = logging.getLogger(__name__)


def atomic_write(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Replace `path` by `data` in one rename (a temp file next to it, fsynced unless `sync` is False)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_error(root: Path, e: OSError) -> StoreError:
    """The StoreError for a failed write under `root`: full, read-only, or the OS's reason."""
    what = "full" if e.errno == errno.ENOSPC else "read-only" if e.errno in (errno.EROFS, errno.EACCES) \
        else e.strerror
    return StoreError(f"disk store {root} cannot be written ({what})")


class DiskStore:
    """A `PrefixStore` on a local directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, keep_versions: int | str = DEFAULT_KEEP_VERSIONS,
                 poll: float | str = 0.25):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"
        self.keep_versions = max(1, int(keep_versions))
        self.poll = float(poll)
        self._blobs, self._tasks, self._versions = self.root / "blobs", self.root / "tasks", self.root / "versions"
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._tasks.mkdir(parents=True, exist_ok=True)
            if not self._versions.exists():
                self._migrate()
        except OSError as e:
            raise StoreError(f"cannot create the store directory {self.root}: {e.strerror}") from None

    def _migrate(self) -> None:
        """A store written before versions existed: give every current manifest its version record."""
        with self.locked():
            for p in self._tasks.glob("*.json"):
                m = self._read_manifest(p)
                self._write_record(p.stem, m, m.created)
            self._versions.mkdir(exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's writer lock (threads and processes)."""
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.root, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _task_file(self, name: str) -> Path:
        return self._tasks / f"{validate_task_name(name)}.json"

    def _record(self, name: str, version: str) -> Path:
        return self._versions / name / f"{version}.json"

    def _blob(self, version: str) -> Path:
        return self._blobs / f"{version}.safetensors"

    # -- reading (no lock: every file is replaced atomically) --
    def _read_manifest(self, path: Path) -> Manifest:
        try:
            return Manifest.from_json(path.read_bytes())
        except FileNotFoundError:
            raise PrefixNotFound(path.stem) from None
        except OSError as e:
            raise StoreError(f"disk store {self.root}: cannot read {path.name}: {e.strerror}") from None

    def _current(self, name: str) -> Manifest | None:
        try:
            return self._read_manifest(self._task_file(name))
        except PrefixNotFound:
            return None

    def _versions_of(self, name: str) -> list[VersionInfo]:
        out = []
        for p in (self._versions / name).glob("*.json"):
            try:
                d = json.loads(p.read_bytes())
                out.append(VersionInfo(p.stem, Manifest.from_json(d["manifest"]), float(d["created"])))
            except FileNotFoundError:  # removed by retention meanwhile
                continue
            except OSError as e:
                raise StoreError(f"disk store {self.root}: cannot read {p}: {e.strerror}") from None
        return sorted(out, key=lambda v: (v.created, v.version), reverse=True)

    def _manifest_at(self, name: str, version: str | None) -> Manifest:
        if version is None:
            return self._read_manifest(self._task_file(name))
        validate_task_name(name)
        validate_version(version)
        kept = {v.version: v.manifest for v in self._versions_of(name)}
        if not kept and self._current(name) is None:
            raise PrefixNotFound(name)
        return kept[resolve_version(name, version, kept)]

    def _get(self, name: str, version: str | None) -> tuple[Manifest, bytes]:
        for _ in range(3):  # the alias may be swapped (and the old blob collected) between the two reads
            m = self._manifest_at(name, version)
            try:
                return m, self._blob(m.sha256).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreError(f"disk store {self.root}: cannot read blob {m.sha256}: {e.strerror}") from None
        raise StoreError(f"disk store {self.root}: the tensors of {name!r} (blob {m.sha256}) are missing")

    def _list(self) -> dict[str, Manifest]:
        out: dict[str, Manifest] = {}
        for p in sorted(self._tasks.glob("*.json")):
            try:
                out[p.stem] = self._read_manifest(p)
            except PrefixNotFound:  # deleted while listing
                continue
        return out

    def _snapshot(self) -> dict[str, str]:
        return {n: m.sha256 for n, m in self._list().items()}

    def _generation(self) -> str:
        try:
            return (self.root / "generation").read_text()
        except FileNotFoundError:
            return "0"

    # -- writing (under the lock) --
    def _write_record(self, name: str, m: Manifest, created: float) -> None:
        path = self._record(name, m.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"manifest": json.loads(m.to_json()), "created": created}).encode())

    def _bump(self) -> None:
        try:
            n = int(self._generation() or 0) + 1
        except ValueError:
            n = 1
        atomic_write(self.root / "generation", str(n).encode(), sync=False)

    def _put(self, name: str, manifest: Manifest, tensors: bytes, expected: str | None,
             created: float | None) -> Manifest:
        path = self._task_file(name)
        with self.locked():
            cur = self._current(name)
            check_expected(name, expected, cur.sha256 if cur else None)
            record = self._record(name, manifest.sha256)
            new_record = not record.exists()
            stored = manifest if new_record else self._manifest_at(name, manifest.sha256)  # versions are immutable
            try:
                blob = self._blob(manifest.sha256)
                if not blob.exists():
                    atomic_write(blob, tensors)
                if new_record:
                    self._write_record(name, stored, time.time() if created is None else created)
                atomic_write(path, stored.to_json())
            except OSError as e:
                if new_record:
                    record.unlink(missing_ok=True)
                raise write_error(self.root, e) from None
            self._after_change(name, stored.sha256)
        return stored

    def _set_version(self, name: str, version: str, expected: str | None) -> Manifest:
        path = self._task_file(name)
        with self.locked():
            cur = self._current(name)
            if cur is None:
                raise PrefixNotFound(name)
            m = self._manifest_at(name, version)
            check_expected(name, expected, cur.sha256)
            if not self._blob(m.sha256).exists():
                raise StoreError(f"disk store {self.root}: blob {m.sha256} of {name!r} is missing")
            try:
                atomic_write(path, m.to_json())
            except OSError as e:
                raise write_error(self.root, e) from None
            self._after_change(name, m.sha256)
        return m

    def _delete(self, name: str, expected: str | None) -> None:
        path = self._task_file(name)
        with self.locked():
            cur = self._current(name)
            if cur is None:
                raise PrefixNotFound(name)
            check_expected(name, expected, cur.sha256)
            versions = [v.version for v in self._versions_of(name)]
            try:
                path.unlink()
                shutil.rmtree(self._versions / name, ignore_errors=True)
                self._bump()
            except OSError as e:
                raise write_error(self.root, e) from None
            for v in set(versions) | {cur.sha256}:
                self._collect(v)

    def _after_change(self, name: str, current: str) -> None:
        """Bump the generation, then drop versions beyond `keep_versions` (never the current one)."""
        try:
            self._bump()
        except OSError as e:
            logger.warning("disk store %s: cannot bump the generation: %s", self.root, e)
        for info in self._versions_of(name)[self.keep_versions:]:
            if info.version != current:
                self._record(name, info.version).unlink(missing_ok=True)
                self._collect(info.version)

    def _collect(self, version: str) -> None:
        """Remove a blob that no kept version of any name points to any more."""
        if next(self._versions.glob(f"*/{version}.json"), None) is not None:
            return
        try:
            self._blob(version).unlink(missing_ok=True)
        except OSError as e:
            logger.warning("could not remove unused blob %s: %s", version, e)

    # -- the async PrefixStore interface --
    async def put(self, name: str, manifest: Manifest, tensors: bytes, *, expected_version: str | None = None,
                  created: float | None = None) -> Manifest:
        """Store a version and point `name` at it (VersionConflict if `expected_version` does not hold)."""
        validate_task_name(name)
        return await asyncio.to_thread(self._put, name, manifest, tensors, expected_version, created)

    async def get(self, name: str, version: str | None = None) -> tuple[Manifest, bytes]:
        """Manifest and tensor bytes of `name` (current, or the pinned `version`)."""
        return await asyncio.to_thread(self._get, name, version)

    async def get_manifest(self, name: str, version: str | None = None) -> Manifest:
        """Manifest of `name` (current, or the pinned `version`)."""
        validate_task_name(name)
        return await asyncio.to_thread(self._manifest_at, name, version)

    async def list(self) -> dict[str, Manifest]:
        """All tasks and their current manifests."""
        return await asyncio.to_thread(self._list)

    async def list_versions(self, name: str) -> list[VersionInfo]:
        """Kept versions of `name`, newest first."""
        validate_task_name(name)
        versions = await asyncio.to_thread(self._versions_of, name)
        if not versions and not (self._task_file(name)).exists():
            raise PrefixNotFound(name)
        return versions

    async def set_version(self, name: str, version: str, *, expected_version: str | None = None) -> Manifest:
        """Point `name` at one of its kept versions (rollback)."""
        validate_task_name(name)
        return await asyncio.to_thread(self._set_version, name, version, expected_version)

    async def delete(self, name: str, *, expected_version: str | None = None) -> None:
        """Remove `name` and its versions (their blobs too, unless another name keeps them)."""
        validate_task_name(name)
        await asyncio.to_thread(self._delete, name, expected_version)

    async def snapshot(self) -> dict[str, str]:
        """Every name with its current version."""
        return await asyncio.to_thread(self._snapshot)

    async def watch(self, callback: EventCallback) -> None:
        """Poll the generation file every `poll` seconds; on a change, diff snapshots and call `callback`."""
        last_gen, last, failed, backoff = None, None, False, Backoff(self.poll, 10.0)
        while True:
            try:
                gen = await asyncio.to_thread(self._generation)
                if gen != last_gen:
                    snap = await asyncio.to_thread(self._snapshot)
                    for event in diff_snapshots(last, snap) if last is not None else []:
                        await deliver(callback, event)
                    if last is None or failed:
                        await deliver(callback, RESYNC)
                    last_gen, last, failed = gen, snap, False
                backoff.reset()
                await asyncio.sleep(self.poll)
            except (OSError, StoreError) as e:
                logger.warning("disk store %s: watch failed (%s); retrying", self.root, e)
                failed = True
                await backoff.sleep()

    async def health(self) -> dict[str, Any]:
        """Readable -> ok; the detail says whether uploads can be written too."""
        try:
            n = await asyncio.to_thread(lambda: sum(1 for _ in os.scandir(self._tasks)))
        except OSError as e:
            return {"ok": False, "detail": f"disk store {self.url}: unreadable ({e.strerror})"}
        writable = os.access(self._blobs, os.W_OK) and os.access(self._tasks, os.W_OK)
        mode = "writable" if writable else "read-only (uploads fail, serving continues)"
        return {"ok": True, "detail": f"disk store {self.url}: {n} tasks, {mode}"}

    async def close(self) -> None:
        """Nothing to release."""
