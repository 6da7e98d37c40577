"""Making the index and the blob files agree at start, whatever a crash left behind.

Temp files of interrupted downloads are gone already (`BlobStore.open`). Then: rows whose
file is missing are dropped (with their tags); files with no row are adopted if they hash
to their name, else removed; the totals are recounted from the rows. Only orphans are
hashed, so a store of 100,000 blobs that agrees with its index is checked in a directory
walk and one query.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciled:
    blobs: int  # rows after reconciliation
    dropped_rows: int
    adopted_files: int
    removed_files: int


async def reconcile(store: BlobStore, index: Index) -> Reconciled:
    on_disk = await asyncio.to_thread(store.scan)
    files = {str(digest): digest for digest in on_disk}
    indexed = await index.digests()
    missing = indexed - files.keys()
    await index.remove_blobs(missing)
    orphans = [files[name] for name in files.keys() - indexed]
    adopted, removed = [], 0
    for digest in orphans:
        if await asyncio.to_thread(store.verify, digest):
            stat = on_disk[digest]
            adopted.append((str(digest), stat.st_size, stat.st_mtime))
        else:
            await asyncio.to_thread(store.remove, digest)
            removed += 1
    await index.adopt_blobs(adopted)
    await index.recount()
    result = Reconciled(
        len(indexed) - len(missing) + len(adopted), len(missing), len(adopted), removed
    )
    if missing or orphans:
        log.warning(
            "cache reconciled: %d index rows without a file dropped, %d files adopted,"
            " %d corrupt or foreign files removed",
            result.dropped_rows,
            result.adopted_files,
            result.removed_files,
        )
    return result
