"""Real podman (4.3, rootful) pulling through a registry mirror, isolated from the host.

Nothing here is a fixture; tests wrap these functions.

* :func:`podman_pull` writes a ``registries.conf`` naming ``mirror_location`` as the one
  mirror of ``registry`` (``insecure = true``: plain HTTP) and runs ``podman pull``;
  :func:`podman_pull_async` does the same from a thread, so an aiohttp server on the
  test's event loop keeps serving meanwhile.
* :func:`podman_rmi`, :func:`podman_image_digest`, :func:`run_podman` work on the same
  storage; :func:`podman_cleanup` removes every image and checks nothing is left behind.
* :func:`push_tar_image` pushes an image whose layers are real tar archives: podman
  unpacks every layer, so images from ``upstream_registry.push_image`` (random bytes)
  only pull with ``layer_sizes`` of ``[0]`` or ``[]`` (an empty blob is an empty tar).

Isolation.  All state lives under ``work``: storage (``vfs``, in ``work/root``; the
runroot must be at most 50 characters long, so it is
``/tmp/podman-harness-<hash of work>``, linked from ``work/runroot`` and removed by
:func:`podman_cleanup`), libpod's database, locks (file locks, not ``/dev/shm``), HOME,
XDG dirs, TMPDIR, and the config files the environment points at (containers.conf,
storage.conf, auth.json, a policy accepting anything).  The environment is built from
scratch.  podman 4.3 still reads a few host paths no variable moves, so each podman run
gets a private mount namespace (``unshare --mount``) in which a tmpfs hides those that
exist: ``/etc/containers/registries.conf.d`` (drop-ins there override our
``[[registry]]`` entries; ``shortnames.conf`` would resolve short names),
``/etc/containers/registries.d`` (signature lookaside), ``/etc/containers/certs.d``,
``/etc/docker/certs.d``, ``/var/lib`` (rootful c/image writes its blob-info cache to
``/var/lib/containers/cache`` whatever ``--root`` says) and ``/run`` (netavark's
``/run/containers/networks``).  Mounts made in that namespace die with it, and a
rootful pull starts no pause process or conmon; every process of the run's session is
still checked for and killed after it (and on timeout).  So root is required (see
:func:`require_podman`).  Concurrent runs on one ``work`` are fine (storage locks).

What podman 4.3 sends to a mirror ``127.0.0.1:PORT`` (``insecure = true``): a TLS
ClientHello to ``https://…/v2/`` first ("server gave HTTP response to HTTPS client";
the plain-HTTP server answers 400 before routing, so a registry's access log does not
show it), then ``GET /v2/``, ``GET /v2/<repo>/manifests/<tag>`` (no HEAD, no ``?ns=``;
six separate ``Accept`` lines, as skopeo), then ``GET`` of the config and of every
layer not already in storage, in parallel.  Every request carries ``User-Agent:
containers/5.23.1 (github.com/containers/image)``, ``Docker-Distribution-Api-Version:
registry/2.0`` and ``Connection: close`` (c/image disables keep-alive: one TCP
connection per request).  With a path prefix (``127.0.0.1:PORT/second``) the
repository becomes ``second/<repo>``.  An image already present is re-checked with
``/v2/``, the manifest and the config blob.

Nothing leaves loopback.  When every mirror fails (connection refused, 401, 404, 5xx
at once; 429 only after about 30 s of retries with backoff), podman falls back to the
registry itself (``https://registry-1.docker.io/v2/``, then ``/v1/_ping``).  Go never
proxies loopback addresses, so each run points ``HTTP_PROXY``/``HTTPS_PROXY`` at a
tripwire on 127.0.0.1 that records the request line (``CONNECT
registry-1.docker.io:443 HTTP/1.1``) and refuses it with 403: the fallback fails within
milliseconds, without DNS, and :attr:`PodmanResult.escapes` shows it happened.
``check=True`` (the default) treats any escape as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socketserver
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from upstream_registry import (
    DOCKER_CONFIG,
    DOCKER_LAYER_TAR,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Flavour,
    PushedImage,
    json_bytes,
    put_blob,
    put_manifest,
    require_tool,
    sha256_digest,
)

INSTALL_HINT = "apt-get install -y podman"

# Host directories hidden behind an empty tmpfs in each run's mount namespace (those
# that exist).  /var/lib and /run whole: podman would create /var/lib/containers/cache
# and /run/containers/networks on a host that lacks them, and needs nothing else there.
HIDDEN_HOST_DIRS = (
    "/etc/containers/registries.conf.d",
    "/etc/containers/registries.d",
    "/etc/containers/certs.d",
    "/etc/docker/certs.d",
    "/var/lib",
    "/run",
)

# Runs inside the new mount namespace: sh -ec SCRIPT sh MOUNT DIR... -- PODMAN ARGS...
_HIDE_AND_EXEC = """
mount="$1"
shift
while [ "$1" != -- ]; do
    "$mount" -n -t tmpfs -o mode=0755,size=64m podman-harness "$1"  # -n: no /run/mount/utab
    shift
done
shift
exec "$@"
"""

# podman finds conmon, crun and netavark on PATH or in fixed places; no user dirs.
_SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


# --------------------------------------------------------------------------- requirements


def require_podman() -> str:
    """``require_tool("podman")`` with podman's install hint; also needs root.

    Skips locally, fails on CI (``CI`` set), like ``require_tool``.
    """
    problem = None
    if shutil.which("podman") is None:
        problem = f"'podman' not found on PATH; install it with: {INSTALL_HINT}"
    elif os.geteuid() != 0:
        problem = "the podman harness runs rootful podman in a private mount namespace: needs root"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    for tool in ("unshare", "mount", "sh"):
        require_tool(tool)
    return require_tool("podman")


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class PodmanResult:
    """One podman run: its exit status, output, and requests it tried to send off-loopback."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    escapes: tuple[str, ...]  # request lines the tripwire refused, e.g. "CONNECT host:443 ..."

    @property
    def image_id(self) -> str:
        """The last line of ``podman pull`` output: the local image ID."""
        lines = self.stdout.split()
        return lines[-1] if lines else ""

    def describe(self) -> str:
        escapes = "".join(f"\n  refused off-loopback request: {e}" for e in self.escapes)
        return f"podman {' '.join(self.args)} -> {self.returncode}{escapes}\n{self.stderr}"


def podman_pull(
    image: str,
    mirror_location: str,
    work: Path,
    *,
    registry: str = "docker.io",
    timeout: float = 120,
    check: bool = True,
) -> PodmanResult:
    """``podman pull IMAGE`` with ``mirror_location`` as the only mirror of ``registry``.

    ``image`` should be fully qualified (``docker.io/library/busybox:1``): no short-name
    search is configured.  ``mirror_location`` is ``host:port`` or ``host:port/prefix``.
    With ``check`` a failure, or any attempt to leave loopback, raises AssertionError
    carrying podman's stderr.
    """
    registries_conf = (
        "[[registry]]\n"
        f"location = {json.dumps(registry)}\n"
        "[[registry.mirror]]\n"
        f"location = {json.dumps(mirror_location)}\n"
        "insecure = true\n"
    )
    return run_podman(
        work, "pull", image, timeout=timeout, check=check, registries_conf=registries_conf
    )


async def podman_pull_async(
    image: str,
    mirror_location: str,
    work: Path,
    *,
    registry: str = "docker.io",
    timeout: float = 120,  # noqa: ASYNC109 - the subprocess deadline, as in podman_pull
    check: bool = True,
) -> PodmanResult:
    """:func:`podman_pull` in a thread, so the event loop (and a mirror on it) keeps serving."""
    return await asyncio.to_thread(
        podman_pull, image, mirror_location, work, registry=registry, timeout=timeout, check=check
    )


def podman_rmi(image: str, work: Path, *, timeout: float = 60) -> None:
    """Remove one image (and its layers) from the storage under ``work``."""
    run_podman(work, "rmi", image, timeout=timeout)


def podman_image_digest(image: str, work: Path, *, timeout: float = 60) -> str:
    """The manifest digest podman recorded for a pulled image."""
    result = run_podman(work, "image", "inspect", "--format", "{{.Digest}}", image, timeout=timeout)
    return result.stdout.strip()


def podman_cleanup(work: Path, *, timeout: float = 60) -> None:
    """Remove every image, then check that no mount under ``work`` is left.

    Call it at teardown; afterwards ``work`` can be deleted like any directory (we
    are root, so root-owned vfs layers are no obstacle).  A no-op when podman never
    ran there.
    """
    paths = _Paths(work.absolute())
    try:
        if paths.root.exists():
            run_podman(work, "rmi", "--all", "--force", timeout=timeout)
            leftover = _mounts_under(paths.work) + _mounts_under(paths.runroot)
            assert not leftover, f"podman left mounts under {work}: {leftover}"
    finally:
        shutil.rmtree(paths.runroot, ignore_errors=True)
        paths.runroot_link.unlink(missing_ok=True)


def run_podman(
    work: Path,
    *args: str,
    timeout: float = 60,
    check: bool = True,
    registries_conf: str = "",
) -> PodmanResult:
    """Run ``podman --root … --runroot … --storage-driver vfs ARGS`` isolated under ``work``.

    ``registries_conf`` is this run's registries.conf (empty: no registries configured).
    Blocks; from an event loop serving a mirror, wrap it in ``asyncio.to_thread``.
    """
    podman = require_podman()
    paths = _prepare(work)
    with (
        tempfile.NamedTemporaryFile(
            "w", prefix="registries-", suffix=".conf", dir=paths.scratch
        ) as conf,
        _Tripwire.running() as tripwire,
    ):
        conf.write(registries_conf)
        conf.flush()
        env = paths.env(conf.name, tripwire.url, os.path.dirname(podman))
        hidden = [d for d in HIDDEN_HOST_DIRS if os.path.isdir(d)]
        command = [
            require_tool("unshare"), "--mount", "--propagation", "private", "--",
            require_tool("sh"), "-ec", _HIDE_AND_EXEC, "sh", require_tool("mount"),
            *hidden, "--",
            podman,
            "--root", str(paths.root),
            "--runroot", str(paths.runroot),
            "--storage-driver", "vfs",
            *args,
        ]  # fmt: skip
        returncode, stdout, stderr = _run_in_session(command, env, timeout, args)
        escapes = tuple(tripwire.attempts)
    result = PodmanResult(args, returncode, stdout, stderr, escapes)
    if check and (returncode != 0 or escapes):
        raise AssertionError(result.describe())
    return result


# --------------------------------------------------------------------------- the sandbox


@dataclass(frozen=True)
class _Paths:
    work: Path

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def runroot(self) -> Path:
        """A short path: podman refuses a runroot longer than 50 characters.

        Derived from ``work`` so every run on it agrees (libpod's database records the
        runroot); ``work/runroot`` links to it, and :func:`podman_cleanup` removes it.
        """
        digest = hashlib.sha256(str(self.work).encode()).hexdigest()[:16]
        return Path("/tmp") / f"podman-harness-{digest}"

    @property
    def runroot_link(self) -> Path:
        return self.work / "runroot"

    @property
    def scratch(self) -> Path:
        return self.work / "sandbox"

    def env(self, registries_conf: str, proxy: str, podman_dir: str) -> dict[str, str]:
        # Built from scratch: no proxies, auth files, XDG dirs or CONTAINERS_* of the
        # host reach podman.  The proxy is the tripwire (loopback itself is never proxied).
        s = self.scratch
        return {
            "PATH": ":".join(dict.fromkeys([podman_dir, *_SYSTEM_PATH])),
            "HOME": str(s / "home"),
            "XDG_RUNTIME_DIR": str(s / "runtime"),
            "XDG_CONFIG_HOME": str(s / "home" / ".config"),
            "XDG_DATA_HOME": str(s / "home" / ".local" / "share"),
            "XDG_CACHE_HOME": str(s / "home" / ".cache"),
            "TMPDIR": str(s / "tmp"),  # c/image's big files (default /var/tmp)
            "REGISTRY_AUTH_FILE": str(s / "auth.json"),
            "CONTAINERS_REGISTRIES_CONF": registries_conf,
            "CONTAINERS_CONF": str(s / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(s / "storage.conf"),
            "HTTP_PROXY": proxy,
            "HTTPS_PROXY": proxy,
        }


def _prepare(work: Path) -> _Paths:
    """Create the sandbox's directories and static config files (idempotent)."""
    paths = _Paths(work.absolute())
    s = paths.scratch
    for sub in ("home", "runtime", "tmp", "libpod-tmp", "networks"):
        (s / sub).mkdir(parents=True, exist_ok=True)
    paths.runroot.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # concurrent runs on one work race here
        paths.runroot_link.symlink_to(paths.runroot)
    _write_once(
        s / "containers.conf",
        "[engine]\n"
        f"tmp_dir = {json.dumps(str(s / 'libpod-tmp'))}\n"
        'events_logger = "none"\n'
        'lock_type = "file"\n'  # not the host-wide /dev/shm/libpod_lock
        'cgroup_manager = "cgroupfs"\n'
        "[network]\n"
        f"network_config_dir = {json.dumps(str(s / 'networks'))}\n",
    )
    # podman refuses an empty storage.conf ("runroot must be set").
    _write_once(
        s / "storage.conf",
        "[storage]\n"
        'driver = "vfs"\n'
        f"graphroot = {json.dumps(str(paths.root))}\n"
        f"runroot = {json.dumps(str(paths.runroot))}\n",
    )
    # The default policy path is $HOME/.config/containers/policy.json, then /etc.
    _write_once(
        s / "home" / ".config" / "containers" / "policy.json",
        json.dumps({"default": [{"type": "insecureAcceptAnything"}]}),
    )
    _write_once(s / "auth.json", json.dumps({"auths": {}}))  # podman stats it: must exist
    return paths


def _write_once(path: Path, text: str) -> None:
    """Write atomically unless already there with this content (concurrent runs share it)."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _run_in_session(
    command: list[str], env: dict[str, str], timeout: float, args: Sequence[str]
) -> tuple[int, str, str]:
    """Run in a new session; afterwards (or on timeout) kill whatever of it is left."""
    proc = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # leader not reaped yet: still ours
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        _kill_session(proc.pid)
        raise AssertionError(
            f"podman {' '.join(args)} still running after {timeout}s; killed:\n{stderr}"
        ) from None
    finally:
        if proc.poll() is None:  # an exception other than the timeout
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    survivors = _kill_session(proc.pid)
    assert not survivors, f"podman {' '.join(args)} left processes running (killed): {survivors}"
    return proc.returncode, stdout, stderr


def _kill_session(sid: int) -> list[str]:
    """SIGKILL every process in session ``sid`` (one we created); their command lines.

    Called once the leader (pid ``sid``) is reaped: the kernel keeps that number out
    of reuse while any process still has it as session ID, and a process whose own pid
    equals ``sid`` now is a stranger that got the number afterwards, so it is spared.
    """
    killed = []
    for pid in _session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            cmdline = _cmdline(pid)
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid}: {cmdline}")
    if killed:
        deadline = time.monotonic() + 5
        while _session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.02)
    return killed


def _session_members(sid: int) -> list[int]:
    """Processes in session ``sid``, except one whose own pid is ``sid`` (see above)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        pid = int(entry.name)
        if pid != sid and len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            members.append(pid)
    return members


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def _mounts_under(work: Path) -> list[str]:
    prefix = str(work.absolute()).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


# --------------------------------------------------------------------------- tripwire


class _TripwireHandler(socketserver.StreamRequestHandler):
    timeout = 2.0

    def handle(self) -> None:
        try:
            head = self.rfile.readline(4096)
        except OSError:
            head = b""
        line = head.rstrip(b"\r\n").decode("latin-1") or "(no request line)"
        assert isinstance(self.server, _Tripwire)
        self.server.attempts.append(line)
        with contextlib.suppress(OSError):
            self.wfile.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )


class _Tripwire(socketserver.ThreadingTCPServer):
    """An HTTP proxy on loopback that records the request line of every request and refuses it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TripwireHandler)
        self.attempts: list[str] = []
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[_Tripwire]:
        with cls() as server:
            thread = threading.Thread(
                target=server.serve_forever, args=(0.05,), name="podman-tripwire", daemon=True
            )
            thread.start()
            try:
                yield server
            finally:
                server.shutdown()
                thread.join()


# --------------------------------------------------------------------------- tar images


def tar_layer(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of regular files (mode 0644, owner 0, mtime 0)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


_TAR_TYPES: dict[str, tuple[str, str, str]] = {
    # flavour: (manifest, config, layer)
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_TAR),
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_TAR),
}


async def push_tar_image(
    registry_url: str,
    name: str,
    tag: str | None,
    file_sizes: Sequence[int] = (4096,),
    media_type: Flavour = "oci",
    *,
    platform: tuple[str, str] = ("linux", "amd64"),
    session: aiohttp.ClientSession | None = None,
) -> PushedImage:
    """Push an image podman can unpack: layer ``i`` is a tar holding ``layer-i.bin``.

    Each file holds ``file_sizes[i]`` random bytes, so layers are distinct and their
    blobs a little larger (tar headers and padding; see ``layer_sizes`` of the result).
    Layers are built in memory: meant for small images.
    """
    manifest_type, config_type, layer_type = _TAR_TYPES[media_type]
    layers = [tar_layer({f"layer-{i}.bin": os.urandom(n)}) for i, n in enumerate(file_sizes)]
    layer_digests = [sha256_digest(layer) for layer in layers]
    os_name, arch = platform
    config = json_bytes(
        {
            "architecture": arch,
            "os": os_name,
            "config": {},
            # Uncompressed layers: the diff_id is the blob digest itself.
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
            "history": [{"created_by": f"podman harness layer {i}"} for i in range(len(layers))],
        }
    )
    config_digest = sha256_digest(config)
    manifest = json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": layer_type, "digest": d, "size": len(layer)}
                for d, layer in zip(layer_digests, layers, strict=True)
            ],
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        client = session
        for digest, blob in [*zip(layer_digests, layers, strict=True), (config_digest, config)]:
            await put_blob(client, registry_url, name, digest, blob)
        manifest_digest = await put_manifest(
            client, registry_url, name, tag, manifest, manifest_type
        )
    return PushedImage(
        name=name,
        tag=tag,
        manifest_digest=manifest_digest,
        manifest_bytes=manifest,
        media_type=manifest_type,
        config_digest=config_digest,
        layer_digests=layer_digests,
        layer_sizes=[len(layer) for layer in layers],
        platform=platform,
    )
