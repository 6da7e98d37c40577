"""Fault injection: an upstream that drops, stalls, fails every other time, sends too much
or waits; a full disk; a locked index; and the bounds on upstream fetches, client
connections and request headers. Whatever happens, a client receives a correct body or a
clean error, and the cache holds only verified blobs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import logging
import os
import select
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fake_upstream import OCI_MANIFEST, FakeUpstream, RawServer, Serve, manifest_bytes

from mirror.config import AuthConfig, Timeouts
from mirror.reference import parse_digest
from mirror.storage import index as index_module
from mirror.storage.blobs import BlobStore, BlobWriter
from mirror.storage.index import INDEX_FILE, Index

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

MirrorClient = TestClient[web.Request, web.Application]
MakeMirror = Callable[..., Any]
KIB, MIB = 1024, 1024 * 1024
QUICK = Timeouts(connect=2, first_byte=1, idle=0.3)


@pytest.fixture
async def raw(fake_upstream: FakeUpstream) -> AsyncIterator[RawServer]:
    """`fake_upstream` behind the hand-written server too (bytes past an answer's end)."""
    server = await RawServer(fake_upstream).start()
    yield server
    server.close()


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "cache"


async def pull(mirror: MirrorClient, digest: str) -> tuple[int, bytes]:
    async with asyncio.timeout(30), mirror.get(f"/v2/team/app/blobs/{digest}") as response:
        return response.status, await response.read()


async def pulled_digest(mirror: MirrorClient, digest: str) -> tuple[int, str]:
    """The status and the digest of the body received (short to compare and to print)."""
    status, body = await pull(mirror, digest)
    return status, "sha256:" + hashlib.sha256(body).hexdigest()


def cached(storage: Path) -> dict[str, bool]:
    """Every blob file in the cache, and whether it hashes to its name."""
    store = BlobStore(storage)
    return {str(digest): store.verify(digest) for digest in store.scan()}


async def settled(storage: Path, digest: str) -> dict[str, bool]:
    """The cache once `digest`'s download has ended either way (a commit lands after the
    last byte went out)."""
    for _ in range(100):
        if digest in cached(storage) or not any((storage / "tmp").iterdir()):
            break
        await asyncio.sleep(0.02)
    return cached(storage)


# --- a body that breaks off ------------------------------------------------------------------


async def test_a_dropped_blob_is_resumed_with_a_range(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    data = os.urandom(MIB + 123)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.drop_after, fake_upstream.blobs.drops = 300 * KIB, 2
    mirror = await make_mirror(fake_upstream.url, storage=storage)

    assert await pull(mirror, digest) == (200, data)  # one continuous, correct body
    # Each resumption starts where the bytes the mirror had taken in end.
    first, *resumed = [seen.range for seen in fake_upstream.requests("GET", digest)]
    offsets = [int(r.removeprefix("bytes=").removesuffix("-")) for r in resumed if r]
    assert first is None and len(offsets) == 2
    assert 0 < offsets[0] <= 300 * KIB < offsets[1] <= 600 * KIB
    assert await settled(storage, digest) == {digest: True}
    metrics = await (await mirror.get("/metrics")).text()
    assert 'mirror_upstream_resumes_total{upstream="upstream"} 2.0' in metrics


async def test_a_dropped_blob_is_fetched_again_when_ranges_are_ignored(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    data = os.urandom(MIB)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.ranges = False
    fake_upstream.blobs.drop_after, fake_upstream.blobs.drops = 400 * KIB, 1
    mirror = await make_mirror(fake_upstream.url, storage=storage)

    assert await pull(mirror, digest) == (200, data)
    assert [s.status for s in fake_upstream.requests("GET", digest)] == [200, 200]  # from scratch
    assert await settled(storage, digest) == {digest: True}


async def test_drops_past_the_retry_budget_cut_the_client_and_cache_nothing(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    data = os.urandom(MIB)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.drop_after, fake_upstream.blobs.drops = 100 * KIB, 3
    mirror = await make_mirror(fake_upstream.url, storage=storage, upstream={"retries": 2})

    async with mirror.get(f"/v2/team/app/blobs/{digest}") as response:
        assert response.status == 200  # the headers went out before the first cut
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert len(fake_upstream.requests("GET", digest)) == 3
    assert await settled(storage, digest) == {}
    assert await pull(mirror, digest) == (200, data)  # the upstream is well again
    assert await settled(storage, digest) == {digest: True}


async def test_a_stalled_blob_is_resumed(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    data = os.urandom(512 * KIB)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.stall_after, fake_upstream.blobs.stalls = 200 * KIB, 1
    mirror = await make_mirror(fake_upstream.url, storage=storage, upstream={"timeouts": QUICK})

    assert await pull(mirror, digest) == (200, data)
    assert [s.range for s in fake_upstream.requests("GET", digest)] == [None, f"bytes={200 * KIB}-"]
    assert await settled(storage, digest) == {digest: True}


# --- answers that are wrong or slow ----------------------------------------------------------


async def test_intermittent_500s_are_retried(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    data = os.urandom(64 * KIB)
    digest = fake_upstream.blobs.put(data)
    manifest_digest = fake_upstream.manifests.put("team/app", "1", manifest_bytes(data))
    fake_upstream.fail(500, every_other=True)
    mirror = await make_mirror(fake_upstream.url, storage=storage)

    async with mirror.get("/v2/team/app/manifests/1", headers={"Accept": OCI_MANIFEST}) as resp:
        assert (resp.status, resp.headers["Docker-Content-Digest"]) == (200, manifest_digest)
    assert await pull(mirror, digest) == (200, data)
    assert [s.status for s in fake_upstream.seen] == [200, 500, 200]


async def test_every_attempt_failing_is_a_clean_502(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    digest = fake_upstream.blobs.put(b"x")
    fake_upstream.fail(500)
    mirror = await make_mirror(fake_upstream.url, storage=storage, upstream={"retries": 2})
    async with mirror.get(f"/v2/team/app/blobs/{digest}") as response:
        assert response.status == 502
        assert (await response.json())["errors"][0]["code"] == "UPSTREAM_ERROR"
    assert [s.status for s in fake_upstream.seen] == [500, 500, 500]
    assert await settled(storage, digest) == {}


async def test_too_many_bytes_never_reach_the_cache(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    # Without a length, the extra bytes are part of the body: it fails verification, the
    # client gets a 502 (when the check came before its answer started) or is cut short,
    # and nothing is cached. (Past a declared length: the tests below, on the raw server.)
    fake_upstream.blobs.extra = b"GARBAGE" * 1000
    mirror = await make_mirror(fake_upstream.url, storage=storage)
    third = fake_upstream.blobs.put(os.urandom(128 * KIB))
    fake_upstream.blobs.chunked = True
    async with mirror.get(f"/v2/team/app/blobs/{third}") as response:
        if response.status == 200:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        else:
            assert response.status == 502
            assert (await response.json())["errors"][0]["code"] == "UPSTREAM_ERROR"
    assert third not in await settled(storage, third)


# An upstream sends a whole second answer after the one asked for, on the kept-alive
# connection: in the same write, or a moment later while the connection idles in the pool.
# That answer belongs to no request; the next one on the connection must not take it.
PAST_THE_END = [0.0, 0.05]


def past_the_end_id(delay: float) -> str:
    return "while-idle" if delay else "same-write"


@pytest.mark.parametrize(
    ("extra", "delay"),
    [("answer", 0.0), ("answer", 0.05), ("garbage", 0.0)],
    ids=["answer-same-write", "answer-while-idle", "garbage"],
)
async def test_an_answer_past_a_blob_never_answers_the_next_request(
    fake_upstream: FakeUpstream,
    raw: RawServer,
    make_mirror: MakeMirror,
    storage: Path,
    extra: str,
    delay: float,
) -> None:
    first = fake_upstream.blobs.put(os.urandom(300 * KIB))  # more than one read of the socket
    second = fake_upstream.blobs.put(os.urandom(KIB))
    answer = raw.answer("GET", f"/v2/team/app/blobs/{first}")[1]
    raw.extra = answer if extra == "answer" else b"GARBAGE" * 1000
    raw.extra_delay = delay
    mirror = await make_mirror(raw.url, storage=storage)

    assert await pulled_digest(mirror, first) == (200, first)
    await asyncio.wait_for(raw.extra_sent.wait(), 5)
    raw.extra = b""  # once: the next answer is as asked
    assert await pulled_digest(mirror, second) == (200, second)
    assert await settled(storage, second) == {first: True, second: True}
    assert [s.path.rpartition("/")[2] for s in fake_upstream.seen] == [first, second]
    assert raw.connections == 2  # the one that spoke out of turn was not reused


@pytest.mark.parametrize("delay", PAST_THE_END, ids=past_the_end_id)
async def test_an_answer_past_a_manifest_never_answers_for_another_tag(
    fake_upstream: FakeUpstream,
    raw: RawServer,
    make_mirror: MakeMirror,
    storage: Path,
    delay: float,
) -> None:
    digests = {
        tag: fake_upstream.manifests.put("team/app", tag, manifest_bytes(tag)) for tag in "abc"
    }
    raw.extra = raw.answer("GET", "/v2/team/app/manifests/b")[1]
    raw.extra_delay = delay
    mirror = await make_mirror(raw.url, storage=storage)

    async def tag_digest(tag: str) -> str:
        headers = {"Accept": OCI_MANIFEST}
        async with (
            asyncio.timeout(10),
            mirror.get(f"/v2/team/app/manifests/{tag}", headers=headers) as resp,
        ):
            assert resp.status == 200, await resp.text()
            return str(resp.headers["Docker-Content-Digest"])

    assert await tag_digest("a") == digests["a"]
    await asyncio.wait_for(raw.extra_sent.wait(), 5)
    raw.extra = b""
    assert await tag_digest("c") == digests["c"]
    assert await tag_digest("c") == digests["c"]  # as recorded, from the cache
    assert [s.path for s in fake_upstream.seen] == [f"/v2/team/app/manifests/{t}" for t in "ac"]
    assert raw.connections == 2


async def test_an_upstream_connection_is_kept_alive_while_it_speaks_in_turn(
    fake_upstream: FakeUpstream, raw: RawServer, make_mirror: MakeMirror, storage: Path
) -> None:
    blobs = [fake_upstream.blobs.put(os.urandom(size)) for size in (300 * KIB, KIB, 0)]
    fake_upstream.manifests.put("team/app", "1", manifest_bytes(b"1"))
    mirror = await make_mirror(raw.url, storage=storage)
    for digest in blobs:
        assert await pulled_digest(mirror, digest) == (200, digest)
    async with mirror.get("/v2/team/app/manifests/1", headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 200
    assert (len(fake_upstream.seen), raw.connections) == (4, 1)


async def test_a_body_left_unread_is_never_taken_for_the_next_answer(
    fake_upstream: FakeUpstream, raw: RawServer, make_mirror: MakeMirror, storage: Path
) -> None:
    """The mirror stops reading a manifest past 4 MiB: the rest of it is still coming."""
    fake_upstream.manifests.put("team/app", "big", manifest_bytes(b"config"))
    fake_upstream.manifests.bodies[("team/app", "big")] += b" " * (4 * MIB + 1)
    small = fake_upstream.manifests.put("team/app", "small", manifest_bytes(b"config"))
    mirror = await make_mirror(raw.url, storage=storage)
    headers = {"Accept": OCI_MANIFEST}
    async with mirror.get("/v2/team/app/manifests/big", headers=headers) as resp:
        assert resp.status >= 400, await resp.text()
    async with mirror.get("/v2/team/app/manifests/small", headers=headers) as resp:
        assert (resp.status, resp.headers["Docker-Content-Digest"]) == (200, small)
    assert raw.connections == 2


async def test_an_answer_that_cannot_be_read_never_shows_the_credentials(
    fake_upstream: FakeUpstream,
    raw: RawServer,
    make_mirror: MakeMirror,
    storage: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp's error for an answer it cannot parse holds the request, headers included."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FAULT_UPSTREAM_PASSWORD", "S3CRET-pw")
    auth = AuthConfig("basic", username="alice", password_env="FAULT_UPSTREAM_PASSWORD")
    digest = fake_upstream.blobs.put(os.urandom(KIB))
    raw.extra = b"GARBAGE" * 100  # in the answer's write: no answer can be parsed
    fields = {"auth": auth, "retries": 0}
    mirror = await make_mirror(raw.url, storage=storage, upstream=fields)

    async with mirror.get(f"/v2/team/app/blobs/{digest}") as response:
        assert response.status == 502
        message = (await response.json())["errors"][0]["message"]
    header = "Basic " + base64.b64encode(b"alice:S3CRET-pw").decode()
    assert [s.authorization for s in fake_upstream.seen] == [header]
    metrics = await (await mirror.get("/metrics")).text()
    assert (
        'mirror_upstream_requests_total{method="GET",status="error",upstream="upstream"}' in metrics
    )
    for text in (message, caplog.text, metrics):
        assert "S3CRET" not in text and header[6:] not in text and "Authorization" not in text


async def test_an_upstream_slow_to_answer_times_out(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    digest = fake_upstream.blobs.put(os.urandom(KIB))
    fake_upstream.blobs.first_byte_delay = 3.0
    timeouts = Timeouts(connect=2, first_byte=0.3, idle=10)
    mirror = await make_mirror(fake_upstream.url, storage=storage, upstream={"timeouts": timeouts})
    async with asyncio.timeout(2.5), mirror.get(f"/v2/team/app/blobs/{digest}") as response:
        assert response.status == 504
        assert (await response.json())["errors"][0]["code"] == "UPSTREAM_TIMEOUT"


async def test_fetches_queue_then_get_503(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, storage: Path
) -> None:
    blobs = [os.urandom(256 * KIB) for _ in range(3)]
    first, second, third = (fake_upstream.blobs.put(data) for data in blobs)
    fake_upstream.blobs.stall_after, fake_upstream.blobs.stalls = (
        100 * KIB,
        1,
    )  # the first holds the one slot
    fields = {"max_fetches": 1, "max_queued": 1, "timeouts": Timeouts(idle=30)}
    mirror = await make_mirror(fake_upstream.url, storage=storage, upstream=fields)

    holding = asyncio.create_task(pull(mirror, first))
    await asyncio.wait_for(fake_upstream.blobs.requested.wait(), 10)
    queued = asyncio.create_task(pull(mirror, second))
    await asyncio.sleep(0.2)
    assert fake_upstream.requests("GET", second) == []  # waiting for the slot
    async with mirror.get(f"/v2/team/app/blobs/{third}") as response:
        assert (response.status, response.headers["Retry-After"]) == (503, "1")
        assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    fake_upstream.release.set()  # the stalled body ends short: resumed, then done
    assert await holding == (200, blobs[0])
    assert await queued == (200, blobs[1])


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 3 MiB tmpfs when this machine lets the test mount one (root), else None."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    yield mount if made.returncode == 0 else None
    if made.returncode == 0:
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_a_full_disk_serves_blobs_uncached(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    small_disk: Path | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    if small_disk is None:  # no tmpfs here: the writer meets ENOSPC past 1 MiB instead
        write = BlobWriter.write

        def filling(self: BlobWriter, chunk: bytes) -> None:
            if self.written + len(chunk) > MIB:
                raise OSError(errno.ENOSPC, "No space left on device (test hook)")
            write(self, chunk)

        monkeypatch.setattr(BlobWriter, "write", filling)
    storage = small_disk or tmp_path / "cache"
    blobs = [os.urandom(4 * MIB) for _ in range(2)]
    digests = [fake_upstream.blobs.put(data) for data in blobs]
    # The budget is no help: it is larger than the disk.
    mirror = await make_mirror(fake_upstream.url, storage=storage, budget={"max_size": 1024 * MIB})

    for digest, data in zip(digests, blobs, strict=True):
        assert await pull(mirror, digest) == (200, data)
    assert await pull(mirror, digests[0]) == (200, blobs[0])  # still served, uncached
    for digest in digests:
        assert digest not in await settled(storage, digest)
    metrics = await (await mirror.get("/metrics")).text()
    assert "mirror_disk_full_total 3.0" in metrics
    assert sum("disk full" in r.message for r in caplog.records) == 1  # logged once
    assert all(cached(storage).values())
    # Space again: the next blob is cached as usual.
    monkeypatch.undo()
    small = fake_upstream.blobs.put(os.urandom(64 * KIB))
    for stale in (storage / "tmp").iterdir():
        stale.unlink()
    assert await pull(mirror, small) == (200, fake_upstream.blobs.data[small])
    assert small in await settled(storage, small)


# --- a locked index ------------------------------------------------------------------------


async def test_a_locked_index_loses_no_access_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "BUSY_TIMEOUT_MS", 50)
    monkeypatch.setattr(index_module, "WRITE_ATTEMPTS", 2)
    index = Index(tmp_path / INDEX_FILE)
    await index.open()
    digest = parse_digest("sha256:" + hashlib.sha256(b"x").hexdigest())
    await index.add_blob(digest, 1)
    before = (await index.blobs())[str(digest)][1]
    other = sqlite3.connect(tmp_path / INDEX_FILE, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # `mirror gc` in another process, say
    try:
        await asyncio.sleep(0.01)
        index.touch(digest)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await index.flush()
    finally:
        other.execute("ROLLBACK")
        other.close()
    await index.flush()  # the access kept from the failed flush is written now
    assert (await index.blobs())[str(digest)][1] > before
    await index.close()


# --- bounds on clients ---------------------------------------------------------------------


def open_idle(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def hold_all(stack: contextlib.ExitStack, port: int, count: int) -> list[socket.socket]:
    """`count` idle connections, every one taken by the server. The readiness probe's
    connection may still count for a moment after its answer (its close is noticed on a
    later turn of the server's loop): a connection refused meanwhile is opened again."""
    for _ in range(50):
        with contextlib.ExitStack() as attempt:
            held = [attempt.enter_context(open_idle(port)) for _ in range(count)]
            readable, _, _ = select.select(held, [], [], 0.2)  # a 503 is an answer
            if not readable:
                stack.push(attempt.pop_all())
                return held
    raise AssertionError(f"the server did not take {count} idle connections")


def http_get(sock: socket.socket, path: str, extra: str = "") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n{extra}\r\n".encode())
    return sock.recv(65536)


def test_connection_cap_and_header_limits(
    start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage: {{path: {tmp_path / 'cache'}}}\n"
        "upstreams: [{name: up, url: 'http://127.0.0.1:9'}]\n"
        "limits: {max_connections: 3, max_header_size: 1KiB}\n"
    )
    mirror = start_mirror_process("--config", str(config))
    with contextlib.ExitStack() as stack:
        held = hold_all(stack, mirror.port, 3)
        assert http_get(held[0], "/v2/").startswith(b"HTTP/1.1 200")
        with open_idle(mirror.port) as refused:
            answer = refused.recv(4096)
            assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
            assert refused.recv(4096) == b""  # and closed
        held.pop().close()
        for _ in range(50):  # the server notices the close
            with open_idle(mirror.port) as again:
                answer = http_get(again, "/v2/")
            if answer.startswith(b"HTTP/1.1 200"):
                break
        assert answer.startswith(b"HTTP/1.1 200")
        # A header past max_header_size is refused before any handler runs.
        answer = http_get(held[0], "/v2/", f"X-Big: {'a' * 2048}\r\n")
        assert answer.split(b" ")[1] in (b"400", b"431"), answer[:200]
    assert "refusing new ones with 503" in mirror.log()


# --- nothing but configured hosts ------------------------------------------------------------


async def test_client_input_never_reaches_another_host(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    storage: Path,
    serve: Serve,
) -> None:
    """A bystander on loopback is never contacted, whatever ns, name or headers say."""
    bystander = await serve(FakeUpstream())
    bystander.blobs.put(b"secret")
    other = f"127.0.0.1:{bystander.port}"
    digest = fake_upstream.blobs.put(b"public")
    mirror = await make_mirror(fake_upstream.url, storage=storage)
    attempts = [
        (f"/v2/team/app/blobs/{digest}?ns={other}", {}),
        (f"/v2/{other}/team/app/blobs/{digest}", {}),
        (f"/v2/http:/{other}/x/blobs/{digest}", {}),
        (f"/v2/team/app/blobs/{digest}", {"Host": other, "X-Forwarded-Host": other}),
        (f"/v2/team/app/manifests/1?ns=http://{other}/", {"Forwarded": f"host={other}"}),
    ]
    for path, headers in attempts:
        async with mirror.get(path, headers=headers) as response:
            assert response.status in (200, 400, 404), (path, response.status)
    assert bystander.seen == []


async def test_a_tag_read_before_another_fetch_stored_it_is_not_fetched_again(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    storage: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Request B reads "no such tag" from the index, then request A's fetch completes and
    stores it, then B goes on: B must not make a second upstream GET (on Docker Hub, a
    second counted pull)."""
    fake_upstream.manifests.put("team/app", "1", manifest_bytes(b"config"))
    mirror = await make_mirror(fake_upstream.url, storage=storage)
    both_looked, first_done = asyncio.Event(), asyncio.Event()
    reads = 0
    tag = Index.tag

    async def held_reads(self: Index, *args: str) -> Any:
        """Both requests read the (missing) tag; then the second read is held until the
        other request is done."""
        nonlocal reads
        reads += 1
        mine = reads
        row = await tag(self, *args)
        if mine <= 2:
            if mine == 2:
                both_looked.set()
            await both_looked.wait()
            if mine == 2:
                await first_done.wait()
        return row

    monkeypatch.setattr(Index, "tag", held_reads)

    async def get_tag() -> int:
        async with mirror.get("/v2/team/app/manifests/1", headers={"Accept": OCI_MANIFEST}) as r:
            return int(r.status)

    async with asyncio.timeout(20):
        pulls = {asyncio.create_task(get_tag()) for _ in range(2)}
        done, held = await asyncio.wait(pulls, return_when=asyncio.FIRST_COMPLETED)
        first_done.set()
        assert [await pull for pull in (*done, *held)] == [200, 200]
    assert [s.path for s in fake_upstream.seen] == ["/v2/team/app/manifests/1"]
