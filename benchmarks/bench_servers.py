"""The contenders of benchmarks/run.py, each a process of its own on a loopback port.

- `direct`: the upstream docker-registry itself (the reference for cold figures);
- `mirror`: `mirror serve --config FILE`, the upstream as its only upstream;
- `registry-proxy`: a second docker-registry with `proxy: {remoteurl: UPSTREAM}`;
- `nginx`: nginx serving the blob and manifest files with sendfile (the physical
  reference for cache hits);
- `nginx-cache`: nginx as a caching proxy, as the popular nginx registry caches set it
  up: `proxy_cache` for blobs and manifests by digest, `proxy_cache_lock on`, tags and
  everything else proxied uncached, sendfile on;
- `bare-aiohttp`: bench_bare.py, one aiohttp process answering the manifest's bytes from
  memory with the mirror's headers, no middleware (the ceiling for a Python answer; it
  serves that manifest only).

`Lab.running(kind)` starts a fresh one (new process, empty cache) and removes its
directory afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_clients import child_pids, cpu_ticks
from conftest import MirrorProcess
from server_process import ServerError, ServerProcess
from upstream_registry import RegistryProcess, free_loopback_port

DIRECT, MIRROR, REGISTRY_PROXY = "direct", "mirror", "registry-proxy"
NGINX, NGINX_CACHE = "nginx", "nginx-cache"
BARE = "bare-aiohttp"
KINDS = (DIRECT, MIRROR, REGISTRY_PROXY, NGINX, NGINX_CACHE, BARE)
READY_PATH = "/.bench-ready"


class Contender(Protocol):
    """A running server under test."""

    @property
    def url(self) -> str: ...

    def pids(self) -> list[int]: ...

    def stop(self) -> None: ...


class BenchRegistry(RegistryProcess):
    """A docker-registry that tells its process id and waits until it is idle."""

    def pids(self) -> list[int]:
        return [self._proc.pid] if self._proc is not None and self.running else []

    def quiesce(self, quiet: float, max_wait: float = 30.0) -> None:
        """Block until neither the access log nor the process's CPU time has moved for
        `quiet` seconds (at most `max_wait`). A request is logged only once its answer is
        done, and a contender may still be downloading when its client has finished
        (docker-registry's proxy stores a blob with a second GET of its own)."""
        deadline = time.monotonic() + max_wait
        last, since = self._activity(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            time.sleep(0.03)
            now = self._activity()
            if now != last:
                last, since = now, time.monotonic()

    def _activity(self) -> tuple[int, int]:
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        return size, sum(cpu_ticks(pid) for pid in self.pids())


class Direct:
    """The upstream itself; it outlives every figure, so stopping it does nothing."""

    def __init__(self, upstream: BenchRegistry) -> None:
        self.upstream = upstream
        self.url = upstream.url

    def pids(self) -> list[int]:
        return self.upstream.pids()

    def stop(self) -> None:
        pass


class MirrorServer:
    """`mirror serve --config FILE` with an empty cache under `workdir`, once all its
    `workers` processes serve."""

    def __init__(self, workdir: Path, upstream_url: str, workers: int) -> None:
        workdir.mkdir(parents=True)
        config = workdir / "mirror.yaml"
        config.write_text(mirror_config(workdir / "cache", upstream_url) + f"workers: {workers}\n")
        self.process = MirrorProcess(["--config", str(config)], workdir / "mirror.log")
        self.url = self.process.url
        deadline = time.monotonic() + 30
        while self.process.log().count("serving cache hits") < workers - 1:
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"mirror workers did not start:\n{self.process.log()}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The primary, its workers (and multiprocessing's resource tracker)."""
        if self.process.proc.poll() is not None:
            return []
        return [self.process.proc.pid, *child_pids(self.process.proc.pid)]

    def stop(self) -> None:
        self.process.stop()


def mirror_config(storage: Path, upstream_url: str) -> str:
    """The upstream as the only (so default) upstream; defaults for everything else."""
    return (
        f"storage: {{path: '{storage}', max_size: 4GiB}}\n"
        "upstreams:\n"
        f"  - {{name: upstream, url: '{upstream_url}', default: true, tag_ttl: 5m}}\n"
    )


class NginxServer(ServerProcess):
    """nginx in the foreground with its own prefix, config, pid and logs under `workdir`."""

    name = "nginx"

    def __init__(self, workdir: Path, binary: str, workers: str, http: str, server: str) -> None:
        super().__init__(workdir, workdir / "nginx.out", free_loopback_port(), 15.0)
        self.binary = binary
        self.conf = workdir / "nginx.conf"
        self._workers, self._http, self._server = workers, http, server

    def _prepare(self) -> None:
        for sub in ("tmp", "logs"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.conf.write_text(
            nginx_conf(self.workdir, self.port, self._workers, self._http, self._server)
        )

    def _command(self) -> list[str]:
        prefix = str(self.workdir)
        error_log = str(self.workdir / "logs" / "error.log")
        return [
            self.binary,
            "-p",
            prefix,
            "-c",
            str(self.conf),
            "-e",
            error_log,
            "-g",
            "daemon off;",
        ]

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def _ready(self) -> bool:
        return probe(self.url + READY_PATH)

    def pids(self) -> list[int]:
        if self._proc is None or not self.running:
            return []
        return [self._proc.pid, *child_pids(self._proc.pid)]


class BareServer(ServerProcess):
    """bench_bare.py: the manifest file's bytes at its registry path, from memory."""

    name = "bare-aiohttp"

    def __init__(self, workdir: Path, static_root: Path, manifest: Path, media_type: str) -> None:
        super().__init__(workdir, workdir / "bare.out", free_loopback_port(), 15.0)
        self.manifest = manifest
        self.path = "/" + manifest.relative_to(static_root).as_posix()
        self.media_type = media_type

    def _command(self) -> list[str]:
        script = Path(__file__).resolve().parent / "bench_bare.py"
        return [
            sys.executable,
            str(script),
            f"--port={self.port}",
            f"--path={self.path}",
            f"--body={self.manifest}",
            f"--media-type={self.media_type}",
            f"--digest={self.manifest.name}",
            f"--ready={READY_PATH}",
        ]

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _ready(self) -> bool:
        return probe(self.url + READY_PATH)

    def pids(self) -> list[int]:
        return [self._proc.pid] if self._proc is not None and self.running else []


def probe(url: str) -> bool:
    """Whether `url` answers 200 (no proxy from the environment is ever used)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def nginx_conf(prefix: Path, port: int, workers: str, http: str, server: str) -> str:
    """A whole nginx.conf: every path under `prefix`, one server on 127.0.0.1:`port`."""
    temp = {n: prefix / "tmp" / n for n in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {prefix}/logs/access.log;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    types {{ }}
    default_type application/octet-stream;
{http}
    server {{
        listen 127.0.0.1:{port};
        location = {READY_PATH} {{ access_log off; return 200; }}
{server}
    }}
}}
"""


def static_server(root: Path, manifest_type: str) -> str:
    """Files under `root` at their registry paths; manifests by digest with their type."""
    return f"""
        root {root};
        location ~ "^/v2/.+/manifests/sha256:[0-9a-f]{{64}}$" {{
            default_type {manifest_type};
        }}
"""


def cache_http(prefix: Path, upstream_host: str) -> str:
    return f"""
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=registry:32m max_size=4g
                     inactive=7d use_temp_path=off;
    upstream registry {{
        server {upstream_host};
        keepalive 32;
    }}
"""


CACHE_SERVER = """
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 900s;
        # Immutable content (blobs, manifests by digest): cached, one fill at a time.
        location ~ "^/v2/.+/(blobs|manifests)/sha256:[0-9a-f]{64}$" {
            proxy_pass http://registry;
            proxy_cache registry;
            proxy_cache_key $uri;
            proxy_cache_valid 200 206 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 880s;
            proxy_cache_revalidate on;
            proxy_ignore_headers X-Accel-Expires Expires Cache-Control Set-Cookie;
            proxy_ignore_client_abort on;
            add_header X-Cache-Status $upstream_cache_status;
        }
        # Tags, /v2/, listings: proxied, not cached.
        location / {
            proxy_pass http://registry;
        }
"""


@dataclass
class Lab:
    """Starts contenders against one upstream; nginx may be missing (then `nginx` is None)."""

    work: Path
    upstream: BenchRegistry
    nginx: str | None
    nginx_workers: str
    mirror_workers: int
    static_root: Path
    manifest_type: str
    static_manifest: Path | None = None  # the last manifest published (bare-aiohttp's)
    _serial: Iterator[int] = field(default_factory=itertools.count)

    @contextlib.contextmanager
    def running(self, kind: str) -> Iterator[Contender]:
        """A fresh `kind` (new process, empty cache), stopped and removed afterwards."""
        workdir = self.work / f"{kind}-{next(self._serial)}"
        server = self._start(kind, workdir)
        try:
            yield server
        finally:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    def _start(self, kind: str, workdir: Path) -> Contender:
        if kind == DIRECT:
            return Direct(self.upstream)
        if kind == MIRROR:
            return MirrorServer(workdir, self.upstream.url, self.mirror_workers)
        if kind == REGISTRY_PROXY:
            proxy = {"proxy": {"remoteurl": self.upstream.url}}
            registry = BenchRegistry(workdir, extra_config=proxy)
            registry.start()
            return registry
        if kind == BARE:
            if self.static_manifest is None:
                raise ServerError("no manifest published for bare-aiohttp")
            bare = BareServer(workdir, self.static_root, self.static_manifest, self.manifest_type)
            bare.start()
            return bare
        return self._start_nginx(kind, workdir)

    def _start_nginx(self, kind: str, workdir: Path) -> Contender:
        if self.nginx is None:
            raise ServerError("nginx is not installed")
        if kind == NGINX:
            server = static_server(self.static_root, self.manifest_type)
            nginx = NginxServer(workdir, self.nginx, self.nginx_workers, "", server)
        elif kind == NGINX_CACHE:
            http = cache_http(workdir, self.upstream.host)
            nginx = NginxServer(workdir, self.nginx, self.nginx_workers, http, CACHE_SERVER)
        else:
            raise ValueError(f"unknown contender {kind!r}")
        nginx.start()
        return nginx

    def publish_static(self, name: str, digest: str, content: bytes | None = None) -> None:
        """Lay a blob (hard-linked from the upstream's storage) or a manifest (`content`)
        at its registry path under the nginx root."""
        kind = "blobs" if content is None else "manifests"
        path = self.static_root / "v2" / name / kind / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            path.write_bytes(content)
            self.static_manifest = path
            return
        source = self.upstream_blob(digest)
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)

    def upstream_blob(self, digest: str) -> Path:
        """The file holding a blob in the upstream's storage (distribution's layout)."""
        hex_ = digest.split(":", 1)[1]
        blobs = self.upstream.storage_dir / "docker/registry/v2/blobs/sha256"
        return blobs / hex_[:2] / hex_ / "data"
