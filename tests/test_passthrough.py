"""Blobs that do not fit the budget pass through uncached, from a bounded memory window:
every reader still gets exactly its bytes, and every download ends and frees its slot.

Real `mirror serve` over a real docker-registry, with a budget smaller than the blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import MirrorProcess, downloads_stored
from fake_upstream import FakeUpstream
from upstream_registry import RegistryProcess, put_blob

from mirror.reference import parse_digest
from mirror.storage.blobs import BlobStore

MirrorClient = TestClient[web.Request, web.Application]
MakeMirror = Callable[..., Any]

MIB = 1024 * 1024
SIZE = 12 * MIB + 12345  # three times the 4 MiB window, not a multiple of any chunk
TIMEOUT = aiohttp.ClientTimeout(total=60)


async def uploaded(registry: RegistryProcess, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with aiohttp.ClientSession() as session:
        await put_blob(session, registry.url, "big", digest, io.BytesIO(data))
    return digest


async def get(
    mirror: MirrorProcess, digest: str, headers: dict[str, str] | None = None, pause: float = 0
) -> tuple[int, bytes]:
    """Status and body, read in 256 KiB pieces with `pause` seconds between them."""
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(f"{mirror.url}/v2/big/blobs/{digest}", headers=headers) as resp,
    ):
        body = bytearray()
        async for piece in resp.content.iter_chunked(256 * 1024):
            body += piece
            await asyncio.sleep(pause)
        return resp.status, bytes(body)


async def in_flight(mirror: MirrorProcess) -> float:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(f"{mirror.url}/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("mirror_fetches_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no mirror_fetches_in_flight in /metrics")


async def settled(mirror: MirrorProcess, within: float = 10.0) -> None:
    """Every download ended (and gave its upstream slot back) within `within` seconds."""
    deadline = time.monotonic() + within
    while await in_flight(mirror) != 0:
        assert time.monotonic() < deadline, "a pass-through download never ended"
        await asyncio.sleep(0.1)


@pytest.fixture
def small_mirror(
    registry: RegistryProcess, start_mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> Callable[..., MirrorProcess]:
    """`mirror serve` over `registry`, with a 2 MiB budget: the blob passes through."""

    def start(idle: float = 60.0, max_fetches: int = 2) -> MirrorProcess:
        config = tmp_path / "mirror.yaml"
        config.write_text(
            f"storage: {{path: {tmp_path / 'cache'}, max_size: 2MiB}}\n"
            "upstreams:\n"
            f"  - {{name: up, url: {registry.url}, default: true,"
            f" max_fetches: {max_fetches}, timeouts: {{idle: {idle}}}}}\n"
        )
        return start_mirror_process("--config", str(config))

    return start


async def test_ranges_and_late_readers_of_an_uncached_blob_get_exactly_their_bytes(
    registry: RegistryProcess, small_mirror: Callable[..., MirrorProcess]
) -> None:
    data = os.urandom(SIZE)
    digest = await uploaded(registry, data)
    mirror = small_mirror()
    ranges = {
        "bytes=0-99": data[:100],  # its last byte is held back until the digest matches
        "bytes=6000000-6000099": data[6_000_000:6_000_100],
        f"bytes={SIZE - 5 * MIB}-": data[SIZE - 5 * MIB :],
        "bytes=-100": data[-100:],  # starts far beyond what has arrived
    }

    async def late_full_reader() -> tuple[int, bytes]:
        await asyncio.sleep(0.05)
        return await get(mirror, digest)

    answers = await asyncio.wait_for(
        asyncio.gather(
            get(mirror, digest, pause=0.002),
            late_full_reader(),
            *(get(mirror, digest, {"Range": r}) for r in ranges),
        ),
        timeout=60,
    )
    assert answers[0] == (200, data)
    assert answers[1][1] == data  # joined or served by a download of its own: whole
    for (status, body), expected in zip(answers[2:], ranges.values(), strict=True):
        assert (status, len(body)) == (206, len(expected))
        assert body == expected
    await settled(mirror)
    assert not list((Path(mirror.log_path).parent / "cache" / "blobs").rglob("*"))


async def test_uncached_downloads_end_and_free_their_slots(
    registry: RegistryProcess, small_mirror: Callable[..., MirrorProcess]
) -> None:
    """With 2 fetch slots, ranges that once held the window forever wedged the upstream."""
    data = os.urandom(SIZE)
    digest = await uploaded(registry, data)
    mirror = small_mirror(max_fetches=2)
    for _ in range(3):
        status, body = await asyncio.wait_for(
            get(mirror, digest, {"Range": "bytes=10-19"}), timeout=30
        )
        assert (status, body) == (206, data[10:20])
    await settled(mirror)
    assert (await asyncio.wait_for(get(mirror, digest), timeout=30)) == (200, data)
    await settled(mirror)


async def test_a_reader_that_stops_reading_cannot_stall_the_others(
    registry: RegistryProcess, small_mirror: Callable[..., MirrorProcess]
) -> None:
    """A client that keeps its connection but reads nothing is cut once the window has
    waited for it for the upstream's idle timeout; the others get the whole blob."""
    data = os.urandom(2 * SIZE)  # more than socket buffers can swallow for the idle reader
    digest = await uploaded(registry, data)
    mirror = small_mirror(idle=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
    writer.write(f"GET /v2/big/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")  # headers arrived; then it reads nothing at all
    try:
        assert await asyncio.wait_for(get(mirror, digest), timeout=30) == (200, data)
        await settled(mirror)
    finally:
        writer.close()
    assert "fell behind" in mirror.log()


def blob_path(storage: Path, digest: str) -> Path:
    return BlobStore(storage).path(parse_digest(digest))


# --- blobs of undeclared length (no Content-Length): only the fake upstream sends them ----


@pytest.fixture
def chunked_upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.blobs.chunked = True
    return fake_upstream


async def pull(mirror: MirrorClient, digest: str) -> tuple[int, bytes]:
    async with asyncio.timeout(30), mirror.get(f"/v2/x/blobs/{digest}") as response:
        return response.status, await response.read()


async def test_an_undeclared_length_blob_larger_than_the_room_passes_through(
    chunked_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """It outgrows what the budget can reserve mid-way: the rest passes through (it was
    cut at that point on every try)."""
    data = os.urandom(20 * MIB + 1)  # larger than the budget, reserved as it arrives
    digest = chunked_upstream.blobs.put(data)
    storage = tmp_path / "cache"
    mirror = await make_mirror(chunked_upstream.url, storage=storage, budget={"max_size": 20 * MIB})
    for _ in range(2):
        assert await pull(mirror, digest) == (200, data)
    await downloads_stored(mirror)
    assert not list((storage / "blobs").rglob("*"))
    assert chunked_upstream.count("GET", digest) == 2  # nothing cached: fetched each time


async def test_concurrent_undeclared_length_blobs_do_not_crowd_each_other_out(
    chunked_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """Three 1 MiB blobs without a length, at once, in an 8 MiB budget: all cached (each
    reserved 16 MiB up front once, so each passed through)."""
    blobs = {chunked_upstream.blobs.put(os.urandom(MIB + n)): n for n in range(3)}
    storage = tmp_path / "cache"
    mirror = await make_mirror(chunked_upstream.url, storage=storage, budget={"max_size": 8 * MIB})
    answers = await asyncio.gather(*(pull(mirror, digest) for digest in blobs))
    assert [status for status, _ in answers] == [200] * 3
    await downloads_stored(mirror)
    for digest in blobs:
        assert blob_path(storage, digest).exists(), digest
