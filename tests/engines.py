"""Real engines for fleet-mode tests: S3 (moto, radosgw) and PostgreSQL, each started once
per test session.

Plain classes and functions, with thin fixtures at the end (``pytest_plugins`` in
conftest.py makes those visible to every test module).

* :class:`S3Endpoint` is where an S3-compatible store answers and with which keys.
  ``moto_s3`` yields one for moto's server, which accepts any keys and starts in under
  a second: the fast engine.  It accepts tampered and expired presigned URLs.
* ``radosgw`` yields a :class:`Radosgw` (an S3Endpoint) of a one-node Ceph cluster
  (:class:`CephCluster`: a monitor, a memstore OSD, radosgw), the engine that checks
  presigned URLs.  It starts in 2 to 3 s.  ``stop()``/``start()`` act on the gateway
  alone, for tests of an unreachable bucket store; a test that stops it restarts it
  (in ``finally``), since the next test shares it.
* ``s3_bucket_name`` names a bucket (not created) that no other test uses: tests share
  the session's servers, and a bucket of their own keeps their objects apart.
* :class:`Postgres` runs Debian's PostgreSQL 15 (``postgres`` yields it): trust
  authentication on 127.0.0.1 only, no unix socket, ``fsync`` off.  ``database_url``
  creates a database per test and drops it after.  ``stop()`` and ``start()`` take the
  server down and bring it back on the same port with the same data, for tests of
  degraded mode; ``database_url`` restarts it at teardown if a test left it down.

What was learnt the hard way:

* ``initdb`` and ``postgres`` refuse to run as root.  As root, both run as the
  ``postgres`` user (``nobody`` if there is none) through ``setpriv``, which execs
  rather than forks, so the pid we hold and signal is the postmaster's own.  That user
  cannot enter pytest's temporary directories (mode 0700, owned by root), so the data
  directory is a ``mkdtemp`` of its own, handed over to it and removed at the end; the
  log stays in pytest's directory (the parent writes it).
* SIGTERM is PostgreSQL's *smart* shutdown, which waits for every client to leave: a
  test's pool would hold it up.  SIGINT (fast shutdown) ends sessions and stops.
* Ceph with ``auth_* = none`` still negotiates the monitor connection's mode; radosgw's
  default (secure first) loops on "get_initial_auth_request returned -13" until
  ``ms_mon_client_mode = crc``.  Pool size 1 needs ``mon_allow_pool_size_one``.  No
  manager runs, so the PG autoscaler (a manager module) is turned off.
* radosgw creates its pools one monitor command at a time, and each waits for the next
  Paxos proposal, one a second by default: the cluster took 13 s to start.
  ``paxos_propose_interval = 0.05`` brings that to 2 to 3 s.
* ``log_file`` empty and ``log_to_stderr`` on: one log per daemon, which the harness
  writes and quotes when start-up fails (every daemon's tail, after at most 60 s).
* memstore keeps objects in the OSD's memory but writes them all to its data directory
  when it stops; :meth:`CephCluster.close` removes the data directories, not the logs.
* The OSD binds eight ports of Ceph's own range (6800-7300) on 127.0.0.1; it takes the
  next free ones, so sessions running side by side do not collide.

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import botocore.config
import botocore.session
import pytest
from moto_ecr import DEFAULT_REGION, DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, MotoServer
from server_process import ServerError, ServerProcess
from upstream_registry import free_loopback_port


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible store: its URL (path-style addressing) and a user's keys."""

    url: str
    access_key: str
    secret_key: str
    region: str


def s3_client(endpoint: S3Endpoint, *, timeout: float = 10.0) -> Any:
    """A botocore S3 client for `endpoint`: path-style, SigV4, no retries.

    `Any`: botocore builds a client's methods at run time, from the service model.

    Credentials are passed explicitly, so no variable or file of the machine is read
    for them; retries are off so a stopped store fails a test at once.
    """
    config = botocore.config.Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"total_max_attempts": 1},
    )
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        config=config,
    )


def unique_bucket_name(prefix: str = "test") -> str:
    """A valid bucket name (lowercase, digits, dashes) no other test will pick."""
    return f"{prefix}-{secrets.token_hex(8)}"


# --------------------------------------------------------------------------- tools


def require_tools(paths: list[Path], hint: str) -> None:
    """Skip (fail on CI) unless every one of these executables exists."""
    missing = [str(path) for path in paths if not os.access(path, os.X_OK)]
    if not missing:
        return
    message = f"missing {', '.join(missing)}; install with: {hint}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class Account:
    """An unprivileged account a root test run hands servers over to."""

    name: str
    uid: int
    gid: int

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run as this account; setpriv execs, so the pid stays the program's."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]

    def own(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)


def unprivileged_account(preferred: str) -> Account | None:
    """`preferred` (else nobody) when running as root; None when already unprivileged."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return Account(name, entry.pw_uid, entry.pw_gid)
    raise RuntimeError(f"running as root and neither {preferred!r} nor 'nobody' exists")


def private_tempdir(prefix: str, account: Account | None) -> Path:
    """A temporary directory `account` owns (pytest's own are closed to other users)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if account is not None:
        account.own(path)
    return path


def run_tool(argv: list[str], *, env: dict[str, str], timeout: float = 60.0) -> str:
    """Run a command to completion; its output, or an error carrying it."""
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"{argv[0]} timed out after {timeout}s: {' '.join(argv)}") from exc
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        errors = done.stderr.decode(errors="replace")
        raise ServerError(f"{' '.join(argv)} exited {done.returncode}:\n{output}{errors}")
    return output


# --------------------------------------------------------------------------- PostgreSQL

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_INSTALL_HINT = "apt-get install -y postgresql"
PG_SUPERUSER = "postgres"
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresError(ServerError):
    """PostgreSQL would not start, or a statement failed."""


class PostgresProcess(ServerProcess):
    """The postmaster of one data directory, initialised on first start."""

    name = "PostgreSQL"
    error = PostgresError

    def __init__(self, workdir: Path, data_dir: Path, port: int, account: Account | None) -> None:
        super().__init__(workdir, workdir / "postgres.log", port, startup_timeout=30.0)
        self.data_dir = data_dir
        self.account = account

    def as_account(self, argv: list[str]) -> list[str]:
        return self.account.command(argv) if self.account else argv

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one statement through psql over TCP; its unaligned output."""
        argv = [str(PG_BIN / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", "127.0.0.1", "-p", str(self.port), "-U", PG_SUPERUSER]
        try:
            return run_tool([*argv, "-d", database, "-c", sql], env=self._env(), timeout=30)
        except ServerError as exc:
            raise PostgresError(str(exc)) from None

    def _prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data_dir), "-U", PG_SUPERUSER]
        initdb += ["-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        try:
            run_tool(self.as_account(initdb), env=self._env())
        except ServerError as exc:
            raise PostgresError(str(exc)) from None

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        argv = [str(PG_BIN / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return self.as_account(argv)

    def _env(self) -> dict[str, str]:
        # From scratch: no PG* variable of the machine may redirect psql or the server.
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.data_dir.parent),
            "LC_ALL": "C",
            "PGCONNECT_TIMEOUT": "2",
        }

    def _ready(self) -> bool:
        try:
            answered = self.psql("SHOW data_directory").strip()
        except PostgresError:
            return False
        if Path(answered) != self.data_dir:
            raise PostgresError(f"{self.host} answered, but serves {answered} (port taken?)")
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT): open sessions are ended, not waited for."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):  # the base class kills it
                proc.wait(timeout)
        super().stop()


class Postgres:
    """A PostgreSQL server on 127.0.0.1, trust authentication, its data in a temp dir.

    `workdir` holds the log; the data directory is a temporary directory of its own,
    removed by :meth:`close`.
    """

    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        require_tools([PG_BIN / "initdb", PG_BIN / "postgres", PG_BIN / "psql"], PG_INSTALL_HINT)
        account = unprivileged_account("postgres")
        self._root = private_tempdir("mirror-postgres-", account)
        self._process = PostgresProcess(
            workdir, self._root / "data", port or free_loopback_port(), account
        )
        self.user = PG_SUPERUSER
        self.port = self._process.port
        self.admin_dsn = self.dsn("postgres")

    @property
    def running(self) -> bool:
        return self._process.running

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        """Start it (initialising the data directory the first time); wait until it answers."""
        self._process.start()

    def stop(self) -> None:
        """Stop it; the port and the data stay for the next :meth:`start`."""
        self._process.stop()

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser; psql's unaligned, tuples-only output."""
        return self._process.psql(statement, database)

    def create_database(self, name: str | None = None) -> str:
        """Create a database (`test_<random>` by default); its DSN."""
        name = name or f"test_{secrets.token_hex(8)}"
        self.sql(f"CREATE DATABASE {_checked_name(name)}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop it, ending any session still connected to it."""
        self.sql(f"DROP DATABASE IF EXISTS {_checked_name(name)} WITH (FORCE)")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _checked_name(name: str) -> str:
    """`name` as a bare SQL identifier, refused unless it needs no quoting."""
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"not a plain database name: {name!r}")
    return name


# --------------------------------------------------------------------------- Ceph radosgw

CEPH_INSTALL_HINT = "apt-get install -y ceph-mon ceph-osd ceph-common radosgw"
CEPH_TOOLS = ["monmaptool", "ceph-mon", "ceph-osd", "ceph", "radosgw", "radosgw-admin"]
RGW_USER = "mirror"
RGW_ACCESS_KEY = "MIRRORTESTACCESSKEY0"
RGW_SECRET_KEY = "mirror-test-secret-key-0000000000000000"
CEPH_STARTUP_TIMEOUT = 60.0


class CephError(ServerError):
    """The Ceph cluster or its gateway would not start (the message carries log tails)."""


class CephDaemon(ServerProcess):
    """One Ceph daemon in the foreground, logging to its own file through stderr."""

    error = CephError

    def __init__(
        self, cluster: CephCluster, name: str, argv: list[str], port: int, ready: Callable[[], bool]
    ) -> None:
        super().__init__(cluster.root, cluster.log_dir / f"{name}.log", port, CEPH_STARTUP_TIMEOUT)
        self.name = name
        self._argv = argv
        self._is_ready = ready
        self._cluster = cluster

    def _command(self) -> list[str]:
        return [*self._argv, "-f", "-c", str(self._cluster.conf_path)]

    def _env(self) -> dict[str, str]:
        return self._cluster.env()

    def _ready(self) -> bool:
        return self._is_ready()


class CephCluster:
    """One monitor, one memstore OSD and a radosgw, all on 127.0.0.1 under `root`.

    :meth:`start` builds and starts the whole cluster, then creates the S3 user; the
    gateway alone can be stopped and started again (:meth:`stop_gateway`,
    :meth:`start_gateway`).  :meth:`close` stops every daemon.  Objects live in the
    OSD's memory, so a cluster is as fresh as its OSD.
    """

    def __init__(self, root: Path) -> None:
        require_tools([_which(tool) for tool in CEPH_TOOLS], CEPH_INSTALL_HINT)
        self.root = root
        self.conf_path = root / "ceph.conf"
        self.log_dir = root / "log"
        self.fsid = str(uuid.uuid4())
        self.mon_port = free_loopback_port()
        self.rgw_port = free_loopback_port()
        self.endpoint = S3Endpoint(
            f"http://127.0.0.1:{self.rgw_port}", RGW_ACCESS_KEY, RGW_SECRET_KEY, DEFAULT_REGION
        )
        self._daemons: list[CephDaemon] = []
        self.gateway = CephDaemon(
            self, "client.rgw", ["radosgw", "-n", "client.rgw"], self.rgw_port, self._rgw_ready
        )

    # ---- building

    def start(self) -> None:
        """Create and start the cluster; fails with every log's tail if not up in time."""
        deadline = time.monotonic() + CEPH_STARTUP_TIMEOUT
        try:
            self._write_config()
            self._start_monitor(deadline)
            self._start_osd(deadline)
            self._start_daemon(self.gateway, deadline)
            self._create_user(deadline)
        except BaseException as exc:
            tails = self.log_tails()
            self.close()
            if isinstance(exc, ServerError):
                raise CephError(f"{exc}\n{tails}") from None
            raise

    def _write_config(self) -> None:
        for sub in ("mon", "osd", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(ceph_config(self.root, self.fsid, self.mon_port, self.rgw_port))

    def _start_monitor(self, deadline: float) -> None:
        monmap = self.root / "monmap"
        address = f"[v2:127.0.0.1:{self.mon_port}]"
        self._tool(
            ["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", address, str(monmap)],
            deadline,
        )
        mkfs = ["ceph-mon", "-c", str(self.conf_path), "-i", "a", "--mkfs", "--monmap", str(monmap)]
        self._tool(mkfs, deadline)
        mon = CephDaemon(self, "mon.a", ["ceph-mon", "-i", "a"], self.mon_port, self._mon_ready)
        self._start_daemon(mon, deadline)

    def _start_osd(self, deadline: float) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph(["osd", "new", osd_uuid], deadline).strip()
        (self.root / "osd" / osd_id).mkdir()
        mkfs = ["ceph-osd", "-c", str(self.conf_path), "-i", osd_id, "--mkfs"]
        self._tool([*mkfs, "--osd-uuid", osd_uuid], deadline)
        osd = CephDaemon(self, f"osd.{osd_id}", ["ceph-osd", "-i", osd_id], 0, self._osd_ready)
        self._start_daemon(osd, deadline)

    def _create_user(self, deadline: float) -> None:
        user = ["user", "create", f"--uid={RGW_USER}", f"--display-name={RGW_USER}"]
        keys = [f"--access-key={RGW_ACCESS_KEY}", f"--secret-key={RGW_SECRET_KEY}"]
        self._admin([*user, *keys], deadline)

    def _start_daemon(self, daemon: CephDaemon, deadline: float) -> None:
        daemon.startup_timeout = max(deadline - time.monotonic(), 1.0)
        if daemon not in self._daemons:
            self._daemons.append(daemon)
        daemon.start()

    # ---- readiness

    def _mon_ready(self) -> bool:
        return self._answers(["mon", "stat"])

    def _osd_ready(self) -> bool:
        return '"num_up_osds":1' in self._answers_with(["osd", "stat", "-f", "json"])

    def _rgw_ready(self) -> bool:
        return _http_status(self.endpoint.url + "/") == 200

    # ---- the gateway alone

    def stop_gateway(self) -> None:
        """Stop radosgw only; the cluster and its objects stay."""
        self.gateway.stop()

    def start_gateway(self) -> None:
        """Start radosgw again, on the same port; wait until it answers."""
        self.gateway.startup_timeout = CEPH_STARTUP_TIMEOUT
        self.gateway.start()

    # ---- tools

    def env(self) -> dict[str, str]:
        # From scratch: CEPH_ARGS or CEPH_CONF of the machine must not point elsewhere.
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "LC_ALL": "C",
        }

    def ceph(self, args: list[str], timeout: float = 30.0) -> str:
        """The `ceph` command line against this cluster."""
        return self._ceph(args, time.monotonic() + timeout)

    def _ceph(self, args: list[str], deadline: float) -> str:
        argv = ["ceph", "-c", str(self.conf_path), "--connect-timeout", "5", *args]
        return self._tool(argv, deadline)

    def _admin(self, args: list[str], deadline: float) -> str:
        return self._tool(["radosgw-admin", "-c", str(self.conf_path), *args], deadline)

    def _tool(self, argv: list[str], deadline: float | None = None) -> str:
        timeout = 30.0 if deadline is None else max(deadline - time.monotonic(), 1.0)
        return run_tool(argv, env=self.env(), timeout=timeout)

    def _answers_with(self, args: list[str]) -> str:
        try:
            return self.ceph(args, timeout=5)
        except ServerError:
            return ""

    def _answers(self, args: list[str]) -> bool:
        return bool(self._answers_with(args))

    # ---- teardown

    def log_tails(self, max_bytes: int = 2000) -> str:
        return "\n".join(
            f"--- {daemon.name} ({daemon.log_path}):\n{daemon.log_tail(max_bytes)}"
            for daemon in self._daemons
        )

    def close(self) -> None:
        """Stop every daemon, the gateway first; remove their data (the logs stay)."""
        for daemon in reversed(self._daemons):
            daemon.stop()
        for sub in ("mon", "osd", "run"):
            shutil.rmtree(self.root / sub, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class Radosgw(S3Endpoint):
    """radosgw's S3 endpoint, and the cluster behind it: the gateway can be stopped."""

    cluster: CephCluster = field(repr=False, compare=False, kw_only=True)

    @classmethod
    def of(cls, cluster: CephCluster) -> Radosgw:
        e = cluster.endpoint
        return cls(e.url, e.access_key, e.secret_key, e.region, cluster=cluster)

    def stop(self) -> None:
        """Stop the gateway only: the store is unreachable, its objects stay."""
        self.cluster.stop_gateway()

    def start(self) -> None:
        """Start the gateway again on the same port; wait until it answers."""
        self.cluster.start_gateway()


def ceph_config(root: Path, fsid: str, mon_port: int, rgw_port: int) -> str:
    """ceph.conf of a one-node cluster that keeps every file under `root`."""
    settings = {
        "fsid": fsid,
        "mon_host": f"v2:127.0.0.1:{mon_port}",
        "public_addr": "127.0.0.1",
        "cluster_addr": "127.0.0.1",
        "ms_bind_ipv6": "false",
        "auth_cluster_required": "none",
        "auth_service_required": "none",
        "auth_client_required": "none",
        # With auth none the default mode (secure first) makes radosgw loop on
        # "get_initial_auth_request returned -13".
        "ms_mon_client_mode": "crc",
        "mon_allow_pool_size_one": "true",
        "mon_warn_on_pool_no_redundancy": "false",
        "osd_pool_default_size": "1",
        "osd_pool_default_min_size": "1",
        "osd_pool_default_pg_autoscale_mode": "off",
        "osd_objectstore": "memstore",
        # Every pool radosgw creates is a monitor proposal, by default one a second.
        "paxos_propose_interval": "0.05",
        "paxos_min_wait": "0.01",
        "run_dir": f"{root}/run",
        "admin_socket": f"{root}/run/$name.asok",
        "pid_file": f"{root}/run/$name.pid",
        "mon_data": f"{root}/mon/$id",
        "osd_data": f"{root}/osd/$id",
        "keyring": "/dev/null",
        "log_file": "",
        "log_to_stderr": "true",
        "err_to_stderr": "true",
        "rgw_frontends": f"beast endpoint=127.0.0.1:{rgw_port}",
    }
    return "[global]\n" + "".join(f"{name} = {value}\n" for name, value in settings.items())


def _which(tool: str) -> Path:
    found = shutil.which(tool)
    return Path(found) if found else Path("/usr/bin") / tool


def _http_status(url: str) -> int:
    """The status of a GET, 0 when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1.0) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


class StallingProxy:
    """A TCP forwarder to an S3 endpoint that holds back one connection once `limit`
    bytes have gone through towards the store: a request caught mid-body, its client
    waiting. `release()` lets it go on; connections opened later are never held."""

    def __init__(self, target: str, limit: int) -> None:
        self._target = target.removeprefix("http://").rsplit(":", 1)
        self._limit = limit
        self._sent = 0
        self.stalled = asyncio.Event()
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._server.wait_closed()

    def release(self) -> None:
        self._released.set()

    async def _connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        host, port = self._target
        store_reader, store_writer = await asyncio.open_connection(host, int(port))
        pumps = [
            asyncio.create_task(self._pump(client_reader, store_writer, upstream=True)),
            asyncio.create_task(self._pump(store_reader, client_writer, upstream=False)),
        ]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
                self._pumps.discard(pump)
            client_writer.close()
            store_writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        while data := await reader.read(64 * 1024):
            if upstream:
                await self._hold_if_due(len(data))
            writer.write(data)
            await writer.drain()

    async def _hold_if_due(self, size: int) -> None:
        self._sent += size
        if self._sent > self._limit and not self.stalled.is_set():
            self.stalled.set()
            await self._released.wait()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """moto's server on a free loopback port, for the whole session."""
    with MotoServer(tmp_path_factory.mktemp("moto-s3")) as server:
        yield S3Endpoint(server.url, DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, DEFAULT_REGION)


@pytest.fixture
def s3_bucket_name() -> str:
    """A fresh bucket name for this test (the bucket is not created)."""
    return unique_bucket_name()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """PostgreSQL 15 on a free loopback port, for the whole session."""
    with Postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def database_url(postgres: Postgres) -> Iterator[str]:
    """The DSN of a database of this test's own, dropped after it."""
    url = postgres.create_database()
    yield url
    if not postgres.running:  # a test that stopped it must not take down the next one
        postgres.start()
    postgres.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(scope="session")
def radosgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Radosgw]:
    """radosgw of a one-node Ceph cluster, for the whole session; `stop()`/`start()` the gateway."""
    with CephCluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield Radosgw.of(cluster)


@pytest.fixture
def aws_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[[S3Endpoint], None]:
    """The standard AWS chain of the replicas (subprocesses inherit it): the endpoint's
    keys in the environment, and nothing else of the host's."""

    def apply(endpoint: S3Endpoint) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoint.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoint.secret_key)
        monkeypatch.setenv("AWS_DEFAULT_REGION", endpoint.region)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.delenv("AWS_PROFILE", raising=False)

    return apply
