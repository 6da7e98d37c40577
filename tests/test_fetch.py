"""The single-flight download (proxy/fetch.py, driven by BlobProxy) with in-memory sources,
without HTTP: joins, ranges, cuts and resumption, verification, pass-through, slow readers.

The cache is real (a temp directory, SQLite); the source is a byte string that can be
made to cut, to ignore offsets, to lie, and to go at a given pace.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import mirror_config

from mirror.errors import RegistryError, UpstreamCut
from mirror.proxy.blobs import BlobProxy
from mirror.proxy.fetch import BlobReader
from mirror.proxy.sinks import WINDOW_SIZE, Span
from mirror.reference import ByteRange, Digest, parse_digest
from mirror.storage.blobs import BlobStore
from mirror.storage.budget import Budget
from mirror.storage.cache import Cache as StoredCache
from mirror.storage.index import INDEX_FILE, Index

KIB, MIB = 1024, 1024 * 1024
CHUNK = 64 * KIB


@dataclass
class MemoryBody:
    start: int
    length: int | None
    data: bytes
    cut_at: int | None  # blob offset where the connection breaks
    pace: float
    sent: Callable[[int], None]  # told of every chunk sent

    async def chunks(self) -> AsyncIterator[bytes]:
        offset = self.start
        while offset < len(self.data):
            end = min(offset + CHUNK, len(self.data))
            if self.cut_at is not None and end > self.cut_at:
                if self.cut_at > offset:
                    self.sent(self.cut_at - offset)
                    yield self.data[offset : self.cut_at]
                raise UpstreamCut("cut")
            self.sent(end - offset)
            yield self.data[offset:end]
            offset = end
            await asyncio.sleep(self.pace)


@dataclass
class MemorySource:
    """A blob from memory; `cuts` are blob offsets where successive bodies break."""

    data: bytes
    name: str = "memory"
    retries: int = 3
    patience: float = 5.0
    shared: bool = False
    cuts: list[int] = field(default_factory=list)
    honours_offset: bool = True
    declares_length: bool = True
    pace: float = 0.0  # seconds between chunks
    opened: list[int] = field(default_factory=list)  # the offset each body was asked from
    sent: int = 0  # bytes of all bodies sent

    @asynccontextmanager
    async def body(self, digest: Digest, offset: int) -> AsyncIterator[MemoryBody]:
        self.opened.append(offset)
        start = offset if self.honours_offset else 0
        cut = self.cuts.pop(0) if self.cuts else None
        length = len(self.data) if self.declares_length else None
        yield MemoryBody(start, length, self.data, cut, self.pace, self._sent)

    def _sent(self, count: int) -> None:
        self.sent += count


@dataclass
class Cache:
    proxy: BlobProxy
    store: BlobStore
    index: Index

    def cached(self, digest: Digest) -> bytes | None:
        path = self.store.path(digest)
        return path.read_bytes() if path.exists() else None


Cached = Callable[..., Awaitable[Cache]]


@pytest.fixture
async def make_cache(tmp_path: Path) -> AsyncIterator[Cached]:
    opened: list[Index] = []

    async def make(max_size: int = 1024 * MIB) -> Cache:
        storage = tmp_path / f"cache{len(opened)}"
        config = mirror_config(storage, "http://127.0.0.1:9", budget={"max_size": max_size})
        store = BlobStore(storage)
        store.open()
        index = Index(storage / INDEX_FILE)
        await index.open()
        opened.append(index)
        return Cache(
            BlobProxy(StoredCache(store, index), Budget(config.storage, index), {}), store, index
        )

    yield make
    for index in opened:
        await index.close()


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


async def collect(reader: BlobReader, byte_range: ByteRange | None = None) -> bytes:
    """What a client would receive: spans read from the reader's file, or memory."""
    received = bytearray()
    async with reader:
        async for piece in reader.chunks(byte_range):
            if isinstance(piece, Span):
                received += os.pread(piece.file.fileno(), piece.count, piece.offset)
            else:
                received += piece
    return bytes(received)


async def test_readers_joined_at_any_moment_get_the_whole_blob_from_one_download(
    make_cache: Cached,
) -> None:
    data = os.urandom(2 * MIB + 7)
    digest = digest_of(data)
    source = MemorySource(data, pace=0.001)
    cache = await make_cache()

    async def late(delay: float) -> bytes:
        await asyncio.sleep(delay)
        return await collect(cache.proxy.download(source, digest, private=False))

    bodies = await asyncio.gather(*(late(d) for d in (0, 0, 0.005, 0.01, 0.02)))
    assert bodies == [data] * 5
    await cache.proxy.idle()
    assert source.opened == [0]  # one download, however many joined
    assert cache.cached(digest) == data


@pytest.mark.parametrize("pass_through", [False, True], ids=["file", "window"])
async def test_ranges_hold_exactly_their_bytes(make_cache: Cached, pass_through: bool) -> None:
    data = os.urandom(3 * WINDOW_SIZE + 11)
    size = len(data)
    digest = digest_of(data)
    source = MemorySource(data, pace=0.0005)
    cache = await make_cache(max_size=MIB if pass_through else 1024 * MIB)
    ranges = [
        ByteRange(0, 0),
        ByteRange(0, 99),
        ByteRange(5 * MIB, 5 * MIB + 99),
        ByteRange(size - 100, size - 1),  # far beyond what has arrived when it asks
        ByteRange(2 * WINDOW_SIZE, size - 1),
    ]
    readers = [cache.proxy.download(source, digest, private=False) for _ in ranges]
    whole = cache.proxy.download(source, digest, private=False)
    got = await asyncio.wait_for(
        asyncio.gather(
            collect(whole), *(collect(r, br) for r, br in zip(readers, ranges, strict=True))
        ),
        30,
    )
    assert got[0] == data
    for byte_range, body in zip(ranges, got[1:], strict=True):
        assert body == data[byte_range.start : byte_range.end + 1], byte_range
    await cache.proxy.idle()
    assert source.opened == [0]
    assert (cache.cached(digest) is None) == pass_through


@pytest.mark.parametrize("honours_offset", [True, False], ids=["range", "restart"])
async def test_a_cut_body_is_resumed_from_where_it_stopped(
    make_cache: Cached, honours_offset: bool
) -> None:
    data = os.urandom(MIB + 5)
    digest = digest_of(data)
    source = MemorySource(data, cuts=[300 * KIB, 700 * KIB], honours_offset=honours_offset)
    cache = await make_cache()
    assert await collect(cache.proxy.download(source, digest, private=False)) == data
    await cache.proxy.idle()
    assert source.opened == [0, 300 * KIB, 700 * KIB]
    assert cache.cached(digest) == data


async def test_cuts_past_the_retries_fail_every_reader_and_cache_nothing(
    make_cache: Cached,
) -> None:
    data = os.urandom(MIB)
    digest = digest_of(data)
    source = MemorySource(data, retries=1, cuts=[100 * KIB, 200 * KIB])
    cache = await make_cache()
    readers = [cache.proxy.download(source, digest, private=False) for _ in range(3)]
    for outcome in await asyncio.gather(*(collect(r) for r in readers), return_exceptions=True):
        assert isinstance(outcome, UpstreamCut)
    await cache.proxy.idle()
    assert cache.cached(digest) is None
    assert list(cache.store.tmp.iterdir()) == []


@pytest.mark.parametrize("declares_length", [True, False], ids=["length", "no-length"])
async def test_bytes_that_do_not_match_the_digest_never_complete_an_answer(
    make_cache: Cached, declares_length: bool
) -> None:
    data = os.urandom(MIB)
    digest = digest_of(data)
    lie = data[:-1] + bytes([data[-1] ^ 1])
    source = MemorySource(lie, declares_length=declares_length)
    cache = await make_cache()
    received = bytearray()
    reader = cache.proxy.download(source, digest, private=False)
    with pytest.raises(RegistryError, match="hashing to"):
        async with reader:
            async for piece in reader.chunks(None):
                assert isinstance(piece, Span)
                received += os.pread(piece.file.fileno(), piece.count, piece.offset)
    assert len(received) < len(data)  # the last byte was held back
    await cache.proxy.idle()
    assert cache.cached(digest) is None


async def test_a_blob_of_undeclared_length_passes_through_when_the_room_runs_out(
    make_cache: Cached,
) -> None:
    data = os.urandom(6 * MIB + 1)
    digest = digest_of(data)
    source = MemorySource(data, declares_length=False, pace=0.0005)
    cache = await make_cache(max_size=3 * MIB)
    readers = [cache.proxy.download(source, digest, private=False) for _ in range(2)]
    assert await asyncio.gather(*(collect(r) for r in readers)) == [data, data]
    await cache.proxy.idle()
    assert cache.cached(digest) is None
    assert source.opened == [0]


async def test_a_reader_that_stops_reading_is_cut_and_the_others_finish(
    make_cache: Cached,
) -> None:
    data = os.urandom(4 * WINDOW_SIZE)
    digest = digest_of(data)
    source = MemorySource(data, patience=0.2)
    cache = await make_cache(max_size=MIB)  # passes through
    stuck = cache.proxy.download(source, digest, private=False)
    others = [cache.proxy.download(source, digest, private=False) for _ in range(2)]
    async with stuck:
        pieces = stuck.chunks(None)
        await anext(pieces)  # then reads nothing more, as a client that stopped
        bodies = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in others)), 30)
        assert bodies == [data, data]
        with pytest.raises(RegistryError, match="too slowly"):
            async for _ in pieces:
                pass
    await cache.proxy.idle()
    assert cache.cached(digest) is None


async def test_when_every_reader_of_an_uncached_blob_leaves_the_download_stops(
    make_cache: Cached,
) -> None:
    data = os.urandom(4 * WINDOW_SIZE)
    digest = digest_of(data)
    source = MemorySource(data, pace=0.001)
    cache = await make_cache(max_size=MIB)
    reader = cache.proxy.download(source, digest, private=False)
    async with reader:
        await anext(reader.chunks(None))
    await asyncio.wait_for(cache.proxy.idle(), 10)
    assert source.sent < len(data)  # stopped, not read to the end for nobody
