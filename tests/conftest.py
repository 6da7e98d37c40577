"""Shared fixtures: a real upstream registry, the fake one, and the mirror in-process or as a
subprocess."""

from __future__ import annotations

import functools
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fake_upstream import FakeUpstream, S, Serve, Served
from podman import podman_cleanup, require_podman
from pytest_aiohttp import AiohttpClient, AiohttpServer
from upstream_registry import RegistryProcess, free_loopback_port

from mirror.app import make_app
from mirror.config import Config, Listen, StorageConfig, UpstreamConfig, default_hosts
from mirror.web.registry import BLOBS

# The fleet engines (S3, PostgreSQL) are session fixtures every test module may use.
pytest_plugins = ["engines"]

MirrorClient = TestClient[web.Request, web.Application]
REPO = Path(__file__).resolve().parent.parent
USERS = {"alice": "alice-secret", "bob": "bob-secret"}


async def downloads_stored(client: MirrorClient) -> None:
    """Until the blobs the mirror is downloading are cached: a client gets its last byte
    once the blob is verified, before the file is committed and indexed."""
    assert client.app is not None
    await client.app[BLOBS].idle()


def write_htpasswd(path: Path, users: dict[str, str] = USERS) -> Path:
    """bcrypt entries as `htpasswd -B` writes them (`$2y$`), at the cheapest cost."""
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}"
        for user, pw in users.items()
    ]
    path.write_text("\n".join(line.replace("$2b$", "$2y$", 1) for line in lines) + "\n")
    return path


@pytest.fixture
def documented_config(tmp_path: Path) -> Path:
    """config/mirror.yaml, with its htpasswd path pointed at a file that exists."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    text = (REPO / "config" / "mirror.yaml").read_text()
    assert "/etc/mirror/htpasswd" in text
    config = tmp_path / "documented.yaml"
    config.write_text(text.replace("/etc/mirror/htpasswd", str(htpasswd)))
    return config


@pytest.fixture
def podman_work(tmp_path: Path) -> Iterator[Path]:
    """podman's sandbox directory; every image is removed again at teardown."""
    require_podman()
    work = tmp_path / "podman"
    yield work
    podman_cleanup(work)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    """A real docker-registry on a free loopback port, with its own storage."""
    with RegistryProcess(tmp_path / "upstream") as reg:
        yield reg


@pytest.fixture
async def serve(aiohttp_server: AiohttpServer) -> AsyncIterator[Serve]:
    """`await serve(fake)` starts a FakeUpstream or a CDN on a free loopback port and returns
    it. At teardown every hang and stall is released, so that no handler outlives its server."""
    started: list[Served] = []

    async def start(fake: S) -> S:
        server = await aiohttp_server(fake.app)
        assert server.port is not None
        fake.port = server.port
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.release.set()


@pytest.fixture
async def fake_upstream(serve: Serve) -> FakeUpstream:
    """The fake upstream, started: no auth, nothing stored, answering as asked."""
    return await serve(FakeUpstream())


def mirror_config(
    storage: Path,
    upstream_url: str,
    tag_ttl: float = 300.0,
    port: int = 0,
    hosts: tuple[str, ...] | None = None,
    budget: dict[str, Any] | None = None,
    upstream_fields: dict[str, Any] | None = None,
) -> Config:
    """One upstream; `hosts` defaults to the upstream's own host:port; `budget` holds
    StorageConfig fields (max_size, watermarks, max_age); `upstream_fields` more
    UpstreamConfig fields (timeouts, retries, ...)."""
    upstream = UpstreamConfig(
        name="upstream",
        url=upstream_url,
        hosts=hosts or default_hosts(upstream_url),
        default=True,
        tag_ttl=tag_ttl,
        **(upstream_fields or {}),
    )
    return Config(
        listen=Listen("127.0.0.1", port),
        storage=StorageConfig(path=storage, **(budget or {})),
        upstreams=(upstream,),
    )


@pytest.fixture
def make_mirror(aiohttp_client: AiohttpClient, tmp_path: Path) -> Callable[..., object]:
    """Start the mirror in-process (built by `make_app`, as in production) for an upstream URL.

    `await make_mirror(url, tag_ttl=..., storage=..., hosts=..., budget=..., upstream=...)`
    (`upstream`: more UpstreamConfig fields) returns an aiohttp
    TestClient whose `server.port` real clients such as skopeo can use.
    """

    async def start(
        upstream_url: str,
        *,
        tag_ttl: float = 300.0,
        storage: Path | None = None,
        hosts: tuple[str, ...] | None = None,
        budget: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
    ) -> MirrorClient:
        config = mirror_config(
            storage or tmp_path / "cache",
            upstream_url,
            tag_ttl,
            hosts=hosts,
            budget=budget,
            upstream_fields=upstream,
        )
        return await aiohttp_client(make_app(config))

    return start


class MirrorProcess:
    """`mirror serve` as a real subprocess, started from the console script."""

    def __init__(
        self, args: list[str], log_path: Path, ca: Path | None = None, port: int | None = None
    ) -> None:
        """`ca`: the mirror serves HTTPS with a certificate this CA file vouches for;
        `port`: the one to listen on (default: a free one)."""
        self.port = port or free_loopback_port()
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self._ssl = ssl.create_default_context(cafile=ca) if ca else None
        self.log_path = log_path
        self._log = log_path.open("ab")
        command = [_console_script(), "serve", "--listen", self.host, *args]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mirror exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                    f"{self.url}/v2/", timeout=1, context=self._ssl
                ) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"mirror did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@functools.cache
def _console_script() -> str:
    """The `mirror` script installed next to this interpreter (what `pip install .` made),
    once it is known to run this checkout's code: a copy installed earlier would be
    tested (and benchmarked) in its place."""
    script = Path(sys.executable).parent / "mirror"
    if not script.exists():
        raise AssertionError(f"console script {script} missing: run pip install '.[test]'")
    where = [sys.executable, "-c", "import mirror; print(mirror.__file__)"]
    installed = Path(subprocess.run(where, cwd="/", capture_output=True, text=True).stdout.strip())
    if _sources(installed.parent) != _sources(CHECKOUT):
        raise AssertionError(
            f"the `mirror` script runs {installed.parent}, not this checkout's {CHECKOUT}:"
            " pip install -e . (or install this checkout again)"
        )
    return str(script)


CHECKOUT = Path(__file__).resolve().parent.parent / "mirror"


def _sources(package: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(package)): path.read_bytes()
        for path in sorted(package.rglob("*"))
        if path.suffix in (".py", ".sql")
    }


@pytest.fixture
def start_mirror_process(tmp_path: Path) -> Iterator[Callable[..., MirrorProcess]]:
    """`start_mirror_process(*args, ca=None, port=None)` runs `mirror serve --listen
    127.0.0.1:PORT *args` (over HTTPS, with `ca` the CA file of the configured certificate)."""
    started: list[MirrorProcess] = []

    def start(*args: str, ca: Path | None = None, port: int | None = None) -> MirrorProcess:
        process = MirrorProcess(list(args), tmp_path / f"mirror-{len(started)}.log", ca, port)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
