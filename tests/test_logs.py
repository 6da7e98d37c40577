"""Logs of `mirror serve`: an access line per request, text or JSON; outages logged once;
never a credential or token; SIGTERM lets a response under way finish; what clients get
wrong (oversized headers, TLS on the plain port, leaving mid-blob) is no ERROR, and an
event that repeats is logged once per episode."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from fake_upstream import CDN, OCI_MANIFEST, FakeUpstream, Serve, manifest_bytes
from pytest_aiohttp import AiohttpClient
from upstream_registry import RegistryProcess, push_image

from mirror.app import make_app
from mirror.config import AuthConfig, Config, StorageConfig, UpstreamConfig
from mirror.logs import BATCH_LINES, AccessLogger, Episodes, Output

if TYPE_CHECKING:
    from conftest import MirrorClient, MirrorProcess

    MakeMirror = Callable[..., Awaitable[MirrorClient]]
    StartMirrorProcess = Callable[..., MirrorProcess]

KIB = 1024


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_one_access_line_per_request(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
    log_format: str,
) -> None:
    image = await push_image(registry.url, "logs/app", "v1", [40 * KIB])
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage: {{path: {tmp_path / 'cache'}}}\n"
        f"upstreams: [{{name: up, url: '{registry.url}'}}]\n"
        f"log: {{format: {log_format}}}\n"
    )
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    layer = image.layer_digests[0]
    stored = tmp_path / "cache" / "blobs" / "sha256" / layer[7:9] / layer[7:]
    for _ in range(2):
        await fetch(f"{mirror.url}/v2/logs/app/blobs/{layer}")
        # The last byte goes out before the commit; a request before it would join the
        # download still being stored, a miss.
        for _ in range(250):
            if stored.exists():
                break
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    await asyncio.to_thread(mirror.stop)
    lines = mirror.log().splitlines()
    path = f"/v2/logs/app/blobs/{layer}"
    if log_format == "json":
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        access = [e for e in entries if e["logger"] == "mirror.access" and e["path"] == path]
        assert [(e["status"], e["cache"], e["upstream"], e["bytes"]) for e in access] == [
            (200, "miss", "up", 40 * KIB),
            (200, "hit", "up", 40 * KIB),
        ]
        assert all(e["method"] == "GET" and e["duration"] >= 0 for e in access)
    else:
        access = [line for line in lines if f"GET {path} 200" in line]
        assert len(access) == 2
        assert re.search(rf"GET {path} 200 {40 * KIB} \d+\.\d{{3}}s cache=miss upstream=up$",
                         access[0])  # fmt: skip
        assert access[1].endswith("cache=hit upstream=up")


async def test_no_credential_or_token_in_any_log(
    fake_upstream: FakeUpstream,
    serve: Serve,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-Pa55-9f7e1c"
    hub = fake_upstream
    hub.auth.scheme, hub.auth.credentials = "bearer", ("alice", secret)
    cdn = await serve(CDN(hub.blobs))
    hub.blob_redirect = f"http://localhost:{cdn.port}/blobs"
    hub.manifests.put("library/x", "1", manifest_bytes("x"))
    data = os.urandom(10 * KIB)
    digest = hub.blobs.put(data)
    monkeypatch.setenv("MIRROR_TEST_SECRET", secret)
    auth = AuthConfig("basic", username="alice", password_env="MIRROR_TEST_SECRET")
    upstream = UpstreamConfig(
        name="hub", url=hub.url, hosts=("docker.io",), default=True, tag_ttl=0, auth=auth
    )
    config = Config(storage=StorageConfig(path=tmp_path / "cache"), upstreams=(upstream,))
    mirror = await aiohttp_client(make_app(config))
    for path in ("/v2/x/manifests/1", f"/v2/x/blobs/{digest}", "/v2/x/manifests/1"):
        async with mirror.get(path, headers={"Accept": OCI_MANIFEST}) as resp:
            assert resp.status == 200
    hub.auth.revoke()
    hub.auth.credentials = ("alice", "another")  # the token service now refuses: logs an outage
    async with mirror.get("/v2/x/manifests/1", headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 200  # stale from cache
    assert hub.token_requests  # the token flow ran, with the secret in its Basic header
    basic = base64.b64encode(f"alice:{secret}".encode()).decode()
    text = caplog.text
    for leaked in (secret, basic, "Bearer ", "token-1", "token-2"):
        assert leaked not in text


async def test_an_outage_is_logged_once(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hub = fake_upstream
    hub.manifests.put("library/x", "1", manifest_bytes("x"))
    mirror = await make_mirror(hub.url, tag_ttl=0)
    headers = {"Accept": OCI_MANIFEST}
    async with mirror.get("/v2/library/x/manifests/1", headers=headers) as resp:
        assert resp.status == 200
    hub.fail(503)
    for _ in range(5):
        async with mirror.get("/v2/library/x/manifests/1", headers=headers) as resp:
            assert resp.status == 200  # stale
    hub.mode = "ok"
    for _ in range(2):
        async with mirror.get("/v2/library/x/manifests/1", headers=headers) as resp:
            assert resp.status == 200
    assert caplog.text.count("upstream upstream is failing") == 1
    assert caplog.text.count("upstream upstream answers again") == 1


async def test_sigterm_lets_a_download_under_way_finish(
    fake_upstream: FakeUpstream,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
) -> None:
    data = os.urandom(2 * 1024 * KIB)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = 64 * KIB, 0.03  # about 1 s
    args = ("--storage", str(tmp_path / "cache"), "--upstream", fake_upstream.url)
    mirror = await asyncio.to_thread(start_mirror_process, *args)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{mirror.url}/v2/x/blobs/{digest}") as resp,
    ):
        first = await resp.content.readexactly(64 * KIB)
        mirror.proc.send_signal(signal.SIGTERM)
        rest = await resp.read()
    assert hashlib.sha256(first + rest).hexdigest() == digest.split(":")[1]
    assert await asyncio.to_thread(mirror.proc.wait, 30) == 0


def client_hello() -> bytes:
    """The first bytes a TLS client sends (skopeo and podman probe plain-HTTP mirrors so)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="mirror")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def send_raw(port: int, data: bytes) -> bytes:
    """What the mirror answers to `data`, up to its closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def leave_mid_blob(port: int, path: str) -> None:
    """Read the start of a blob, then reset the connection (a client killed mid-pull)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KIB)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    received = 0
    while received < 64 * KIB:
        received += len(sock.recv(16 * KIB))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_client_mistakes_log_no_error_and_repeats_once(
    fake_upstream: FakeUpstream, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    digest = fake_upstream.blobs.put(os.urandom(8 * 1024 * KIB))  # more than the sockets buffer
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage: {{path: {tmp_path / 'cache'}}}\n"
        f"upstreams: [{{name: up, url: '{fake_upstream.url}'}}]\n"
    )
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    oversized = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    for data in (oversized, client_hello(), b"GET /v2/ HTTP/1.1\r\nno colon\r\n\r\n") * 3:
        answer = await asyncio.to_thread(send_raw, mirror.port, data)
        assert answer.split(b" ")[1] == b"400", answer[:100]
    path = f"/v2/x/blobs/{digest}"
    for _ in range(3):  # a miss, then hits
        await asyncio.to_thread(leave_mid_blob, mirror.port, path)
        await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as session, session.get(f"{mirror.url}/metrics") as resp:
        metrics = await resp.text()
    await asyncio.to_thread(mirror.stop)
    log = mirror.log()
    assert "ERROR" not in log and "Traceback" not in log
    assert log.count("limits.max_header_size") == 1
    assert log.count("spoke TLS") == 1
    assert log.count("not valid HTTP") == 1
    assert "UNKNOWN" not in log  # no access line for what was no request
    statuses = re.findall(rf"GET {path} (\d+) ", log)
    assert statuses == ["499"] * 3
    assert re.search(r'mirror_http_requests_total\{[^}]*status="499"[^}]*\} 3\.0', metrics)
    assert 'status="500"' not in metrics


def test_a_repeated_event_is_logged_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    episodes = Episodes(logging.getLogger("test.episodes"), quiet=0.3)
    for _ in range(5):
        episodes.log(logging.WARNING, "bad", "bad request %d", 1)
    episodes.log(logging.INFO, "other", "another kind")
    time.sleep(0.4)  # the episode ends after `quiet` without one
    episodes.log(logging.WARNING, "bad", "bad request %d", 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "test.episodes"]
    assert len(lines) == 3
    assert lines[0].startswith("bad request 1 (logged once until 0s pass without another)")
    assert lines[1].startswith("another kind")
    assert lines[2] == (
        "bad request 2 (logged once until 0s pass without another; 4 more in the previous episode)"
    )


class CountedStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


ACCESS_LINE = ("GET", "/v2/a/blobs/x", "ns=docker.io", "/v2/a/blobs/x?ns=docker.io", 200, 7, 0.0123)


@pytest.mark.parametrize("json_lines", [False, True])
async def test_access_lines_are_written_once_per_loop_turn_in_order(json_lines: bool) -> None:
    stream = CountedStream()
    output = Output(stream, json_lines)
    other = logging.getLogger("test.logs.order")
    other.propagate = False
    other.addHandler(output)
    try:
        for cache in ("hit", "miss", "hit"):
            output.access((*ACCESS_LINE, cache, "hub"))
        assert stream.writes == 0  # gathered until the loop turns...
        await asyncio.sleep(0)
        assert stream.writes == 1  # ...and then written together
        output.access((*ACCESS_LINE, "stale", "hub"))
        other.warning("upstream hub is down")  # a record writes what was gathered first
        lines = stream.getvalue().splitlines()
    finally:
        other.removeHandler(output)
    assert len(lines) == 5
    if json_lines:
        entries = [json.loads(line) for line in lines]
        assert [e.get("cache") for e in entries] == ["hit", "miss", "hit", "stale", None]
        assert entries[0] | {"time": "-"} == {
            "time": "-",
            "level": "info",
            "logger": "mirror.access",
            "message": "GET /v2/a/blobs/x?ns=docker.io 200 7 0.012s cache=hit upstream=hub",
            "method": "GET",
            "path": "/v2/a/blobs/x",
            "query": "ns=docker.io",
            "status": 200,
            "bytes": 7,
            "duration": 0.0123,
            "cache": "hit",
            "upstream": "hub",
        }
        assert entries[4]["message"] == "upstream hub is down"
    else:
        get = "INFO mirror.access GET /v2/a/blobs/x?ns=docker.io 200 7 0.012s"
        assert [line.split(" ", 2)[2] for line in lines] == [
            f"{get} cache=hit upstream=hub",
            f"{get} cache=miss upstream=hub",
            f"{get} cache=hit upstream=hub",
            f"{get} cache=stale upstream=hub",
            "WARNING test.logs.order upstream hub is down",
        ]
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", lines[0])


async def test_a_flood_of_access_lines_is_written_in_bounded_batches() -> None:
    stream = CountedStream()
    output = Output(stream, json_lines=False)
    for _ in range(3 * BATCH_LINES):
        output.access((*ACCESS_LINE, "hit", "hub"))
    assert stream.writes == 3  # never more than BATCH_LINES held
    await asyncio.sleep(0)
    assert len(stream.getvalue().splitlines()) == 3 * BATCH_LINES


def test_no_access_line_is_made_below_info() -> None:
    logger = logging.getLogger("test.logs.quiet")
    logger.setLevel(logging.WARNING)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [Output(io.StringIO(), json_lines=False)]
    try:
        assert not AccessLogger(logger, "").enabled  # aiohttp then never calls it
        logger.setLevel(logging.INFO)
        assert AccessLogger(logger, "").enabled
    finally:
        root.handlers[:] = saved
