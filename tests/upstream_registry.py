"""A real upstream registry for tests: Debian's ``docker-registry`` plus image helpers.

Nothing here is a fixture.  Fixtures wrap these plain functions and classes, so tests
can decide on scope and lifetime themselves.

* :class:`RegistryProcess` runs ``docker-registry serve`` (distribution 2.8) on a
  loopback port and counts the requests it served from its own access log.
* :func:`push_image` / :func:`push_index` create images with random layers and push
  them over the registry HTTP API.
* :func:`skopeo_copy` pulls an image with skopeo into a ``dir:`` layout and
  :func:`dir_digests` says which blobs arrived.

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urljoin

import aiohttp
import pytest
from server_process import ServerError, ServerProcess

INSTALL_HINT = "apt-get install -y docker-registry skopeo"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# Uncompressed layer types: the layers are random bytes, and a gzip media type
# would make skopeo (or a mirror) try to decompress them.
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

Flavour = Literal["oci", "docker"]

_MEDIA_TYPES: dict[str, tuple[str, str, str, str]] = {
    # flavour: (manifest, config, layer, index)
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_TAR, OCI_INDEX),
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_TAR, DOCKER_MANIFEST_LIST),
}

# Readiness probes send this User-Agent so request counting can ignore them.
PROBE_USER_AGENT = "upstream-registry-readiness-probe"
CHUNK_SIZE = 1024 * 1024


def require_tool(name: str, hint: str = INSTALL_HINT) -> str:
    """Return the path of an external tool, or skip (fail on CI) when it is missing.

    On CI a missing tool is a broken image, not a reason to quietly skip the real
    end-to-end tests, so it fails loudly there.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name!r} not found on PATH; install it with: {hint}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- access log


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the upstream registry logged it (after the response completed)."""

    method: str
    path: str
    query: str
    status: int
    size: int  # response bytes actually written; short for aborted downloads
    user_agent: str


# gorilla/handlers combined format, as written by distribution 2.8 on stdout:
# 127.0.0.1 - - [22/Nov/2026:18:08:47 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r"^\S+ \S+ \S+ \[[^\]]*\] "
    r'"(?P<method>\S+) (?P<target>\S+) \S+" '
    r"(?P<status>\d{3}) (?P<size>\d+|-) "
    r'"(?:[^"\\]|\\.)*" "(?P<ua>(?:[^"\\]|\\.)*)"$'  # referer, user agent
)
_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/sha256:[0-9a-f]{64}$")


def parse_access_line(line: str) -> LoggedRequest | None:
    """Parse one access-log line; ``None`` for anything else (logrus lines, junk)."""
    match = _ACCESS_LINE.match(line.rstrip("\r\n"))
    if match is None:
        return None
    path, _, query = match["target"].partition("?")
    size = match["size"]
    return LoggedRequest(
        method=match["method"],
        path=path,
        query=query,
        status=int(match["status"]),
        size=0 if size == "-" else int(size),
        user_agent=match["ua"],
    )


def blob_repository(path: str) -> str | None:
    """The repository name of a ``/v2/<name>/blobs/sha256:...`` path, else ``None``."""
    match = _BLOB_PATH.match(path)
    return None if match is None else match["name"]


# --------------------------------------------------------------------------- process


def free_loopback_port() -> int:
    """Ask the kernel for an unused port; the registry binds it right after.

    docker-registry cannot take over a listening socket, so there is a small race
    window; the kernel rarely hands the same port out twice in a row.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RegistryError(ServerError):
    pass


class RegistryProcess(ServerProcess):
    """``docker-registry serve`` on 127.0.0.1 with filesystem storage.

    The port is chosen once, at construction, so ``url`` is known before the first
    start and stays the same across :meth:`restart` (upstream-down tests stop and
    start it while a mirror keeps pointing at the same address).  The log file is
    appended to across restarts so request counts cover the whole test.

    ``start``/``stop`` block for up to a few seconds; from a test whose event loop
    also runs the mirror, call them via ``await asyncio.to_thread(reg.restart)``.
    (SIGTERM stops it at once: the 2.8 drain timeout defaults to 0.)
    """

    name = "docker-registry"
    error = RegistryError

    def __init__(
        self,
        workdir: Path,
        *,
        storage_dir: Path | None = None,
        port: int | None = None,
        binary: str | None = None,
        extra_config: dict[str, Any] | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            workdir, workdir / "registry.log", port or free_loopback_port(), startup_timeout
        )
        self.binary = binary or require_tool("docker-registry")
        self.storage_dir = storage_dir or workdir / "registry-storage"
        self.config_path = workdir / "registry-config.yml"
        self._extra_config = extra_config or {}
        # Shared by every start so uploads begun before a restart stay valid.
        self._http_secret = secrets.token_hex(16)
        self._count_offset = 0  # see reset_counts()

    def config(self) -> dict[str, Any]:
        """The registry configuration (YAML is a superset of JSON, so it is written as JSON)."""
        cfg: dict[str, Any] = {
            "version": "0.1",
            # warn keeps startup chatter out; "response completed with error" lines
            # (level=error) still show up and help when a test fails.
            "log": {"level": "warn", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                # Purging would delete half-finished uploads behind a test's back.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": self._http_secret},
        }
        return _deep_merge(cfg, self._extra_config)

    def _prepare(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def _command(self) -> list[str]:
        return [self.binary, "serve", str(self.config_path)]

    def _env(self) -> dict[str, str]:
        # The registry reads REGISTRY_* variables as config overrides; keep the
        # machine's environment from leaking in.
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def _ready(self) -> bool:
        return _probe(self.url + "/v2/")

    # ---- request counting

    def reset_counts(self) -> None:
        """Make later :meth:`requests` calls ignore everything logged so far."""
        self._count_offset = _file_size(self.log_path)

    def requests(self) -> list[LoggedRequest]:
        """Requests logged since the last :meth:`reset_counts` (probes excluded).

        Call :meth:`settle` first: a line is written only after its response is done.
        """
        text = _read_from(self.log_path, self._count_offset).decode("utf-8", "replace")
        # A line without its newline is still being written; leave it for next time.
        complete = text[: text.rfind("\n") + 1]
        parsed = (parse_access_line(line) for line in complete.splitlines())
        return [r for r in parsed if r is not None and r.user_agent != PROBE_USER_AGENT]

    def count(self, method: str, path_contains: str) -> int:
        return sum(1 for r in self.requests() if r.method == method and path_contains in r.path)

    def blob_gets(self, name: str | None = None) -> int:
        """``GET /v2/<name>/blobs/sha256:...`` requests (any status), optionally for one repo."""
        return sum(1 for r in self.requests() if r.method == "GET" and _blob_of(r.path, name))

    def wait_quiet(self, quiet: float = 0.2, max_wait: float = 2.0) -> None:
        """Block until the log has not grown for ``quiet`` seconds (at most ``max_wait``)."""
        for delay in _quiet_delays(self.log_path, quiet, max_wait):
            time.sleep(delay)

    async def settle(self, quiet: float = 0.2, max_wait: float = 2.0) -> None:
        """Async :meth:`wait_quiet`: let in-flight access-log lines land before counting."""
        for delay in _quiet_delays(self.log_path, quiet, max_wait):
            await asyncio.sleep(delay)


def _blob_of(path: str, name: str | None) -> bool:
    repo = blob_repository(path)
    return repo is not None and (name is None or repo == name)


def _quiet_delays(path: Path, quiet: float, max_wait: float) -> Iterable[float]:
    """Yield sleep intervals until ``path`` stops growing; shared by sync and async waits."""
    step = 0.02
    deadline = time.monotonic() + max_wait
    last_size, last_change = _file_size(path), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last_change < quiet:
        yield step
        size = _file_size(path)
        if size != last_size:
            last_size, last_change = size, time.monotonic()


def _probe(url: str) -> bool:
    # No proxy handler: an HTTP_PROXY in the environment must not capture loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"User-Agent": PROBE_USER_AGENT})
    try:
        with opener.open(request, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- pushing


@dataclass(frozen=True)
class PushedImage:
    """What was pushed; for an index ``children`` holds the per-platform images."""

    name: str
    tag: str | None
    manifest_digest: str
    manifest_bytes: bytes
    media_type: str
    config_digest: str | None = None
    layer_digests: list[str] = field(default_factory=list)
    layer_sizes: list[int] = field(default_factory=list)
    child_digests: list[str] = field(default_factory=list)
    children: list[PushedImage] = field(default_factory=list)
    platform: tuple[str, str] | None = None  # (os, architecture) of an image

    @property
    def reference(self) -> str:
        """``name:tag``, or ``name@digest`` for an untagged push."""
        return f"{self.name}:{self.tag}" if self.tag else f"{self.name}@{self.manifest_digest}"

    def blob_digests(self) -> set[str]:
        """Config and layer digests, including those of all children."""
        own = set(self.layer_digests) | ({self.config_digest} if self.config_digest else set())
        return own.union(*(child.blob_digests() for child in self.children))

    def manifest_digests(self) -> set[str]:
        return {self.manifest_digest}.union(*(c.manifest_digests() for c in self.children))


@contextlib.asynccontextmanager
async def _client(session: aiohttp.ClientSession | None) -> AsyncIterator[aiohttp.ClientSession]:
    """Use the caller's session, or a short-lived one that is closed afterwards."""
    if session is not None:
        yield session
        return
    async with aiohttp.ClientSession() as own:
        yield own


async def push_image(
    registry_url: str,
    name: str,
    tag: str | None,
    layer_sizes: Sequence[int],
    media_type: Flavour = "oci",
    *,
    platform: tuple[str, str] = ("linux", "amd64"),
    session: aiohttp.ClientSession | None = None,
    tmp_dir: Path | None = None,
) -> PushedImage:
    """Push an image with random, incompressible layers of exactly ``layer_sizes`` bytes.

    ``tag=None`` pushes by digest only (as index children are).  Layers go through a
    temporary file so a 512 MiB layer never sits in memory.
    """
    manifest_type, config_type, layer_type, _ = _MEDIA_TYPES[media_type]
    async with _client(session) as client:
        layers = [
            await _push_random_layer(client, registry_url, name, n, tmp_dir) for n in layer_sizes
        ]
        digests = [digest for digest, _ in layers]
        config = json_bytes(_image_config(platform, digests))
        config_digest = sha256_digest(config)
        await put_blob(client, registry_url, name, config_digest, config)
        manifest = json_bytes(
            {
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": _descriptor(config_type, config_digest, len(config)),
                "layers": [_descriptor(layer_type, d, n) for d, n in layers],
            }
        )
        digest = await put_manifest(client, registry_url, name, tag, manifest, manifest_type)
    return PushedImage(
        name=name,
        tag=tag,
        manifest_digest=digest,
        manifest_bytes=manifest,
        media_type=manifest_type,
        config_digest=config_digest,
        layer_digests=digests,
        layer_sizes=[n for _, n in layers],
        platform=platform,
    )


async def push_index(
    registry_url: str,
    name: str,
    tag: str | None,
    platforms: Sequence[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
    layer_size: int = 32 * 1024,
    media_type: Flavour = "oci",
    *,
    session: aiohttp.ClientSession | None = None,
    tmp_dir: Path | None = None,
) -> PushedImage:
    """Push one single-layer image per platform (by digest), then an index naming them."""
    child_type, _, _, index_type = _MEDIA_TYPES[media_type]
    async with _client(session) as client:
        children = [
            await push_image(
                registry_url,
                name,
                None,
                [layer_size],
                media_type,
                platform=p,
                session=client,
                tmp_dir=tmp_dir,
            )
            for p in platforms
        ]
        index = json_bytes(
            {
                "schemaVersion": 2,
                "mediaType": index_type,
                "manifests": [_child_descriptor(child_type, c) for c in children],
            }
        )
        digest = await put_manifest(client, registry_url, name, tag, index, index_type)
    return PushedImage(
        name=name,
        tag=tag,
        manifest_digest=digest,
        manifest_bytes=index,
        media_type=index_type,
        child_digests=[c.manifest_digest for c in children],
        children=children,
    )


# docker-registry takes layers with `urls` (non-distributable, "foreign" layers) without
# holding their blobs only when this allows the URLs: the one way to have it serve a
# manifest naming digests of other algorithms (sha384, md5).
FOREIGN_LAYERS_ALLOWED = {"validation": {"manifests": {"urls": {"allow": ["^https://"]}}}}
FOREIGN_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"


async def push_index_with_foreign_digests(
    registry_url: str, name: str, tag: str, algorithms: Sequence[str] = ("sha384", "md5")
) -> PushedImage:
    """An OCI index (tagged) naming one image whose layers are a real one plus a foreign
    layer per algorithm, each named by a digest of that algorithm (of bytes never pushed).
    Needs a registry started with FOREIGN_LAYERS_ALLOWED."""
    async with aiohttp.ClientSession() as client:
        base = await push_image(registry_url, name, None, [16 * 1024], session=client)
        manifest = json.loads(base.manifest_bytes)
        for algorithm in algorithms:
            encoded = hashlib.new(algorithm, algorithm.encode()).hexdigest()
            layer = _descriptor(FOREIGN_LAYER, f"{algorithm}:{encoded}", 1024)
            layer["urls"] = [f"https://example.com/{algorithm}"]
            manifest["layers"].append(layer)
        child_bytes = json_bytes(manifest)
        child_digest = await put_manifest(
            client, registry_url, name, None, child_bytes, OCI_MANIFEST
        )
        child = dataclasses.replace(base, manifest_digest=child_digest, manifest_bytes=child_bytes)
        index = json_bytes(
            {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [_child_descriptor(OCI_MANIFEST, child)]}
        )  # fmt: skip
        digest = await put_manifest(client, registry_url, name, tag, index, OCI_INDEX)
    return PushedImage(
        name=name,
        tag=tag,
        manifest_digest=digest,
        manifest_bytes=index,
        media_type=OCI_INDEX,
        child_digests=[child_digest],
        children=[child],
    )


def json_bytes(obj: object) -> bytes:
    # Indented, not canonical: a mirror that re-serialises would change the digest.
    return json.dumps(obj, indent=2).encode()


def _descriptor(media_type: str, digest: str, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def _child_descriptor(media_type: str, child: PushedImage) -> dict[str, Any]:
    assert child.platform is not None
    os_name, arch = child.platform
    descriptor = _descriptor(media_type, child.manifest_digest, len(child.manifest_bytes))
    descriptor["platform"] = {"architecture": arch, "os": os_name}
    return descriptor


def _image_config(platform: tuple[str, str], layer_digests: list[str]) -> dict[str, Any]:
    os_name, arch = platform
    return {
        "architecture": arch,
        "os": os_name,
        "config": {},
        # Uncompressed layers: the diff_id is the blob digest itself.
        "rootfs": {"type": "layers", "diff_ids": layer_digests},
        # A random nonce keeps configs (and so manifests) of equal-looking images
        # distinct, so no two tests ever share a digest by accident.
        "history": [{"created_by": f"upstream_registry {secrets.token_hex(8)}"}],
    }


async def _push_random_layer(
    client: aiohttp.ClientSession, base: str, name: str, size: int, tmp_dir: Path | None
) -> tuple[str, int]:
    # Generating and hashing hundreds of MiB is CPU work: keep it off the event loop,
    # which may be serving the mirror under test at the same time.
    path, digest = await asyncio.to_thread(_write_random_file, size, tmp_dir)
    try:
        body = await asyncio.to_thread(path.open, "rb")
        try:
            await put_blob(client, base, name, digest, body)
        finally:
            body.close()
    finally:
        await asyncio.to_thread(path.unlink)
    return digest, size


# First bytes of gzip, zstd, bzip2 and xz streams: random data starting with one of
# them could be sniffed as compressed by skopeo's compression detection.
_COMPRESSION_LEAD_BYTES = frozenset({0x1F, 0x28, 0x42, 0xFD})


def _write_random_file(size: int, tmp_dir: Path | None) -> tuple[Path, str]:
    fd, name = tempfile.mkstemp(prefix="layer-", dir=tmp_dir)
    hasher = hashlib.sha256()
    with os.fdopen(fd, "wb") as f:
        written = 0
        while written < size:
            chunk = os.urandom(min(CHUNK_SIZE, size - written))
            if written == 0 and chunk[0] in _COMPRESSION_LEAD_BYTES:
                chunk = b"\0" + chunk[1:]
            hasher.update(chunk)
            f.write(chunk)
            written += len(chunk)
    return Path(name), "sha256:" + hasher.hexdigest()


async def put_blob(
    client: aiohttp.ClientSession, base: str, name: str, digest: str, body: bytes | BinaryIO
) -> None:
    """Monolithic upload: POST opens a session, one PUT with ``digest=`` completes it."""
    async with client.post(f"{base}/v2/{name}/blobs/uploads/") as resp:
        await _expect(resp, 202)
        location = urljoin(f"{base}/", resp.headers["Location"])
    separator = "&" if "?" in location else "?"
    # A file object is streamed by aiohttp in chunks, with Content-Length from its size.
    async with client.put(
        f"{location}{separator}digest={digest}",
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    ) as resp:
        await _expect(resp, 201)


async def put_manifest(
    client: aiohttp.ClientSession,
    base: str,
    name: str,
    tag: str | None,
    manifest: bytes,
    media_type: str,
) -> str:
    digest = sha256_digest(manifest)
    async with client.put(
        f"{base}/v2/{name}/manifests/{tag or digest}",
        data=manifest,
        headers={"Content-Type": media_type},
    ) as resp:
        await _expect(resp, 201)
        returned = resp.headers.get("Docker-Content-Digest")
    assert returned == digest, f"registry computed {returned}, expected {digest}"
    return digest


async def _expect(resp: aiohttp.ClientResponse, status: int) -> None:
    if resp.status != status:
        body = await resp.text(errors="replace")
        raise AssertionError(
            f"{resp.method} {resp.url} -> {resp.status}, expected {status}: {body[:2000]}"
        )


# --------------------------------------------------------------------------- skopeo


def skopeo_copy(
    src: str,
    dest_dir: Path,
    *,
    all_images: bool = False,
    timeout: float = 120,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy docker://SRC dir:DEST`` over plain HTTP, isolated from host config.

    ``src`` is ``host:port/name:tag`` (or ``...@sha256:...``); a ``transport:`` prefix is
    kept as given.  Raises AssertionError with skopeo's stderr on failure.  From a test
    whose event loop serves the mirror, use :func:`skopeo_copy_async` instead.
    """
    skopeo = require_tool("skopeo")
    source = src if "://" in src else f"docker://{src}"
    with tempfile.TemporaryDirectory(prefix="skopeo-") as scratch:
        root = Path(scratch)
        cmd = [
            skopeo,
            "--policy", str(_write_isolation_files(root)),
            "--registries.d", str(root / "registries.d"),
            "--tmpdir", str(root / "tmp"),
            "copy", "--src-tls-verify=false",
            *(["--all"] if all_images else []),
            *extra_args,
            source, f"dir:{dest_dir}",
        ]  # fmt: skip
        result = subprocess.run(
            cmd, env=_isolated_env(root), capture_output=True, text=True, timeout=timeout
        )
    if result.returncode != 0:
        raise AssertionError(f"skopeo copy {source} failed ({result.returncode}):\n{result.stderr}")
    return result


def skopeo_inspect(src: str, *, raw: bool = False, timeout: float = 60) -> str:
    """``skopeo inspect [--raw] docker://SRC`` over plain HTTP; its standard output."""
    skopeo = require_tool("skopeo")
    with tempfile.TemporaryDirectory(prefix="skopeo-") as scratch:
        root = Path(scratch)
        _write_isolation_files(root)
        cmd = [skopeo, "--registries.d", str(root / "registries.d"), "inspect",
               "--tls-verify=false", *(["--raw"] if raw else []), f"docker://{src}"]  # fmt: skip
        result = subprocess.run(
            cmd, env=_isolated_env(root), capture_output=True, text=True, timeout=timeout
        )
    if result.returncode != 0:
        raise AssertionError(f"skopeo inspect {src} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


async def skopeo_copy_async(
    src: str,
    dest_dir: Path,
    *,
    all_images: bool = False,
    timeout: float = 120,  # noqa: ASYNC109 - the subprocess deadline, as in skopeo_copy
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """:func:`skopeo_copy` in a thread, so the event loop (and a mirror on it) keeps serving."""
    return await asyncio.to_thread(
        skopeo_copy, src, dest_dir, all_images=all_images, timeout=timeout, extra_args=extra_args
    )


def _write_isolation_files(root: Path) -> Path:
    """Create policy, empty registries config/dirs and a fake HOME; return the policy path."""
    for sub in ("registries.d", "tmp", "home", "runtime"):
        (root / sub).mkdir()
    (root / "registries.conf").write_text("")  # no mirrors, no short-name aliases
    (root / "containers.conf").write_text("")
    policy = root / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return policy


def _isolated_env(root: Path) -> dict[str, str]:
    # Built from scratch rather than copied: no proxies, auth files or XDG dirs of
    # the host can change what skopeo does.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root / "home"),
        "XDG_RUNTIME_DIR": str(root / "runtime"),
        "XDG_CONFIG_HOME": str(root / "home" / ".config"),
        "TMPDIR": str(root / "tmp"),
        "REGISTRY_AUTH_FILE": str(root / "auth.json"),
        "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
        "CONTAINERS_CONF": str(root / "containers.conf"),
    }


_HEX_NAME = re.compile(r"^[0-9a-f]{64}$")


def dir_digests(dest_dir: Path) -> set[str]:
    """sha256 digests of every file skopeo wrote into a ``dir:`` layout (except ``version``).

    Blob files are named by their hex digest; each is re-hashed here and a mismatch
    raises AssertionError, so a mirror serving wrong bytes cannot hide behind names.
    Manifest files (``manifest.json``, ``<hex>.manifest.json``) contribute their digest.
    """
    digests: set[str] = set()
    for path in sorted(dest_dir.iterdir()):
        if path.name == "version" or not path.is_file():
            continue
        digest = _hash_file(path)
        if _HEX_NAME.match(path.name):
            assert digest == f"sha256:{path.name}", f"{path} has content {digest}"
        digests.add(digest)
    return digests


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()
