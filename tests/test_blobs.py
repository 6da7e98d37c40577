"""The blob pull-through path, against the fake upstream, which misbehaves on purpose.

A real registry cannot be slow on demand, send wrong bytes, lie in `Content-Length` or drop
the connection mid-body; the fake (a real aiohttp server on 127.0.0.1, port 0) can, and it
records every request, which is how single-flight (one upstream GET per blob however many
clients ask) is proved.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import downloads_stored
from fake_upstream import CDN, FakeUpstream, Serve
from upstream_registry import free_loopback_port

from mirror.proxy.blobs import BlobProxy
from mirror.reference import Digest
from mirror.storage.blobs import BlobWriter
from mirror.web.registry import BLOBS

MirrorClient = TestClient[web.Request, web.Application]
MakeMirror = Callable[..., Awaitable[MirrorClient]]

MiB = 1024 * 1024
REPO = "library/blobtest"
GATE_TIMEOUT = 20.0
PULL_TIMEOUT = 30.0  # a hung mirror fails the test instead of stalling the run


@dataclass(frozen=True)
class Blob:
    data: bytes

    @property
    def hex(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def digest(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def path(self) -> str:
        return f"/v2/{REPO}/blobs/{self.digest}"


def make_blob(size: int) -> Blob:
    return Blob(os.urandom(size))


def add(upstream: FakeUpstream, blob: Blob) -> Blob:
    upstream.blobs.put(blob.data)
    return blob


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def cached_path(storage: Path, blob: Blob) -> Path:
    return storage / "blobs" / "sha256" / blob.hex[:2] / blob.hex


def temp_files(storage: Path) -> list[Path]:
    return sorted((storage / "tmp").iterdir())


def cached_files(storage: Path) -> list[Path]:
    root = storage / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def blob_proxy(client: MirrorClient) -> BlobProxy:
    app = client.app
    assert app is not None
    return app[BLOBS]


async def assert_nothing_cached(client: MirrorClient, storage: Path, blob: Blob) -> None:
    assert cached_files(storage) == []
    assert temp_files(storage) == []
    proxy = blob_proxy(client)
    assert await proxy.cache.index.blob(Digest("sha256", blob.hex)) is None


async def wait_for_file(path: Path) -> None:
    """Until `path` exists (a download finishing in the background); at most 10 s."""
    for _ in range(500):
        if await asyncio.to_thread(path.exists):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} did not appear in 10 s")


# --- lies, told by storing other bytes under a blob's digest, or by cutting it -------------

Liar = Callable[[FakeUpstream, Blob], None]


def wrong(data: bytes) -> bytes:
    """The right length, the wrong content (only the last byte differs)."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def declares_more(upstream: FakeUpstream, blob: Blob) -> None:
    """Declares the whole length, sends half, then drops the connection."""
    upstream.blobs.drop_after, upstream.blobs.drops = len(blob.data) // 2, 1


def declares_less(upstream: FakeUpstream, blob: Blob) -> None:
    """Declares fewer bytes than the blob has: the right bytes, cut at the declared length."""
    upstream.blobs.data[blob.digest] = blob.data[:-1000]


# --- clients ------------------------------------------------------------------------------


@dataclass
class Pulled:
    status: int
    headers: dict[str, str]
    body: bytes
    first_chunk_at: float | None

    @property
    def sha256(self) -> str:
        return f"sha256:{hashlib.sha256(self.body).hexdigest()}"


async def pull(client: MirrorClient, path: str, headers: dict[str, str] | None = None) -> Pulled:
    async with asyncio.timeout(PULL_TIMEOUT), client.get(path, headers=headers) as resp:
        parts: list[bytes] = []
        first_chunk_at: float | None = None
        async for chunk in resp.content.iter_any():
            if first_chunk_at is None:
                first_chunk_at = time.monotonic()
            parts.append(chunk)
        return Pulled(resp.status, dict(resp.headers), b"".join(parts), first_chunk_at)


async def pull_cut(client: MirrorClient, path: str) -> tuple[int, int, int | None]:
    """A GET whose body must be cut: (status, bytes received, declared length)."""
    received = 0
    async with asyncio.timeout(PULL_TIMEOUT), client.get(path) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += len(chunk)
        return resp.status, received, resp.content_length


def oci_error(body: bytes) -> dict[str, Any]:
    document = json.loads(body)
    assert isinstance(document, dict)
    (error,) = document["errors"]
    assert isinstance(error, dict)
    return error


# --- 1. single-flight ---------------------------------------------------------------------


async def test_concurrent_gets_share_one_upstream_fetch_and_stream_early(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(32 * MiB))
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = MiB, 0.04
    client = await make_mirror(fake_upstream.url, storage=storage)

    pulls = await asyncio.gather(*(pull(client, blob.path) for _ in range(8)))

    assert fake_upstream.count("GET", blob.digest) == 1
    last_piece_at = fake_upstream.blobs.last_piece_at
    assert last_piece_at is not None
    for pulled in pulls:
        assert pulled.status == 200
        assert pulled.headers["Content-Length"] == str(len(blob.data))
        assert pulled.headers["Docker-Content-Digest"] == blob.digest
        assert pulled.sha256 == blob.digest
        assert pulled.first_chunk_at is not None
        assert pulled.first_chunk_at < last_piece_at, "client waited for the whole blob"

    await wait_for_file(cached_path(storage, blob))
    assert cached_path(storage, blob).read_bytes() == blob.data
    ninth = await pull(client, blob.path)
    assert (ninth.status, ninth.sha256) == (200, blob.digest)
    assert fake_upstream.count("GET") == 1
    assert fake_upstream.count("HEAD") == 0


# --- 2. wrong bytes -----------------------------------------------------------------------


async def test_wrong_bytes_cut_the_client_and_are_not_cached(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(3 * MiB + 17))
    fake_upstream.blobs.data[blob.digest] = wrong(blob.data)
    client = await make_mirror(fake_upstream.url, storage=storage)

    status, received, declared = await pull_cut(client, blob.path)
    assert (status, declared) == (200, len(blob.data))
    assert received < len(blob.data)
    await assert_nothing_cached(client, storage, blob)
    fake_upstream.blobs.data[blob.digest] = blob.data  # the truth from now on

    # Not remembered as good or bad: the next request asks the upstream again.
    again = await pull(client, blob.path)
    assert (again.status, again.sha256) == (200, blob.digest)
    assert fake_upstream.count("GET", blob.digest) == 2
    await wait_for_file(cached_path(storage, blob))
    assert cached_path(storage, blob).read_bytes() == blob.data


async def test_wrong_bytes_that_come_in_one_read_cut_the_client(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    """The whole blob in one write of the upstream, so likely one read of the mirror (its
    chunks are up to 1 MiB): the last byte still waits for the digest."""
    blob = add(fake_upstream, make_blob(700 * 1024))
    fake_upstream.blobs.data[blob.digest] = wrong(blob.data)
    fake_upstream.blobs.piece = len(blob.data)
    client = await make_mirror(fake_upstream.url, storage=storage)

    status, received, declared = await pull_cut(client, blob.path)
    assert (status, declared) == (200, len(blob.data))
    assert received < len(blob.data)
    await assert_nothing_cached(client, storage, blob)


# --- 3. lying Content-Length --------------------------------------------------------------


@pytest.mark.parametrize(
    "liar", [declares_more, declares_less], ids=["declares-more", "declares-less"]
)
async def test_lying_content_length_is_never_served_complete_nor_cached(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path, liar: Liar
) -> None:
    blob = add(fake_upstream, make_blob(2 * MiB + 5))
    liar(fake_upstream, blob)
    # Without resumption (test_faults.py resumes a cut body).
    client = await make_mirror(fake_upstream.url, storage=storage, upstream={"retries": 0})

    async with asyncio.timeout(PULL_TIMEOUT), client.get(blob.path) as resp:
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
    # Whatever arrived is a strict prefix of the blob: never complete, never wrong content
    # presented as complete.
    assert len(received) < len(blob.data)
    assert blob.data.startswith(bytes(received))
    await assert_nothing_cached(client, storage, blob)
    fake_upstream.blobs.data[blob.digest] = blob.data  # the truth from now on

    again = await pull(client, blob.path)
    assert (again.status, again.sha256) == (200, blob.digest)
    assert fake_upstream.count("GET", blob.digest) == 2


async def test_chunked_upstream_without_length_is_served_and_cached(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(MiB + 3))
    fake_upstream.blobs.chunked = True
    client = await make_mirror(fake_upstream.url, storage=storage)

    pulled = await pull(client, blob.path)
    assert (pulled.status, pulled.sha256) == (200, blob.digest)
    await wait_for_file(cached_path(storage, blob))
    assert cached_path(storage, blob).read_bytes() == blob.data
    assert fake_upstream.count("GET") == 1


async def test_range_of_a_chunked_upstream_blob_is_answered_whole_until_cached(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    """Without a declared length a range cannot be placed while the blob streams: the
    whole blob, 200 (as a server may answer any Range); once cached, ranges work."""
    blob = add(fake_upstream, make_blob(MiB + 3))
    fake_upstream.blobs.chunked = True
    client = await make_mirror(fake_upstream.url, storage=storage)

    whole = await pull(client, blob.path, {"Range": "bytes=-3"})
    assert (whole.status, whole.sha256) == (200, blob.digest)
    await downloads_stored(client)
    ranged = await pull(client, blob.path, {"Range": "bytes=-3"})
    assert ranged.status == 206
    assert ranged.body == blob.data[-3:]
    assert ranged.headers["Content-Range"] == f"bytes {MiB}-{MiB + 2}/{MiB + 3}"
    assert fake_upstream.count("GET") == 1


async def test_chunked_upstream_with_wrong_bytes_cuts_the_client(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(MiB + 3))
    fake_upstream.blobs.chunked = True
    fake_upstream.blobs.data[blob.digest] = wrong(blob.data)
    client = await make_mirror(fake_upstream.url, storage=storage)

    status, received, declared = await pull_cut(client, blob.path)
    assert (status, declared) == (200, None)
    assert received < len(blob.data)
    await assert_nothing_cached(client, storage, blob)


async def test_empty_blob_is_served_and_cached(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, Blob(b""))
    client = await make_mirror(fake_upstream.url, storage=storage)

    for _ in range(2):  # a miss, then a hit
        pulled = await pull(client, blob.path)
        assert (pulled.status, pulled.body) == (200, b"")
        assert pulled.headers["Content-Length"] == "0"
        assert pulled.headers["Docker-Content-Digest"] == blob.digest
    await wait_for_file(cached_path(storage, blob))
    assert cached_path(storage, blob).read_bytes() == b""
    assert fake_upstream.count("GET") == 1


async def test_redirect_to_a_cdn_is_followed_once(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path, serve: Serve
) -> None:
    """Like Docker Hub and ECR: the registry answers 307 to a storage host on another origin."""
    blob = add(fake_upstream, make_blob(MiB + 99))
    cdn = await serve(CDN(fake_upstream.blobs))
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = 256 * 1024, 0.01
    fake_upstream.blob_redirect = f"http://127.0.0.1:{cdn.port}/blobs"
    client = await make_mirror(fake_upstream.url, storage=storage)

    pulls = await asyncio.gather(*(pull(client, blob.path) for _ in range(3)))
    assert [(p.status, p.sha256) for p in pulls] == [(200, blob.digest)] * 3
    assert fake_upstream.count("GET") == 1
    assert [s.authorization for s in cdn.seen] == [None]
    await wait_for_file(cached_path(storage, blob))
    assert cached_path(storage, blob).read_bytes() == blob.data


# --- 4. a client that goes away -----------------------------------------------------------


async def test_client_disconnect_does_not_stop_the_download(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    storage: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blob = add(fake_upstream, make_blob(4 * MiB))
    fake_upstream.blobs.stall_after, fake_upstream.blobs.stalls = MiB, 1
    fake_upstream.blobs.resume = True
    client = await make_mirror(fake_upstream.url, storage=storage)

    with caplog.at_level(logging.WARNING):
        async with asyncio.timeout(PULL_TIMEOUT), client.get(blob.path) as resp:
            assert resp.status == 200
            first = await resp.content.readany()
            assert first and blob.data.startswith(first)
            resp.close()  # drops the connection mid-body
        await asyncio.sleep(0.1)
        assert not cached_path(storage, blob).exists()
        fake_upstream.release.set()

        await wait_for_file(cached_path(storage, blob))
        later = await pull(client, blob.path)
    assert (later.status, later.sha256) == (200, blob.digest)
    assert fake_upstream.count("GET") == 1
    assert cached_path(storage, blob).read_bytes() == blob.data
    assert temp_files(storage) == []
    # A client hanging up is ordinary, not an internal error of the mirror.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- 5. Range -----------------------------------------------------------------------------


async def test_range_on_a_miss_serves_the_range_and_caches_the_whole_blob(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(MiB + 1234))
    size = len(blob.data)
    client = await make_mirror(fake_upstream.url, storage=storage)

    ranged = await pull(client, blob.path, {"Range": "bytes=100-199"})
    assert ranged.status == 206
    assert ranged.body == blob.data[100:200]
    assert ranged.headers["Content-Range"] == f"bytes 100-199/{size}"
    assert ranged.headers["Content-Length"] == "100"
    assert ranged.headers["Docker-Content-Digest"] == blob.digest

    await wait_for_file(cached_path(storage, blob))
    assert cached_path(storage, blob).read_bytes() == blob.data
    full = await pull(client, blob.path)
    assert (full.status, full.sha256) == (200, blob.digest)
    assert fake_upstream.count("GET") == 1


async def test_unsatisfiable_range_on_a_miss_is_416(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(4096))
    client = await make_mirror(fake_upstream.url, storage=storage)

    answer = await pull(client, blob.path, {"Range": "bytes=5000-6000"})
    assert answer.status == 416
    assert oci_error(answer.body)["code"] == "RANGE_INVALID"
    assert answer.headers["Content-Range"] == "bytes */4096"

    # The one fetch the miss started is still the only one.
    full = await pull(client, blob.path)
    assert (full.status, full.sha256) == (200, blob.digest)
    assert fake_upstream.count("GET") == 1


async def test_range_on_a_hit_is_served_from_the_file(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(100_000))
    size = len(blob.data)
    client = await make_mirror(fake_upstream.url, storage=storage)
    assert (await pull(client, blob.path)).sha256 == blob.digest
    await wait_for_file(cached_path(storage, blob))

    middle = await pull(client, blob.path, {"Range": "bytes=100-199"})
    assert middle.status == 206
    assert middle.body == blob.data[100:200]
    assert middle.headers["Content-Range"] == f"bytes 100-199/{size}"
    assert middle.headers["Docker-Content-Digest"] == blob.digest

    suffix = await pull(client, blob.path, {"Range": "bytes=-10"})
    assert suffix.status == 206
    assert suffix.body == blob.data[-10:]
    assert suffix.headers["Content-Range"] == f"bytes {size - 10}-{size - 1}/{size}"

    bad = await pull(client, blob.path, {"Range": f"bytes={size}-"})
    assert bad.status == 416
    assert oci_error(bad.body)["code"] == "RANGE_INVALID"
    assert fake_upstream.count("GET") == 1


# --- 6. HEAD ------------------------------------------------------------------------------


async def test_head_on_a_miss_asks_upstream_head_and_downloads_nothing(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(123_456))
    client = await make_mirror(fake_upstream.url, storage=storage)

    async with asyncio.timeout(PULL_TIMEOUT), client.head(blob.path) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(blob.data))
        assert resp.headers["Docker-Content-Digest"] == blob.digest
        assert await resp.read() == b""

    await asyncio.sleep(0.1)
    assert [(s.method, s.path) for s in fake_upstream.seen] == [("HEAD", blob.path)]
    assert blob_proxy(client)._fetches == {}
    await assert_nothing_cached(client, storage, blob)


async def test_head_on_a_hit_needs_no_upstream(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(5000))
    client = await make_mirror(fake_upstream.url, storage=storage)
    assert (await pull(client, blob.path)).sha256 == blob.digest

    async with asyncio.timeout(PULL_TIMEOUT), client.head(blob.path) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "5000"
        assert resp.headers["Docker-Content-Digest"] == blob.digest
    assert [(s.method, s.path) for s in fake_upstream.seen] == [("GET", blob.path)]


async def test_head_on_an_unknown_blob_is_404(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = make_blob(10)  # not held by the upstream
    client = await make_mirror(fake_upstream.url, storage=storage)

    async with asyncio.timeout(PULL_TIMEOUT), client.head(blob.path) as resp:
        assert resp.status == 404
        assert await resp.read() == b""
    assert [(s.method, s.path) for s in fake_upstream.seen] == [("HEAD", blob.path)]
    await assert_nothing_cached(client, storage, blob)


# --- 7. upstream errors -------------------------------------------------------------------


async def test_upstream_404_is_blob_unknown(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = make_blob(10)  # not held by the upstream
    client = await make_mirror(fake_upstream.url, storage=storage)

    answer = await pull(client, blob.path)
    assert answer.status == 404
    assert oci_error(answer.body)["code"] == "BLOB_UNKNOWN"
    assert fake_upstream.count("GET", blob.digest) == 1
    await assert_nothing_cached(client, storage, blob)


@pytest.mark.parametrize(
    ("status", "headers", "expected_status", "expected_code"),
    [
        (500, {}, 502, "UPSTREAM_ERROR"),
        (503, {}, 502, "UPSTREAM_ERROR"),
        (429, {"Retry-After": "7"}, 429, "TOOMANYREQUESTS"),
    ],
    ids=["500", "503", "429"],
)
async def test_upstream_error_statuses_are_mapped(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    storage: Path,
    status: int,
    headers: dict[str, str],
    expected_status: int,
    expected_code: str,
) -> None:
    blob = add(fake_upstream, make_blob(1000))
    fake_upstream.fail(status, headers)  # without retries: they would hide it
    client = await make_mirror(fake_upstream.url, storage=storage, upstream={"retries": 0})

    answer = await pull(client, blob.path)
    assert answer.status == expected_status
    assert oci_error(answer.body)["code"] == expected_code
    if status == 429:
        assert answer.headers["Retry-After"] == "7"
    await assert_nothing_cached(client, storage, blob)
    fake_upstream.mode = "ok"  # well again

    # Failures are not remembered: the next request tries again, and succeeds.
    again = await pull(client, blob.path)
    assert (again.status, again.sha256) == (200, blob.digest)
    assert fake_upstream.count("GET", blob.digest) == 2


async def test_unreachable_upstream_is_502(make_mirror: MakeMirror, storage: Path) -> None:
    blob = make_blob(10)
    client = await make_mirror(f"http://127.0.0.1:{free_loopback_port()}", storage=storage)

    answer = await pull(client, blob.path)
    assert answer.status == 502
    error = oci_error(answer.body)
    assert "unreachable" in error["message"]
    await assert_nothing_cached(client, storage, blob)

    async with asyncio.timeout(PULL_TIMEOUT), client.head(blob.path) as resp:
        assert resp.status == 502


# --- 8. bounded memory --------------------------------------------------------------------


async def test_memory_stays_bounded_with_a_stalled_client(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    storage: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Structural, not timing: writes are bounded, readers use sendfile, and the peak of
    Python allocations during a 32 MiB fetch served to four clients (one of which stops
    reading until the download is over) stays far below the blob's size."""
    blob = add(fake_upstream, make_blob(32 * MiB))
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = MiB, 0.005
    client = await make_mirror(fake_upstream.url, storage=storage)

    reads: list[int] = []
    writes: list[int] = []
    real_pread, real_write = os.pread, BlobWriter.write

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    def write(self: BlobWriter, chunk: bytes) -> None:
        writes.append(len(chunk))
        real_write(self, chunk)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(BlobWriter, "write", write)

    fast_done = asyncio.Event()

    async def stalled() -> str:
        digest = hashlib.sha256()
        async with asyncio.timeout(PULL_TIMEOUT), client.get(blob.path) as resp:
            digest.update(await resp.content.readany())
            await asyncio.wait_for(fast_done.wait(), GATE_TIMEOUT)
            await wait_for_file(cached_path(storage, blob))  # the download is over
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"

    async def fast() -> str:
        digest = hashlib.sha256()
        async with asyncio.timeout(PULL_TIMEOUT), client.get(blob.path) as resp:
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"

    tracemalloc.start()
    try:
        stalled_task = asyncio.create_task(stalled())
        assert list(await asyncio.gather(fast(), fast(), fast())) == [blob.digest] * 3
        fast_done.set()
        assert await stalled_task == blob.digest
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert fake_upstream.count("GET") == 1
    assert reads == []  # every reader was served with sendfile, not through Python's memory
    assert max(writes) <= MiB
    assert peak < 8 * MiB, f"peak traced memory {peak / MiB:.1f} MiB for a 32 MiB blob"


# --- 9. the digest path appears only when complete ----------------------------------------


async def test_a_client_gets_its_last_byte_before_the_blob_is_committed(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    storage: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blob = add(fake_upstream, make_blob(MiB))
    client = await make_mirror(fake_upstream.url, storage=storage)
    committing = threading.Event()
    real_commit = BlobWriter.commit

    def held_commit(self: BlobWriter) -> Path:  # the fsync of a big blob, made endless
        committing.wait(PULL_TIMEOUT)
        return real_commit(self)

    monkeypatch.setattr(BlobWriter, "commit", held_commit)
    try:
        pulled = await pull(client, blob.path)
        assert (pulled.status, pulled.sha256) == (200, blob.digest)
        assert not cached_path(storage, blob).exists()
    finally:
        committing.set()
    await wait_for_file(cached_path(storage, blob))


async def test_blob_is_visible_under_its_digest_only_when_complete(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blob = add(fake_upstream, make_blob(2 * MiB))
    fake_upstream.blobs.stall_after, fake_upstream.blobs.stalls = MiB, 1
    fake_upstream.blobs.resume = True
    client = await make_mirror(fake_upstream.url, storage=storage)
    final = cached_path(storage, blob)

    async with asyncio.timeout(PULL_TIMEOUT), client.get(blob.path) as resp:
        assert resp.status == 200
        first = await resp.content.readexactly(MiB - 1)  # all but the held-back byte
        assert first == blob.data[: MiB - 1]
        await asyncio.wait_for(fake_upstream.blobs.stalled.wait(), GATE_TIMEOUT)

        assert not final.exists()
        assert cached_files(storage) == []
        (temp,) = temp_files(storage)
        assert temp.stat().st_size == MiB
        proxy = blob_proxy(client)
        assert await proxy.cache.index.blob(Digest("sha256", blob.hex)) is None
        async with (
            asyncio.timeout(PULL_TIMEOUT),
            client.head(blob.path) as head,
        ):  # joins the running download
            assert head.headers["Content-Length"] == str(len(blob.data))

        fake_upstream.release.set()
        rest = await resp.read()
    assert first + rest == blob.data
    await wait_for_file(final)  # readers get the last byte once verified, before the commit
    assert final.read_bytes() == blob.data
    assert temp_files(storage) == []
    assert fake_upstream.count("GET") == 1
    assert fake_upstream.count("HEAD") == 0
