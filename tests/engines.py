"""Real engines for fleet-mode tests: S3 (moto) and PostgreSQL, started once per test session.

Plain classes and functions, with thin fixtures at the end (``pytest_plugins`` in
conftest.py makes those visible to every test module).

* :class:`S3Endpoint` is where an S3-compatible store answers and with which keys.
  ``moto_s3`` yields one for moto's server, which accepts any keys and starts in about
  a second: the fast engine.  It accepts tampered and expired presigned URLs.
* ``s3_bucket_name`` names a bucket (not created) that no other test uses: tests share
  the session's server, and a bucket of their own keeps their objects apart.
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

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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
