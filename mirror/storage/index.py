"""The SQLite index of what is cached: blob sizes, media types, last use, and tags.

Hits never wait on a write: `touch` records the access in memory and a background
task flushes the batch at least every second and on close. A write that meets another
process's lock (`mirror gc`, say) past SQLite's busy timeout is tried again, and a batch
of accesses that could not be written is kept for the next flush.

Point reads (a blob's row, a tag's, the totals) are made on the event loop, on a
connection of their own: one takes tens of microseconds there, while a query through
aiosqlite's thread costs a wake-up each way for each of its three steps, a good part of a
cold request's time. WAL readers never wait for a writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from mirror.reference import Digest

log = logging.getLogger(__name__)

INDEX_FILE = "index.db"  # under storage.path
FLUSH_INTERVAL = 1.0
WAL_PAGES = 64  # checkpoint the WAL at this many pages (of 4 KiB)...
WAL_LIMIT = 512 * 1024  # ...and truncate it to this; the budget counts it at this size
BUSY_TIMEOUT_MS = 5000  # SQLite waits this long for another writer's lock...
WRITE_ATTEMPTS = 4  # ...and a write is tried this many times in all
# A read on the loop that finds the database busy (recovering a WAL, say) waits this
# long at most, then goes through aiosqlite's thread.
READ_BUSY_TIMEOUT_MS = 50
Row = tuple[Any, ...]


@dataclass(frozen=True)
class BlobRow:
    digest: str
    size: int
    media_type: str | None


@dataclass(frozen=True)
class LruRow:
    digest: str
    size: int
    last_access: float


@dataclass(frozen=True)
class Usage:
    bytes: int
    blobs: int
    oldest_access: float | None


@dataclass(frozen=True)
class TagRow:
    digest: str
    media_type: str
    checked_at: float


@dataclass(frozen=True)
class TaggedImage:
    upstream: str
    repository: str
    tag: str
    digest: str


class Index:
    def __init__(self, path: Path, *, private_elsewhere: bool = False) -> None:
        """`private_elsewhere`: another process (the primary, for a worker's index) may mark
        blobs private while this one runs, so `hidden` asks the database every time."""
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._accessed: dict[str, float] = {}
        self._flusher: asyncio.Task[None] | None = None
        # Digests of `private_blobs`, for hits that must not wait on a query.
        self.private: set[str] = set()
        self._private_elsewhere = private_elsewhere
        self._reader: sqlite3.Connection | None = None  # point reads, on the loop
        # One transaction at a time on the shared connection: another coroutine's commit
        # would otherwise commit half of this one, and its rollback undo this one's writes.
        self._writing = asyncio.Lock()

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self.path)
        await self._db.execute("PRAGMA journal_mode = WAL")
        await self._db.execute("PRAGMA synchronous = NORMAL")
        await self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # The WAL counts against the disk budget: keep it checkpointed and short.
        await self._db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
        await self._db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        schema = resources.files("mirror.storage").joinpath("schema.sql").read_text()
        await self._db.executescript(schema)
        await self._db.commit()
        self._reader = sqlite3.connect(self.path, isolation_level=None)
        self._reader.execute(f"PRAGMA busy_timeout = {READ_BUSY_TIMEOUT_MS}")
        if not self._private_elsewhere:
            async with self._db.execute("SELECT digest FROM private_blobs") as cursor:
                self.private = {row[0] async for row in cursor}
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
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("index is not open")
        return self._db

    async def _read(self, query: str, args: tuple[object, ...] = ()) -> Row | None:
        """The first row of a point query, read on the loop (see the module's docstring)."""
        if self._reader is None:
            raise RuntimeError("index is not open")
        try:
            rows = self._reader.execute(query, args).fetchall()  # to its end: no open read
        except sqlite3.OperationalError:  # busy, or locked: through the writer's thread
            async with self.db.execute(query, args) as cursor:
                rows = list(await cursor.fetchall())
        return rows[0] if rows else None

    async def blob(self, digest: Digest) -> BlobRow | None:
        row = await self._read(
            "SELECT size, media_type FROM blobs WHERE digest = ?", (str(digest),)
        )
        return None if row is None else BlobRow(str(digest), *row)

    async def add_blob(
        self, digest: Digest, size: int, media_type: str | None = None, *, public: bool = True
    ) -> str | None:
        """A complete blob; fetched through a public upstream, it is private no longer.

        Returns the media type the row holds: the first one recorded for the digest, which
        a later write never changes (the type belongs to the content, not to whichever
        upstream or repository served it last).
        """
        kept: str | None = None

        async def write() -> None:
            nonlocal kept
            now = time.time()
            # One trip to aiosqlite's thread, read to its end (open, it blocks commits).
            rows = await self.db.execute_fetchall(
                "INSERT INTO blobs (digest, size, media_type, created, last_access)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
                " size = excluded.size, last_access = excluded.last_access,"
                " media_type = coalesce(blobs.media_type, excluded.media_type)"
                " RETURNING media_type",
                (str(digest), size, media_type, now, now),
            )
            kept = next(iter(rows))[0] if rows else None
            if public:
                await self.db.execute("DELETE FROM private_blobs WHERE digest = ?", (str(digest),))
            await self.db.commit()

        await self._retrying(write)
        if public:
            self.private.discard(str(digest))
        return kept

    def hidden(self, digest: Digest, access: str) -> bool:
        """Whether this is a private blob asked for through a `public` upstream."""
        if access != "public":
            return False
        if not self._private_elsewhere:
            return str(digest) in self.private
        if self._reader is None:
            raise RuntimeError("index is not open")
        query = "SELECT 1 FROM private_blobs WHERE digest = ?"
        return bool(self._reader.execute(query, (str(digest),)).fetchall())

    async def mark_private(self, digest: Digest) -> None:
        """Before a blob from an `authenticated` upstream is committed (so that a crash
        cannot leave it public): private, unless it is cached as public already."""

        async def write() -> None:
            await self.db.execute(
                "INSERT OR IGNORE INTO private_blobs (digest)"
                " SELECT ?1 WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE digest = ?1)",
                (str(digest),),
            )
            await self.db.commit()

        await self._retrying(write)
        async with self.db.execute(
            "SELECT 1 FROM private_blobs WHERE digest = ?", (str(digest),)
        ) as cursor:
            if await cursor.fetchone() is not None:
                self.private.add(str(digest))

    async def remove_blobs(self, digests: Iterable[str]) -> None:
        """Forget blobs, and the tags pointing at them (a later pull refetches those)."""
        rows = [(digest,) for digest in digests]

        async def write() -> None:
            await self.db.executemany("DELETE FROM tags WHERE digest = ?", rows)
            await self.db.executemany("DELETE FROM blobs WHERE digest = ?", rows)
            await self.db.commit()

        await self._retrying(write)
        for (digest,) in rows:
            self._accessed.pop(digest, None)
            self.private.discard(digest)

    async def adopt_blobs(self, found: Iterable[tuple[str, int, float]]) -> None:
        """Rows for complete files found without one: (digest, size, last use)."""

        async def write() -> None:
            await self.db.executemany(
                "INSERT OR IGNORE INTO blobs (digest, size, media_type, created, last_access)"
                " VALUES (?, ?, NULL, ?, ?)",
                [(digest, size, used, used) for digest, size, used in found],
            )
            await self.db.commit()

        await self._retrying(write)

    async def usage(self) -> Usage:
        row = await self._read(
            "SELECT bytes, blobs, (SELECT min(last_access) FROM blobs) FROM totals"
        )
        assert row is not None
        return Usage(*row)

    async def lru(self, after: tuple[float, str] | None, limit: int) -> list[LruRow]:
        """Blobs least recently used first, from just past `after` (keyset pagination)."""
        last_access, digest = after or (-1.0, "")
        async with self.db.execute(
            "SELECT digest, size, last_access FROM blobs WHERE (last_access, digest) > (?, ?)"
            " ORDER BY last_access, digest LIMIT ?",
            (last_access, digest, limit),
        ) as cursor:
            return [LruRow(*row) async for row in cursor]

    async def tagged(self) -> list[TaggedImage]:
        async with self.db.execute(
            "SELECT upstream, repository, tag, digest FROM tags ORDER BY upstream, repository, tag"
        ) as cursor:
            return [TaggedImage(*row) async for row in cursor]

    async def remove_tag(self, upstream: str, repository: str, tag: str) -> None:
        async def write() -> None:
            await self.db.execute(
                "DELETE FROM tags WHERE upstream = ? AND repository = ? AND tag = ?",
                (upstream, repository, tag),
            )
            await self.db.commit()

        await self._retrying(write)

    async def blobs(self) -> dict[str, tuple[int, float]]:
        """Every blob: its size and last use."""
        async with self.db.execute("SELECT digest, size, last_access FROM blobs") as cursor:
            return {row[0]: (row[1], row[2]) async for row in cursor}

    async def digests(self) -> set[str]:
        async with self.db.execute("SELECT digest FROM blobs") as cursor:
            return {row[0] async for row in cursor}

    async def recount(self) -> None:
        """Set the totals from the rows themselves (after reconciliation at start)."""

        async def write() -> None:
            await self.db.execute(
                "UPDATE totals SET bytes = (SELECT coalesce(sum(size), 0) FROM blobs),"
                " blobs = (SELECT count(*) FROM blobs)"
            )
            await self.db.commit()

        await self._retrying(write)

    def file_bytes(self) -> int:
        """The index's own files on disk (database, WAL, shared memory), with the WAL at
        the most it grows to between checkpoints."""
        sizes = {}
        for suffix in ("", "-wal", "-shm"):
            try:
                sizes[suffix] = Path(f"{self.path}{suffix}").stat().st_size
            except FileNotFoundError:
                sizes[suffix] = 0
        return sizes[""] + max(sizes["-wal"], WAL_LIMIT) + sizes["-shm"]

    def touch(self, digest: Digest) -> None:
        """Record a use now; written by the next flush."""
        self._accessed[str(digest)] = time.time()

    async def flush(self) -> None:
        if not self._accessed:
            return
        batch, self._accessed = self._accessed, {}

        async def write() -> None:
            await self.db.executemany(
                "UPDATE blobs SET last_access = max(last_access, ?) WHERE digest = ?",
                [(when, digest) for digest, when in batch.items()],
            )
            await self.db.commit()

        try:
            await self._retrying(write)
        except sqlite3.OperationalError:
            for digest, when in batch.items():  # kept for the next flush, never lost
                self._accessed[digest] = max(when, self._accessed.get(digest, 0.0))
            raise

    async def _retrying(self, write: Callable[[], Awaitable[None]]) -> None:
        """`write` (one transaction), again while the database stays locked by another."""
        async with self._writing:
            for attempt in range(1, WRITE_ATTEMPTS + 1):
                try:
                    await write()
                    return
                except sqlite3.OperationalError as exc:
                    await self.db.rollback()
                    if not _locked(exc) or attempt == WRITE_ATTEMPTS:
                        raise
                    log.warning("index is locked by another process (%s); trying again", exc)
                    await asyncio.sleep(0.05 * 2**attempt)

    async def tag(self, upstream: str, repository: str, tag: str) -> TagRow | None:
        row = await self._read(
            "SELECT digest, media_type, checked_at FROM tags"
            " WHERE upstream = ? AND repository = ? AND tag = ?",
            (upstream, repository, tag),
        )
        return None if row is None else TagRow(*row)

    async def set_tag(
        self,
        upstream: str,
        repository: str,
        tag: str,
        digest: Digest,
        media_type: str,
        checked_at: float | None = None,
    ) -> None:
        """Record what the tag points to, as checked with the upstream at `checked_at`
        (by another replica), or just now."""

        async def write() -> None:
            await self.db.execute(
                "INSERT OR REPLACE INTO tags"
                " (upstream, repository, tag, digest, media_type, checked_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (upstream, repository, tag, str(digest), media_type, checked_at or time.time()),
            )
            await self.db.commit()

        await self._retrying(write)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except sqlite3.OperationalError as exc:
                log.warning("could not record blob accesses yet: %s", exc)


def _locked(error: sqlite3.OperationalError) -> bool:
    name = getattr(error, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(error)
