"""What clients may hold of a real `mirror serve` (`limits:`), and how long a SIGTERM
takes: connections that never send their headers or idle between requests are closed;
the open-files limit is raised and caps the connections; out of descriptors, accepting
pauses and is logged once per episode; the process exits within 30 s of SIGTERM even
with answers that do not end."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fake_upstream import FakeUpstream
from server_process import ServerProcess
from test_access import write_certificate
from upstream_registry import free_loopback_port, require_tool

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

KIB, MIB = 1024, 1024 * 1024
PING = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n"
UNUSED_UPSTREAM = "http://127.0.0.1:9"  # never contacted: only /v2/ is asked


def write_config(tmp_path: Path, upstream: str = UNUSED_UPSTREAM, limits: str = "") -> Path:
    config = tmp_path / "mirror.yaml"
    text = f"storage: {{path: {tmp_path / 'cache'}}}\n"
    text += f"upstreams: [{{name: up, url: '{upstream}'}}]\n"
    config.write_text(text + (f"limits: {limits}\n" if limits else ""))
    return config


class LimitedMirror(ServerProcess):
    """`mirror serve` started with its open-files limit at `nofile` (soft, hard)."""

    name = "mirror"

    def __init__(self, tmp_path: Path, config: Path, nofile: tuple[int, int]) -> None:
        super().__init__(tmp_path / "run", tmp_path / "mirror.log", free_loopback_port(), 15.0)
        self.config = config
        self.nofile = nofile

    def _command(self) -> list[str]:
        prlimit = require_tool("prlimit", "apt-get install -y util-linux")
        script = str(Path(sys.executable).parent / "mirror")
        soft, hard = self.nofile
        return [prlimit, f"--nofile={soft}:{hard}", "--", script, "serve", "--listen", self.host,
                "--config", str(self.config)]  # fmt: skip

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _ready(self) -> bool:
        return ping(self.url, timeout=1) == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def open_files_limit(self) -> tuple[int, int]:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
        raise AssertionError("no open files limit in /proc")


def ping(url: str, timeout: float) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def answered_within(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ping(url, timeout=1) == 200:
            return True
        time.sleep(0.1)
    return False


async def closed_after(reader: asyncio.StreamReader, since: float) -> float:
    """Seconds from `since` until the mirror closed this connection (within 15 s)."""
    async with asyncio.timeout(15):
        try:
            while await reader.read(64 * KIB):
                pass
        except ConnectionResetError:
            pass
    return time.monotonic() - since


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One GET /v2/ on a kept-alive connection: its status."""
    writer.write(PING)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
    return int(head.split()[1])


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
    """A request's headers a byte at a time, until the mirror closes the connection."""
    for byte in data:
        if writer.is_closing():
            return
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(pause)


async def test_connections_without_complete_headers_are_closed_and_others_answered(
    start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    config = write_config(tmp_path, limits="{header_timeout: 2s, keepalive_timeout: 4s}")
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    opened = time.monotonic()
    idle = [await asyncio.open_connection("127.0.0.1", mirror.port) for _ in range(200)]
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", mirror.port)
    slowloris = asyncio.create_task(trickle(slow_writer, PING[:-2] + b"X: " + b"a" * 200, 0.1))
    # Meanwhile everyone else is answered.
    assert await asyncio.to_thread(ping, mirror.url, 2) == 200
    ended = await asyncio.gather(*(closed_after(reader, opened) for reader, _ in idle))
    assert min(ended) > 1.5 and max(ended) < 2 + 3  # header_timeout, with room for a slow loop
    assert 1.5 < await closed_after(slow_reader, opened) < 2 + 3
    await slowloris

    # Between requests a connection is kept for keepalive_timeout, longer than header_timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
    assert await exchange(reader, writer) == 200
    await asyncio.sleep(2.5)
    assert await exchange(reader, writer) == 200
    assert 3.5 < await closed_after(reader, time.monotonic()) < 4 + 3

    # A later request on a kept-alive connection has header_timeout from its first byte.
    reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
    assert await exchange(reader, writer) == 200
    began = time.monotonic()
    slowloris = asyncio.create_task(trickle(writer, PING[:-2] + b"X: " + b"a" * 200, 0.1))
    assert 1.5 < await closed_after(reader, began) < 3.5  # before keepalive_timeout (4s)
    await slowloris
    for _, idle_writer in idle:
        idle_writer.close()
    await asyncio.to_thread(mirror.stop)
    assert "Traceback" not in mirror.log()


def test_over_tls_a_stalled_handshake_is_closed_and_refusals_are_encrypted(
    start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """The handshake counts against header_timeout; past max_connections the 503 is said
    over TLS."""
    cert, key = write_certificate(tmp_path / "tls")
    config = write_config(tmp_path, limits="{header_timeout: 2s, max_connections: 2}")
    config.write_text(config.read_text() + f"tls: {{cert: {cert}, key: {key}}}\n")
    mirror = start_mirror_process("--config", str(config), ca=cert)
    context = ssl.create_default_context(cafile=cert)
    with contextlib.ExitStack() as stack:
        began = time.monotonic()
        stalled = stack.enter_context(socket.create_connection(("127.0.0.1", mirror.port), 10))
        assert stalled.recv(1) == b""  # no ClientHello: closed
        assert 1.5 < time.monotonic() - began < 5
        held = [
            stack.enter_context(
                context.wrap_socket(
                    socket.create_connection(("127.0.0.1", mirror.port), 5),
                    server_hostname="127.0.0.1",
                )
            )
            for _ in range(3)
        ]
        assert held[2].recv(64).startswith(b"HTTP/1.1 503")
    mirror.stop()
    assert "Traceback" not in mirror.log()


def test_open_files_limit_is_raised_and_bounds_the_connections(tmp_path: Path) -> None:
    """Started at soft 128 and hard 256 (the hard limit itself low): the soft limit is
    raised to 256, which allows 64 connections (64 descriptors kept, 2 per download of
    max_fetches 32, 2 per connection); past those, a flood gets 503 and nothing breaks."""
    config = write_config(tmp_path, limits="{header_timeout: 3s}")
    with LimitedMirror(tmp_path, config, (128, 256)) as mirror:
        assert mirror.open_files_limit() == (256, 256)
        log = mirror.log()
        assert "open files limit raised from 128 to 256" in log
        assert "client connections: at most 64 per process" in log
        flood = [socket.create_connection(("127.0.0.1", mirror.port), 5) for _ in range(300)]
        refused = 0
        for sock in flood:
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):  # held: one of the 64
                refused += sock.recv(64).startswith(b"HTTP/1.1 503")
        assert refused >= 300 - 64 - 8  # a few may still have been starting
        for sock in flood:
            sock.close()
        assert answered_within(mirror.url, 10)
        log = mirror.log()
    assert log.count("refusing new ones with 503") == 1
    assert "Traceback" not in log and "cannot accept" not in log


def test_out_of_descriptors_accepting_pauses_and_is_logged_once_per_episode(
    tmp_path: Path,
) -> None:
    """Descriptors also run out for other reasons than client sockets (downloads, blobs
    being sent): here the running process's limit is lowered below what it holds."""
    config = write_config(tmp_path)
    with LimitedMirror(tmp_path, config, (128, 256)) as mirror:
        prlimit = require_tool("prlimit", "apt-get install -y util-linux")
        subprocess.run([prlimit, f"--pid={mirror.pid}", "--nofile=40:256"], check=True)
        for _ in range(2):  # two episodes
            flood = [socket.create_connection(("127.0.0.1", mirror.port), 5) for _ in range(100)]
            time.sleep(2)  # several pauses and retries
            for sock in flood:
                sock.close()
            assert answered_within(mirror.url, 10)
        log = mirror.log()
    assert "Traceback" not in log
    assert len(log) < 20_000
    assert log.count("cannot accept connections: Too many open files") == 2
    assert log.count("accepting connections again") == 2


async def test_sigterm_ends_the_process_within_30s_whatever_answers_are_under_way(
    fake_upstream: FakeUpstream, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """A download whose upstream stalls and a client that stops reading a cached blob:
    neither answer ends by itself, and both are cut after the grace period."""
    cached = fake_upstream.blobs.put(os.urandom(8 * MIB))  # more than the sockets' buffers hold
    stalled = fake_upstream.blobs.put(os.urandom(1 * MIB))
    config = write_config(tmp_path, fake_upstream.url)
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    stored = tmp_path / "cache" / "blobs" / "sha256" / cached[7:9] / cached[7:]
    async with asyncio.timeout(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
        writer.write(f"GET /v2/x/blobs/{cached} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        await reader.readexactly(8 * MIB)  # the head and most of the blob: now cached
    for _ in range(250):  # committed just after the last byte went out
        if stored.exists():
            break
        await asyncio.sleep(0.02)
    fake_upstream.blobs.stall_after, fake_upstream.blobs.stalls = 256 * KIB, 1
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KIB)
    slow.connect(("127.0.0.1", mirror.port))
    slow.sendall(f"GET /v2/x/blobs/{cached} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
    async with asyncio.timeout(20):
        stalled_reader, stalled_writer = await asyncio.open_connection("127.0.0.1", mirror.port)
        stalled_writer.write(f"GET /v2/x/blobs/{stalled} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        await stalled_reader.readexactly(128 * KIB)
    began = time.monotonic()
    mirror.proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(mirror.proc.wait, 35)
    finally:
        elapsed = time.monotonic() - began
        fake_upstream.release.set()
        slow.close()
        stalled_writer.close()
        writer.close()
    assert code == 0
    assert elapsed < 30
    log = mirror.log()
    assert "cut 2 answers still running after 25s" in log
    assert "Traceback" not in log
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == cached[7:]  # the cache intact
