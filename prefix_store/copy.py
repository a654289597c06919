"""Migration between stores: `copy_store(src, dst)` copies every name, every kept version and the aliases."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from prefix_store.base import PrefixNotFound, PrefixStore

logger = logging.getLogger(__name__)


@dataclass
class CopyReport:
    """What `copy_store` did."""

    names: int = 0
    versions_copied: int = 0
    versions_skipped: int = 0  # already in the destination (a copy can be run again to resume)


async def copy_store(src: PrefixStore, dst: PrefixStore) -> CopyReport:
    """Copy all names with their versions (oldest first, creation times kept) and point each alias as in `src`."""
    report = CopyReport()
    for name, current in (await src.list()).items():
        try:
            versions = await src.list_versions(name)
        except PrefixNotFound:  # deleted while copying
            continue
        try:
            have = {v.version for v in await dst.list_versions(name)}
        except PrefixNotFound:
            have = set()
        for info in reversed(versions):  # oldest first, so the destination's retention keeps the newest
            if info.version in have:
                report.versions_skipped += 1
                continue
            manifest, tensors = await src.get(name, info.version)
            await dst.put(name, manifest, tensors, created=info.created)
            report.versions_copied += 1
        await dst.set_version(name, current.sha256)
        report.names += 1
        logger.info("copied %s (%d versions, current %s)", name, len(versions), current.sha256[:12])
    return report
