"""Fleet mode's peer requests, both ends: a replica's peer route (web/peer.py) and the
`PeerSource` reading from it (proxy/sources.py).

The replica is the mirror in-process (make_app, as in production) in fleet mode, its
shared tier on moto's S3 and a PostgreSQL database of the test's own, over the fake
upstream, which sends its blob slowly so that a peer can join the download under way.
The workers test runs `mirror serve --workers 2` as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import downloads_stored, mirror_config
from engines import S3Endpoint
from fake_upstream import FakeUpstream, sha256
from fleet import shared_block as fleet_shared_block
from pytest_aiohttp import AiohttpClient
from upstream_registry import free_loopback_port

from mirror.app import make_app
from mirror.config import SharedConfig, Timeouts
from mirror.errors import UpstreamCut, UpstreamError
from mirror.proxy.sources import PeerSource
from mirror.reference import parse_digest
from mirror.web.middleware import METRICS

if TYPE_CHECKING:
    from conftest import MirrorProcess

MirrorClient = TestClient[web.Request, web.Application]
StartReplica = Callable[..., Awaitable[MirrorClient]]

SECRET = "fleet-s3cret"
KIB = 1024
BLOB_SIZE = 1024 * KIB  # 16 pieces of 64 KiB, 50 ms apart: about 0.8 s upstream
TIMEOUTS = Timeouts(connect=5.0, first_byte=10.0, idle=10.0)
WAIT = 20.0  # the longest any step of a test may take
REPO = "library/app"


@pytest.fixture
def aws_chain(moto_s3: S3Endpoint, aws_credentials: Callable[[S3Endpoint], None]) -> None:
    """The standard AWS chain of the replica (and of subprocesses): moto's keys only."""
    aws_credentials(moto_s3)


@pytest.fixture
def shared_block(moto_s3: S3Endpoint, s3_bucket_name: str, database_url: str) -> dict[str, Any]:
    return fleet_shared_block(moto_s3, s3_bucket_name, database_url)


@pytest.fixture
def slow_upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.blobs.piece = 64 * KIB
    fake_upstream.blobs.pause = 0.05
    return fake_upstream


@pytest.fixture
def start_replica(
    aws_chain: None,
    shared_block: dict[str, Any],
    slow_upstream: FakeUpstream,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> StartReplica:
    """`await start_replica(secret=SECRET, retries=3)`: a replica in fleet mode. (The
    engines and the upstream come first: they are torn down after the replica.)"""

    async def start(secret: str | None = SECRET, retries: int = 3) -> MirrorClient:
        config = mirror_config(
            tmp_path / "cache", slow_upstream.url, upstream_fields={"retries": retries}
        )
        shared = SharedConfig(
            bucket=shared_block["bucket"],
            max_size=1024**3,
            database=shared_block["database"],
            endpoint_url=shared_block["endpoint_url"],
            region=shared_block["region"],
            peer_secret=secret,
            advertise_url="http://127.0.0.1:1",  # not asked for by these tests
        )
        return await aiohttp_client(make_app(replace(config, shared=shared)))

    return start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url_of(replica: MirrorClient) -> str:
    return str(replica.make_url("")).rstrip("/")


def peer_path(digest: str) -> str:
    return f"/_mirror/peer/blobs/{digest}"


def peer_count(replica: MirrorClient, result: str) -> float:
    assert replica.app is not None
    registry = replica.app[METRICS].registry
    value = registry.get_sample_value("mirror_peer_requests_total", {"result": result})
    return value or 0.0


def peer_route_count(replica: MirrorClient) -> float:
    """Answers of the peer route, whatever their status."""
    assert replica.app is not None
    registry = replica.app[METRICS].registry
    name = "mirror_http_request_duration_seconds_count"
    return registry.get_sample_value(name, {"route": "peer_blob"}) or 0.0


async def client_pull(replica: MirrorClient, digest: str) -> bytes:
    """A registry client's GET of the blob, through /v2/."""
    async with replica.get(f"/v2/{REPO}/blobs/{digest}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def upstream_asked(fake: FakeUpstream) -> None:
    """Until the replica's download sent its GET upstream (it is under way)."""
    async with asyncio.timeout(WAIT):
        await fake.blobs.requested.wait()


async def read_all(
    source: PeerSource, digest: str, offset: int = 0
) -> tuple[int, int | None, bytes]:
    """(start, length, bytes) of the source's body from `offset`."""
    async with asyncio.timeout(WAIT), source.body(parse_digest(digest), offset) as body:
        received = bytearray()
        async for chunk in body.chunks():
            received += chunk
        return body.start, body.length, bytes(received)


async def test_a_peer_streams_a_download_as_it_arrives(
    start_replica: StartReplica, slow_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    replica = await start_replica()
    data = os.urandom(BLOB_SIZE)
    digest = slow_upstream.blobs.put(data)
    pulled = asyncio.create_task(client_pull(replica, digest))
    await upstream_asked(slow_upstream)
    source = PeerSource(session, url_of(replica), SECRET, TIMEOUTS)
    received = bytearray()
    async with asyncio.timeout(WAIT), source.body(parse_digest(digest), 0) as body:
        assert (body.start, body.length) == (0, BLOB_SIZE)
        async for chunk in body.chunks():
            if not received:  # the first bytes, while the upstream is still sending
                assert slow_upstream.blobs.last_piece_at is None
            received += chunk
    assert sha256(bytes(received)) == digest
    async with asyncio.timeout(WAIT):
        assert await pulled == data
    assert slow_upstream.count("GET", "/blobs/") == 1  # the peer's request started none
    assert peer_count(replica, "served") == 1


async def test_a_peer_resumes_from_an_offset(
    start_replica: StartReplica, slow_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    replica = await start_replica()
    data = os.urandom(BLOB_SIZE)
    digest = slow_upstream.blobs.put(data)
    source = PeerSource(session, url_of(replica), SECRET, TIMEOUTS)
    pulled = asyncio.create_task(client_pull(replica, digest))
    await upstream_asked(slow_upstream)
    # From the growing file...
    assert await read_all(source, digest, 300_001) == (300_001, BLOB_SIZE, data[300_001:])
    async with asyncio.timeout(WAIT):
        await pulled
        await downloads_stored(replica)
    # ...and from the cached one.
    assert await read_all(source, digest, 5) == (5, BLOB_SIZE, data[5:])
    assert await read_all(source, digest) == (0, BLOB_SIZE, data)
    assert slow_upstream.count("GET", "/blobs/") == 1
    assert peer_count(replica, "served") == 3


async def test_a_head_answers_the_size(
    start_replica: StartReplica, slow_upstream: FakeUpstream
) -> None:
    replica = await start_replica()
    data = os.urandom(100 * KIB)
    digest = slow_upstream.blobs.put(data)
    await client_pull(replica, digest)
    await downloads_stored(replica)
    headers = {"Authorization": f"Bearer {SECRET}"}
    async with replica.head(peer_path(digest), headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Docker-Content-Digest"] == digest


async def test_a_blob_not_here_is_404_and_never_fetched(
    start_replica: StartReplica, slow_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    replica = await start_replica()
    digest = slow_upstream.blobs.put(os.urandom(10 * KIB))  # the upstream has it; not here
    source = PeerSource(session, url_of(replica), SECRET, TIMEOUTS)
    with pytest.raises(UpstreamError, match="neither cached nor downloading") as caught:
        await read_all(source, digest)
    assert not isinstance(caught.value, UpstreamCut)
    headers = {"Authorization": f"Bearer {SECRET}"}
    async with replica.get(peer_path(digest), headers=headers) as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    await asyncio.sleep(0.2)  # a download started anyway would have asked by now
    assert [s for s in slow_upstream.seen if digest in s.path] == []
    assert peer_count(replica, "absent") == 2


async def test_no_secret_or_a_wrong_one_is_refused(
    start_replica: StartReplica,
    slow_upstream: FakeUpstream,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replica = await start_replica()
    data = os.urandom(10 * KIB)
    digest = slow_upstream.blobs.put(data)
    await client_pull(replica, digest)
    await downloads_stored(replica)  # cached: only the secret is missing
    caplog.set_level(logging.WARNING, logger="mirror.web.peer")
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {SECRET}"},
        {"Authorization": f"Bearer {SECRET}x"},
    ):
        async with replica.get(peer_path(digest), headers=headers) as resp:
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
            assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    source = PeerSource(session, url_of(replica), "wrong", TIMEOUTS)
    with pytest.raises(UpstreamError, match="refused the fleet's secret"):
        await read_all(source, digest)
    assert peer_count(replica, "refused") == 5
    assert peer_count(replica, "served") == 0
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1  # once per address
    assert "127.0.0.1" in refusals[0].getMessage()
    assert SECRET not in caplog.text and "wrong" not in caplog.text
    # The right one is served.
    assert await read_all(PeerSource(session, url_of(replica), SECRET, TIMEOUTS), digest) == (
        0,
        len(data),
        data,
    )


async def test_a_replica_without_a_secret_refuses_every_peer(
    start_replica: StartReplica, slow_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mirror.web.peer")
    replica = await start_replica(secret=None)
    assert "no shared.peer_secret" in caplog.text
    digest = slow_upstream.blobs.put(os.urandom(KIB))
    await client_pull(replica, digest)
    await downloads_stored(replica)
    for token in ("", "None", SECRET):
        headers = {"Authorization": f"Bearer {token}"}
        async with replica.get(peer_path(digest), headers=headers) as resp:
            assert resp.status == 401
    assert peer_count(replica, "refused") == 3


async def test_registry_paths_never_reach_the_peer_route(
    start_replica: StartReplica, slow_upstream: FakeUpstream
) -> None:
    replica = await start_replica()
    digest = slow_upstream.blobs.put(os.urandom(10 * KIB))
    await client_pull(replica, digest)
    await downloads_stored(replica)
    headers = {"Authorization": f"Bearer {SECRET}"}
    for path in (
        f"/v2/_mirror/peer/blobs/{digest}",
        f"/v2/{REPO}/_mirror/peer/blobs/{digest}",
        f"/v2/{REPO}/blobs/_mirror/peer/blobs/{digest}",
    ):
        async with replica.get(path, headers=headers) as resp:
            assert resp.status in (400, 404), path
            assert resp.headers.get("Docker-Content-Digest") is None, path
    async with replica.get(f"/v2/{REPO}/blobs/{digest}", headers=headers) as resp:
        assert resp.status == 200  # a registry blob, as any client's
    assert peer_route_count(replica) == 0
    assert sum(peer_count(replica, r) for r in ("served", "refused", "absent")) == 0
    async with replica.get(peer_path(digest), headers=headers) as resp:
        assert resp.status == 200
    assert peer_route_count(replica) == 1


async def test_a_peer_cut_mid_body_raises_upstream_cut(
    start_replica: StartReplica, slow_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """The replica's own download breaks off (no retries), so its peer's answer is cut."""
    replica = await start_replica(retries=0)
    data = os.urandom(BLOB_SIZE)
    digest = slow_upstream.blobs.put(data)
    slow_upstream.blobs.stall_after, slow_upstream.blobs.stalls = 200 * KIB, 1
    pulled = asyncio.create_task(client_pull(replica, digest))
    async with asyncio.timeout(WAIT):
        await slow_upstream.blobs.stalled.wait()
    source = PeerSource(session, url_of(replica), SECRET, TIMEOUTS)
    received = bytearray()
    with pytest.raises(UpstreamCut):
        async with asyncio.timeout(WAIT), source.body(parse_digest(digest), 0) as body:
            async for chunk in body.chunks():
                received += chunk
                if len(received) >= 100 * KIB:
                    slow_upstream.release.set()  # the stall ends in a cut
    assert 100 * KIB <= len(received) < BLOB_SIZE
    assert bytes(received) == data[: len(received)]
    with contextlib.suppress(aiohttp.ClientError, AssertionError):
        await pulled


async def test_an_unreachable_peer_is_an_upstream_error(session: aiohttp.ClientSession) -> None:
    source = PeerSource(session, f"http://127.0.0.1:{free_loopback_port()}", SECRET, TIMEOUTS)
    with pytest.raises(UpstreamError, match="cannot be reached") as caught:
        await read_all(source, sha256(b"x"))
    assert not isinstance(caught.value, UpstreamCut)
    assert SECRET not in caught.value.message


async def test_workers_hand_peer_requests_to_the_primary(
    start_mirror_process: Callable[..., MirrorProcess],
    shared_block: dict[str, Any],
    aws_chain: None,
    tmp_path: Path,
) -> None:
    """A worker answers cache hits only: a peer request, on any connection, is the
    primary's (16 connections reach both processes but for a chance of 2 in 65,536)."""
    config = tmp_path / "mirror.yaml"
    settings = {
        "storage": {"path": str(tmp_path / "cache")},
        "workers": 2,
        "shared": {**shared_block, "peer_secret": SECRET},
    }
    config.write_text(yaml.safe_dump(settings))
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    digest = sha256(os.urandom(16))
    good = {"Authorization": f"Bearer {SECRET}"}
    async with asyncio.timeout(WAIT):
        await _worker_started(mirror)
        answers = await asyncio.gather(
            *(_get(f"{mirror.url}{peer_path(digest)}", good) for _ in range(16)),
            *(_get(f"{mirror.url}{peer_path(digest)}", {}) for _ in range(16)),
        )
        assert [status for status, _ in answers] == [404] * 16 + [401] * 16, mirror.log()
        assert {code for _, code in answers} == {"BLOB_UNKNOWN", "UNAUTHORIZED"}
        metrics = (await _get_text(f"{mirror.url}/metrics")).splitlines()
    assert 'mirror_peer_requests_total{result="absent"} 16.0' in metrics
    assert 'mirror_peer_requests_total{result="refused"} 16.0' in metrics


async def _worker_started(mirror: MirrorProcess) -> None:
    for _ in range(int(WAIT / 0.05)):
        if "worker 1 (pid" in mirror.log():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no worker started:\n{mirror.log()}")


async def _get(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """On a connection of its own: the status and the OCI error code."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, headers=headers) as resp,
    ):
        return resp.status, (await resp.json())["errors"][0]["code"]


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.text()
