"""The SQLite index of what is cached: blob sizes, media types, last use, and tags.

Hits never wait on a write: `touch` records the access in memory and a background
task flushes the batch at least every second and on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiosqlite

from mirror.reference import Digest

FLUSH_INTERVAL = 1.0


@dataclass(frozen=True)
class BlobRow:
    digest: str
    size: int
    media_type: str | None


@dataclass(frozen=True)
class TagRow:
    digest: str
    media_type: str
    checked_at: float


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._accessed: dict[str, float] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self.path)
        await self._db.execute("PRAGMA journal_mode = WAL")
        await self._db.execute("PRAGMA synchronous = NORMAL")
        await self._db.execute("PRAGMA busy_timeout = 5000")
        schema = resources.files("mirror.storage").joinpath("schema.sql").read_text()
        await self._db.executescript(schema)
        await self._db.commit()
        self._flusher = asyncio.create_task(self._flush_periodically())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._db is not None:
            await self.flush()
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("index is not open")
        return self._db

    async def blob(self, digest: Digest) -> BlobRow | None:
        async with self.db.execute(
            "SELECT size, media_type FROM blobs WHERE digest = ?", (str(digest),)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else BlobRow(str(digest), row[0], row[1])

    async def add_blob(self, digest: Digest, size: int, media_type: str | None = None) -> None:
        now = time.time()
        await self.db.execute(
            "INSERT INTO blobs (digest, size, media_type, created, last_access)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
            " size = excluded.size, last_access = excluded.last_access,"
            " media_type = coalesce(excluded.media_type, blobs.media_type)",
            (str(digest), size, media_type, now, now),
        )
        await self.db.commit()

    def touch(self, digest: Digest) -> None:
        """Record a use now; written by the next flush."""
        self._accessed[str(digest)] = time.time()

    async def flush(self) -> None:
        if not self._accessed:
            return
        batch, self._accessed = self._accessed, {}
        await self.db.executemany(
            "UPDATE blobs SET last_access = max(last_access, ?) WHERE digest = ?",
            [(when, digest) for digest, when in batch.items()],
        )
        await self.db.commit()

    async def tag(self, upstream: str, repository: str, tag: str) -> TagRow | None:
        async with self.db.execute(
            "SELECT digest, media_type, checked_at FROM tags"
            " WHERE upstream = ? AND repository = ? AND tag = ?",
            (upstream, repository, tag),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else TagRow(row[0], row[1], row[2])

    async def set_tag(
        self, upstream: str, repository: str, tag: str, digest: Digest, media_type: str
    ) -> None:
        """Record what the tag points to, as checked with the upstream just now."""
        await self.db.execute(
            "INSERT OR REPLACE INTO tags"
            " (upstream, repository, tag, digest, media_type, checked_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (upstream, repository, tag, str(digest), media_type, time.time()),
        )
        await self.db.commit()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush()
