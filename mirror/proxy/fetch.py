"""One download of one digest, followed by any number of readers.

The download writes into a sink (sinks.py): the blob's temp file, or, when the blob is not
being cached, a bounded memory window. Every reader (the request that started the
download included) follows it through its own descriptor on the temp file, so a reader
never races the file's rename at commit or its unlink on failure. A reader that goes away
stops only itself. The last byte of any answer is held back until the whole blob is
verified: a client that received everything received the right bytes, and a failed
download cuts every reader short.

A window waits for its slowest reader, but not longer than the source's patience: a
reader that holds it that long is cut, so no client can hold a download (and its upstream
slot) forever. A reader left with only its held-back last byte keeps that byte aside and
holds nothing.

Writer and readers wait on one condition, notified on every change.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncGenerator, Callable
from functools import partial
from typing import BinaryIO

from mirror.errors import RegistryError, UpstreamError
from mirror.proxy.sinks import FileSink, Sink, Span, WindowSink
from mirror.reference import ByteRange
from mirror.storage.blobs import BlobWriter, hold

log = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Fetch:
    def __init__(self, writer: BlobWriter) -> None:
        self.digest = writer.digest
        self.writer = writer
        self.sink: Sink = FileSink(writer)
        self.length: int | None = None  # as the source declared it
        self.reserved = 0  # bytes of the cache budget held for this download
        self.started = False  # the source answered: `length` is known
        self.verified = False  # every byte is here and matches the digest
        self.done = False  # and the blob is cached (or could not be)
        self.error: RegistryError | None = None
        self._changed = asyncio.Condition()
        self._waiting = 0  # tasks in `until`: no one to notify is the common case
        # Readers dup this descriptor. Its hold, shared by the duplicates, keeps the
        # evictor off the blob until the last reader is done.
        self._fd = os.open(writer.temp_path, os.O_RDONLY)
        hold(self._fd)
        # Per reader: the first byte it still needs (None: nothing from the window).
        self._positions: dict[int, int | None] = {}
        self._cut: set[int] = set()  # readers that held the window too long

    @property
    def written(self) -> int:
        return self.sink.written

    @property
    def readers(self) -> int:
        return len(self._positions)

    def pass_through(self) -> None:
        """No room in the cache: from here on (the start, or where the room ran out) keep
        bytes in memory only until every reader has them."""
        self.sink = WindowSink(self.digest, self.writer.written, self.writer.hasher())
        self.writer.close()  # readers' descriptors keep what was written readable

    async def begin(self, length: int | None) -> None:
        self.length = length
        self.started = True
        await self._notify()

    async def append(self, chunk: bytes) -> bool:
        """True when the disk filled up with this chunk and the fetch now passes through."""
        before = self.sink.written
        filled = False
        try:
            self.sink.write(chunk)
        except OSError as exc:
            if exc.errno not in DISK_FULL or not self.sink.keeps:
                raise
            landed = self.sink.written - before
            self.pass_through()
            self.sink.write(chunk[landed:])
            filled = True
        await self._notify()
        return filled

    async def check(self) -> None:
        """Whether what arrived is the blob, with the declared length; then the readers
        may take their last bytes."""
        self.sink.check(self.length)
        self.verified = True
        await self._notify()

    async def finish(self, error: RegistryError | None) -> None:
        self.error = error
        self.done = True
        os.close(self._fd)  # readers hold their own duplicates
        await self._notify()

    async def make_room(self, patience: float) -> None:
        """Wait until the sink takes more, dropping what no reader needs; readers that
        hold it `patience` seconds are cut."""
        while self.sink.full:
            self.sink.drop_before(self._slowest())
            if not self.sink.full:
                return
            held = self.sink.start
            try:
                async with asyncio.timeout(patience):
                    await self.until(partial(self._moved_past, held))
            except TimeoutError:
                await self._cut_slowest(held, patience)

    def _moved_past(self, held: int) -> bool:
        return self._slowest() > held

    def _slowest(self) -> int:
        needed = (p for p in self._positions.values() if p is not None)
        return min(needed, default=self.sink.written)

    async def _cut_slowest(self, held: int, patience: float) -> None:
        slowest = [r for r, p in self._positions.items() if p is not None and p <= held]
        for reader in slowest:
            self._positions[reader] = None
            self._cut.add(reader)
        log.warning(
            "%d reader(s) of uncached %s fell behind the others for %gs: cut",
            len(slowest),
            self.digest,
            patience,
        )
        await self._notify()

    def read(self, file: BinaryIO, size: int, offset: int) -> Span | bytes:
        return self.sink.read(file, size, offset)

    def readable(self, stop: int | None) -> int:
        """How far a reader may read now: never its last byte before verification."""
        if self.verified:
            return self.written if stop is None else stop
        held_back = self.written - 1 if stop is None else min(self.written, stop - 1)
        return max(held_back, 0)

    async def follow(self, reader: int, offset: int | None) -> None:
        """Where a reader is (None: it needs nothing more from the window), so the window
        keeps what it still needs."""
        if reader in self._cut:
            raise UpstreamError(
                f"this client read uncached {self.digest} too slowly for the others; cut"
            )
        self._positions[reader] = offset
        if self.sink.full:  # only then may the writer wait for readers to move
            await self._notify()

    async def leave(self, reader: int) -> None:
        self._positions.pop(reader, None)
        self._cut.discard(reader)
        await self._notify()

    async def until(self, ready: Callable[[], bool]) -> None:
        if ready():
            return
        self._waiting += 1
        try:
            async with self._changed:
                await self._changed.wait_for(ready)
        finally:
            self._waiting -= 1

    async def _notify(self) -> None:
        # Taking the lock, uncontended, never yields: a waiter counted here is waiting.
        if self._waiting:
            async with self._changed:
                self._changed.notify_all()

    async def grown(self, since: int) -> None:
        """Until more than `since` bytes are here, or the download is verified or over."""
        await self.until(lambda: self.written != since or self.verified or self.done)

    async def wait_started(self) -> int | None:
        """The source's declared length, once it answered; raises its error."""
        await self.until(lambda: self.started or self.done)
        if self.error is not None:
            raise self.error
        return self.length

    async def wait_verified(self) -> None:
        await self.until(lambda: self.verified or self.done)
        if self.error is not None:
            raise self.error

    async def wait_done(self) -> None:
        await self.until(lambda: self.done)
        if self.error is not None:
            raise self.error

    def open_reader(self) -> BlobReader:
        """Only while the fetch is running (its descriptor is open). The reader holds the
        window from byte 0 until it says where it reads: a reader added notifies nobody,
        as it lets nothing go on."""
        reader = BlobReader(self, os.dup(self._fd))
        self._positions[id(reader)] = 0
        return reader


class BlobReader:
    """One request's view of a `Fetch`, an async context manager: its own descriptor on
    the growing file, which keeps the blob held from eviction while open."""

    def __init__(self, fetch: Fetch, fd: int) -> None:
        self.fetch = fetch
        self._file: BinaryIO = os.fdopen(fd, "rb", buffering=0)

    async def __aenter__(self) -> BlobReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._file.close()
        await self.fetch.leave(id(self))

    async def chunks(self, byte_range: ByteRange | None) -> AsyncGenerator[Span | bytes, None]:
        """The bytes of `byte_range` (or the whole blob) as they arrive: spans of the file,
        or bytes from memory when passing through; raises on failure."""
        fetch, reader = self.fetch, id(self)
        offset = byte_range.start if byte_range else 0
        stop = byte_range.end + 1 if byte_range else fetch.length
        await fetch.follow(reader, offset)
        while stop is None or offset < stop:
            limit = fetch.readable(stop)
            if offset < limit:
                piece = fetch.read(self._file, limit - offset, offset)
                offset += piece.count if isinstance(piece, Span) else len(piece)
                yield piece
                await fetch.follow(reader, offset)
            elif fetch.error is not None:
                raise fetch.error
            elif fetch.verified:
                return
            elif stop is not None and offset == stop - 1 and fetch.written > offset:
                # Only the held-back last byte is left: set aside, it holds no window.
                last = fetch.read(self._file, 1, offset)
                await fetch.follow(reader, None)
                await fetch.wait_verified()
                yield last
                return
            else:
                await fetch.grown(fetch.written)
        await fetch.wait_verified()  # an empty answer, too, is complete only once verified
