"""Pull-through for blobs: local first, else one shared upstream download per digest.

A `Fetch` is owned by `BlobProxy`, not by the request that started it: a task writes
the upstream body into a temp file while hashing it, and every request for that digest
(the first included) streams from the growing file through its own file descriptor, with
sendfile. A client that goes away stops only its own reader. The last byte of any answer
is held back until the whole blob is verified, so a client that received everything has
received the right bytes, and a failed download cuts every reader short. Readers get that
last byte as soon as the digest matches: the fsync and rename into the cache come after.

An upstream connection that breaks mid-body is resumed with a Range request (or, when the
upstream ignores the Range, received again from the start with the bytes already written
skipped), `retries` times at most.

A blob that does not fit the budget (at its start, or when a blob of undeclared length
outgrows the room, or when the disk fills up) passes through: readers get the rest from a
bounded memory window (window.py), and nothing is cached. The window waits for its slowest
reader, but not longer than the upstream's idle timeout: a reader that holds it that long
is cut, so no client can hold a download (and its upstream slot) forever. A reader that
only waits for its held-back last byte keeps that byte aside and holds nothing.

A blob fetched through an `authenticated` upstream is private (see `Index.mark_private`):
a request routed to a public upstream does not see it in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import BinaryIO

from mirror.errors import RegistryError, UpstreamCut, UpstreamError
from mirror.eviction import Evictor
from mirror.metrics import Metrics
from mirror.proxy.window import Window
from mirror.reference import ByteRange, Digest
from mirror.storage.blobs import BlobStore, BlobWriter, DigestMismatch, hold, verify
from mirror.storage.index import Index
from mirror.upstream.client import Upstream, UpstreamBlob

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024  # bytes a reader takes from memory at a time (pass-through)
PASSTHROUGH_WINDOW = 4 * 1024 * 1024  # bytes kept in memory for readers of an uncached blob
GROWTH_STEP = 1024 * 1024  # reserved at a time for a blob of undeclared length
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class CachedBlob:
    """A complete, verified blob on disk, open and held from eviction until closed: it is
    a context manager."""

    file: BinaryIO
    size: int

    def __enter__(self) -> CachedBlob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()


@dataclass(frozen=True)
class Span:
    """`count` bytes of `file` from `offset`, for the web layer to send with sendfile."""

    file: BinaryIO
    offset: int
    count: int


class Fetch:
    """One upstream download of one digest, followed by any number of readers."""

    def __init__(self, writer: BlobWriter) -> None:
        self.digest = writer.digest
        self.writer = writer
        self.length: int | None = None
        self.reserved = 0  # bytes of the cache budget held for this download
        self.error: RegistryError | None = None
        self.verified = False  # every byte is here and matches the digest
        self.done = False  # and the blob is cached (or could not be)
        self.started = asyncio.Event()
        self._progress = asyncio.Event()
        # Readers dup this descriptor: it stays valid across the rename at commit and the
        # unlink on failure, so a reader never races the file's move. Its hold, shared by
        # the duplicates, keeps the evictor off the blob until the last reader is done.
        self._fd = os.open(writer.temp_path, os.O_RDONLY)
        hold(self._fd)
        self.window: Window | None = None  # passing through: the bytes kept in memory
        # Per reader: the first byte it still needs (None: nothing from the window).
        self._positions: dict[int, int | None] = {}
        self._cut: set[int] = set()  # readers that held the window too long
        self._reader_moved = asyncio.Event()

    @property
    def written(self) -> int:
        return self.writer.written if self.window is None else self.window.end

    @property
    def readers(self) -> int:
        return len(self._positions)

    def pass_through(self) -> None:
        """No room in the cache: from here on (the start, or where the room ran out) keep
        bytes in memory only until every reader has them."""
        self.window = Window(self.writer.written, self.writer.hasher())
        self.writer.close()  # readers' descriptors keep what was written readable

    def append(self, chunk: bytes) -> bool:
        """True when the disk filled up with this chunk and the fetch now passes through."""
        filled = False
        if self.window is None:
            before = self.writer.written
            try:
                self.writer.write(chunk)
            except OSError as exc:
                if exc.errno not in DISK_FULL:
                    raise
                self.pass_through()
                chunk, filled = chunk[self.writer.written - before :], True
        if self.window is not None:
            self.window.append(chunk)
        self.notify()
        return filled

    def check(self) -> None:
        """Whether what arrived hashes to the digest, with the declared length; then the
        readers may take their last bytes."""
        if self.window is None:
            self.writer.check(self.length)
        else:
            verify(self.digest, self.window.hash, self.window.end, self.length)
        self.verified = True
        self.notify()

    async def make_room(self, patience: float) -> None:
        """Pass-through: wait until the window is small, dropping what no reader needs;
        readers that hold it `patience` seconds are cut."""
        window = self.window
        while window is not None and len(window) > PASSTHROUGH_WINDOW:
            needed = (p for p in self._positions.values() if p is not None)
            window.drop_before(min(needed, default=window.end))
            if len(window) <= PASSTHROUGH_WINDOW:
                return
            self._reader_moved.clear()
            try:
                async with asyncio.timeout(patience):
                    await self._reader_moved.wait()
            except TimeoutError:
                self._cut_slowest(window, patience)

    def _cut_slowest(self, window: Window, patience: float) -> None:
        slowest = [r for r, p in self._positions.items() if p is not None and p <= window.start]
        for reader in slowest:
            self._positions[reader] = None
            self._cut.add(reader)
        log.warning(
            "%d reader(s) of uncached %s fell behind the others for %gs: cut",
            len(slowest),
            self.digest,
            patience,
        )
        self.notify()

    def read(self, file: BinaryIO, size: int, offset: int) -> Span | bytes:
        window = self.window
        if window is None:
            return Span(file, offset, size)
        if offset < window.origin:  # written before the room ran out
            return Span(file, offset, min(size, window.origin - offset))
        return window.read(offset, min(size, READ_CHUNK))

    def follow(self, reader: int, offset: int) -> None:
        """Where a reader is, so pass-through keeps what it still needs."""
        if reader in self._cut:
            raise UpstreamError(
                f"this client read uncached {self.digest} too slowly for the others; cut"
            )
        self._positions[reader] = offset
        self._reader_moved.set()

    def release(self, reader: int) -> None:
        """The reader needs nothing more from the window (it still waits, though)."""
        self._positions[reader] = None
        self._reader_moved.set()

    def leave(self, reader: int) -> None:
        self._positions.pop(reader, None)
        self._cut.discard(reader)
        self._reader_moved.set()

    def notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def finish(self, error: RegistryError | None) -> None:
        self.error = error
        self.done = True
        self.started.set()
        self.notify()
        os.close(self._fd)  # readers hold their own duplicates

    async def wait_started(self) -> int | None:
        """The upstream's declared length, once its answer arrived; raises its error."""
        await self.started.wait()
        if self.error is not None:
            raise self.error
        return self.length

    async def wait_verified(self) -> None:
        while not self.verified and self.error is None:
            await self._progress.wait()
        if self.error is not None:
            raise self.error

    async def wait_done(self) -> None:
        while not self.done:
            await self._progress.wait()
        if self.error is not None:
            raise self.error

    async def progress(self) -> None:
        await self._progress.wait()

    def readable(self, stop: int | None) -> int:
        """How far a reader may read now: never its last byte before verification."""
        if self.verified:
            return self.written if stop is None else stop
        held_back = self.written - 1 if stop is None else min(self.written, stop - 1)
        return max(held_back, 0)

    def open_reader(self) -> BlobReader:
        """Only while the fetch is running (it is then in `BlobProxy._fetches`)."""
        return BlobReader(self, os.dup(self._fd))


class BlobReader:
    """One request's view of a `Fetch`: its own descriptor on the growing file.

    While open, its descriptor keeps the blob held from eviction (see `Fetch`).
    """

    def __init__(self, fetch: Fetch, fd: int) -> None:
        self.fetch = fetch
        self._file: BinaryIO = os.fdopen(fd, "rb", buffering=0)
        fetch.follow(id(self), 0)

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._file.closed:
            self._file.close()
            self.fetch.leave(id(self))

    async def chunks(self, byte_range: ByteRange | None) -> AsyncGenerator[Span | bytes, None]:
        """The bytes of `byte_range` (or the whole blob) as they arrive: spans of the file,
        or bytes from memory when passing through; raises on failure."""
        fetch = self.fetch
        offset = byte_range.start if byte_range else 0
        stop = byte_range.end + 1 if byte_range else fetch.length
        reader = id(self)
        fetch.follow(reader, offset)
        while stop is None or offset < stop:
            limit = fetch.readable(stop)
            if offset < limit:
                piece = fetch.read(self._file, limit - offset, offset)
                offset += piece.count if isinstance(piece, Span) else len(piece)
                yield piece
                fetch.follow(reader, offset)
            elif fetch.error is not None:
                raise fetch.error
            elif fetch.verified:
                return
            elif stop is not None and offset == stop - 1 and fetch.written > offset:
                # Only the held-back last byte is left: set aside, it holds no window.
                last = fetch.read(self._file, 1, offset)
                fetch.release(reader)
                await fetch.wait_verified()
                yield last
                return
            else:
                await fetch.progress()
        await fetch.wait_verified()  # an empty answer, too, is complete only once verified


class BlobProxy:
    def __init__(
        self, store: BlobStore, index: Index, evictor: Evictor, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.index = index
        self.evictor = evictor
        self.metrics = metrics or Metrics()
        # Per upstream: a download failing on one upstream never cuts another's clients.
        self._fetches: dict[tuple[str, Digest], Fetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._disk_full = False  # logged once, until a blob is stored again

    def local(self, upstream: Upstream, digest: Digest) -> CachedBlob | None:
        """The cached blob, open, recording the use; None on a miss (or a private blob
        asked for through a public upstream)."""
        if self.index.hidden(digest, upstream.config.access):
            return None
        try:
            file, size = self.store.open_blob(digest)
        except FileNotFoundError:
            return None
        self.index.touch(digest)
        return CachedBlob(file, size)

    async def size(self, upstream: Upstream, repository: str, digest: Digest) -> int | None:
        """For a HEAD that `local` missed: the size from a download under way, or the
        upstream."""
        fetch = self._fetches.get((upstream.name, digest))
        if fetch is not None:
            return await fetch.wait_started()
        return await upstream.head_blob(repository, digest)

    def join(self, upstream: Upstream, repository: str, digest: Digest) -> BlobReader:
        """A reader of the download of `digest` under way, or of a new one."""
        fetch = self._fetches.get((upstream.name, digest))
        if fetch is not None:
            self.metrics.fetch_joins.inc()
        else:
            fetch = Fetch(self.store.writer(digest))
            self._fetches[upstream.name, digest] = fetch
            task = asyncio.create_task(self._download(fetch, upstream, repository))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fetch.open_reader()

    async def idle(self) -> None:
        """Until no download is running: each blob fetched is cached (or failed)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        """Stop downloads still running (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _download(self, fetch: Fetch, upstream: Upstream, repository: str) -> None:
        error: RegistryError | None = None
        self.metrics.fetches_in_flight.inc()
        try:
            await self._receive(fetch, upstream, repository)
            fetch.check()
            if fetch.window is None:
                await self._keep(fetch, upstream)
        except RegistryError as exc:
            error = exc
            if isinstance(exc, DigestMismatch):
                self.metrics.digest_mismatches.labels(upstream.name).inc()
                log.warning("%s from %s: %s", fetch.digest, upstream.name, exc.message)
            else:  # an outage is logged once, by the upstream client
                log.debug("download of %s from %s failed: %s", fetch.digest, upstream.name, exc)
        except asyncio.CancelledError:
            error = UpstreamError("the mirror is shutting down")
            raise
        except Exception as exc:
            log.exception("download of %s from %s failed", fetch.digest, upstream.name)
            error = UpstreamError(f"download failed: {type(exc).__name__}")  # the log has the rest
        finally:
            # Readers are released first: nothing after this may leave them waiting.
            self._forget(upstream, fetch)
            fetch.finish(error)
            fetch.writer.close()
            self.evictor.release(fetch.reserved)
            self.metrics.fetches_in_flight.dec()

    def _forget(self, upstream: Upstream, fetch: Fetch) -> None:
        """No new reader may join this download (it ended, or passes through)."""
        if self._fetches.get((upstream.name, fetch.digest)) is fetch:
            del self._fetches[upstream.name, fetch.digest]

    async def _keep(self, fetch: Fetch, upstream: Upstream) -> None:
        """Commit the verified file and index it. A failure to store it leaves the readers'
        answers whole: the blob was served, only not cached."""
        private = upstream.config.access == "authenticated"
        try:
            if private:  # before the file is in place, so a crash cannot leave it public
                await self.index.mark_private(fetch.digest)
            await asyncio.to_thread(fetch.writer.commit)
            await self.index.add_blob(fetch.digest, fetch.written, public=not private)
        except (OSError, sqlite3.Error) as exc:
            log.warning("%s was served but could not be cached: %s", fetch.digest, exc)
            return
        self._disk_full = False

    async def _receive(self, fetch: Fetch, upstream: Upstream, repository: str) -> None:
        """The whole body into `fetch`, resuming after a cut `retries` times at most."""
        for attempt in range(upstream.config.retries + 1):
            try:
                async with upstream.blob(repository, fetch.digest, fetch.written) as body:
                    await self._begin(fetch, upstream, body)
                    skip = fetch.written - body.start  # sent again by a restart from 0
                    async for chunk in body.chunks():
                        if skip:
                            dropped = min(skip, len(chunk))
                            chunk, skip = chunk[dropped:], skip - dropped
                        if chunk:
                            await self._take(fetch, upstream, chunk)
                return
            except UpstreamCut as cut:
                if attempt == upstream.config.retries or not fetch.started.is_set():
                    raise
                self.metrics.upstream_resumes.labels(upstream.name).inc()
                log.info(
                    "resuming %s from %s at byte %d: %s",
                    fetch.digest,
                    upstream.name,
                    fetch.written,
                    cut.message,
                )

    async def _begin(self, fetch: Fetch, upstream: Upstream, body: UpstreamBlob) -> None:
        if fetch.started.is_set():  # a resumption: it must be the same blob
            if None not in (body.length, fetch.length) and body.length != fetch.length:
                raise UpstreamError(
                    f"upstream {upstream.name} now says {fetch.digest} has {body.length} bytes,"
                    f" not {fetch.length}"
                )
            return
        fetch.length = body.length
        if body.length is not None:  # else reserved step by step as the bytes come
            await self._reserve(fetch, upstream, body.length)
        fetch.started.set()

    async def _take(self, fetch: Fetch, upstream: Upstream, chunk: bytes) -> None:
        await fetch.make_room(upstream.config.timeouts.idle)
        if fetch.window is not None and not fetch.readers:
            raise UpstreamError("every client of an uncached download went away")
        if fetch.length is not None and fetch.written + len(chunk) > fetch.length:
            raise UpstreamError(f"upstream sent more than the {fetch.length} bytes it declared")
        if fetch.window is None and fetch.written + len(chunk) > fetch.reserved:
            await self._grow(fetch, upstream, len(chunk))
        if fetch.append(chunk):
            self._forget(upstream, fetch)
            self.metrics.disk_full.inc()
            if not self._disk_full:
                self._disk_full = True
                log.warning(
                    "disk full writing %s: it and any other blob that meets a full disk are"
                    " served without caching (logged once, until a blob is stored again)",
                    fetch.digest,
                )

    async def _reserve(self, fetch: Fetch, upstream: Upstream, size: int) -> None:
        if await self.evictor.reserve(size):
            fetch.reserved += size
            return
        self.evictor.passed_through(fetch.digest, fetch.length)
        self._forget(upstream, fetch)
        fetch.pass_through()

    async def _grow(self, fetch: Fetch, upstream: Upstream, needed: int) -> None:
        """A blob of undeclared length outgrew its reservation: reserve a little more (not
        much: concurrent downloads must not crowd each other out), or pass through."""
        await self._reserve(fetch, upstream, max(needed, GROWTH_STEP))
