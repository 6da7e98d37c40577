"""Start-up reconciliation and one eviction pass on a generated store of many small blobs.

Generates N blob files (default 100,000, 1 KiB each) with their index rows, then drops
1% of the rows (files to adopt), deletes 1% of the files (rows to drop) and leaves one
interrupted download; times `reconcile` as the server runs it at start. Then times one
eviction pass that evicts half of the blobs (LRU first).

    python benchmarks/reconcile_and_evict.py [--blobs 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from mirror.config import StorageConfig
from mirror.eviction import Evictor
from mirror.reference import digest_of, parse_digest
from mirror.storage.blobs import BlobStore
from mirror.storage.budget import Budget
from mirror.storage.index import Index
from mirror.storage.reconcile import reconcile

BLOB_SIZE = 1024


def generate(store: BlobStore, count: int) -> list[tuple[str, int, float]]:
    """Blob files written directly (no fsync: this is set-up, not what is measured)."""
    rows = []
    now = time.time()
    for n in range(count):
        data = n.to_bytes(8, "big") + os.urandom(BLOB_SIZE - 8)
        digest = digest_of(data)
        path = store.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append((str(digest), len(data), now - count + n))  # distinct last uses
    return rows


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="reconcile-") as tmp:
        root = Path(tmp)
        store = BlobStore(root)
        store.open()
        began = time.perf_counter()
        rows = await asyncio.to_thread(generate, store, count)
        index = Index(root / "index.db")
        await index.open()
        await index.adopt_blobs(rows[count // 100 :])  # 1% of the files have no row
        for digest, _, _ in rows[-(count // 100) :]:  # 1% of the rows have no file
            store.path(parse_digest(digest)).unlink()
        (store.tmp / "interrupted-download").write_bytes(b"x" * 4096)
        print(f"generated {count} blobs of {BLOB_SIZE} B in {time.perf_counter() - began:.1f}s")

        began = time.perf_counter()
        store.open()
        result = await reconcile(store, index)
        took = time.perf_counter() - began
        print(
            f"reconcile: {took:.2f}s for {count} files ({result.adopted_files} adopted after"
            f" hashing, {result.dropped_rows} rows dropped, {result.blobs} blobs after)"
        )

        usage = await index.usage()
        max_size = usage.bytes * 4  # the pass evicts to the low watermark: half the blobs
        storage = StorageConfig(path=root, max_size=max_size, low_watermark=0.125)
        evictor = Evictor(Budget(storage, index), index, store, (), None)
        began = time.perf_counter()
        evicted = await evictor.run_pass(force=True)
        took = time.perf_counter() - began
        print(
            f"eviction pass: {took:.2f}s to evict {evicted.blobs} blobs"
            f" ({evicted.blobs / took:.0f} blobs/s)"
        )
        await index.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().blobs))
