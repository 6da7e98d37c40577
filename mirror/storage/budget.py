"""The cache's disk budget: space reserved before a byte is written.

What the cache holds on disk is counted as: the blobs in the index (exact totals kept by
SQLite triggers), plus the space reserved for downloads and manifest writes under way,
plus the index's own files. A download reserves its declared length before writing a
byte, so concurrent downloads cannot overshoot the budget together. When a reservation
finds no room, the budget asks whoever reclaims space (the evictor) to make some, and
says no when even that cannot: the blob is then served without being cached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mirror.config import StorageConfig
from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.storage.index import Index

log = logging.getLogger(__name__)

Reclaim = Callable[[int], Awaitable[object]]  # frees room down to a target of bytes used


@dataclass(frozen=True)
class Use:
    used: int  # bytes counted against the budget
    max_size: int
    blobs: int  # in the index


class Budget:
    def __init__(self, storage: StorageConfig, index: Index, metrics: Metrics | None = None):
        self.max_size = storage.max_size
        self.high = int(storage.max_size * storage.high_watermark)
        self.low = int(storage.max_size * storage.low_watermark)
        self.index = index
        self.metrics = metrics or Metrics()
        self.reserved = 0
        # Reservations and eviction passes, one at a time: a pass counts what is reserved.
        self.lock = asyncio.Lock()
        self.released = asyncio.Event()  # set when a reservation ends: worth a pass
        self._reclaim: Reclaim | None = None

    def reclaim_with(self, reclaim: Reclaim) -> None:
        """Who frees room when a reservation finds none; called holding `lock`."""
        self._reclaim = reclaim

    async def used(self) -> int:
        """Bytes counted against the budget now."""
        return (await self.use()).used

    async def use(self) -> Use:
        usage = await self.index.usage()
        used = usage.bytes + self.reserved + self.index.file_bytes()
        return Use(used, self.max_size, usage.blobs)

    async def reserve(self, size: int) -> bool:
        """Room for `size` more bytes, reclaimed if need be; False when there is none."""
        if size > self.max_size - self.index.file_bytes():
            return False  # larger than all the budget could ever hold: evict nothing for it
        async with self.lock:
            if await self.used() + size > self.max_size:
                if self._reclaim is not None:
                    await self._reclaim(max(min(self.low, self.max_size - size), 0))
                if await self.used() + size > self.max_size:
                    return False
            self.reserved += size
            return True

    def release(self, size: int) -> None:
        """A reservation is over: its bytes were committed (now in the index) or dropped."""
        self.reserved -= size
        self.released.set()

    def passed_through(self, digest: Digest, size: int | None) -> None:
        self.metrics.uncached_passthrough.inc()
        log.warning(
            "no room in the %d-byte cache budget for %s (%s bytes): served without caching",
            self.max_size,
            digest,
            size,
        )
