"""A real AWS ECR API for tests: ``moto`` in server mode, plus an AWS environment for botocore.

Nothing here is a fixture.  Fixtures wrap these plain functions and classes, so tests
can decide on scope and lifetime themselves.

* :class:`MotoServer` runs ``python -m moto.server`` (what the ``moto_server`` console
  script runs, from the ``moto[server]`` extra) on a loopback port and counts, on the
  server side, the API calls it received: moto's request recorder
  (``MOTO_ENABLE_RECORDING``) appends every request, headers included, to a JSON-lines
  file *before* handling it, so once a client has its response the line is on disk and
  a count needs no settling.  ``X-Amz-Target`` in the recorded headers names the call.
* :func:`aws_env` is the environment under which botocore reaches that server and
  nothing else: endpoint override, dummy static credentials, no instance metadata, no
  shared config files, no proxy for loopback.  :func:`apply_aws_env` installs it with
  pytest's ``monkeypatch`` (removing every other ``AWS_*`` variable of the host) and
  :func:`aws_subprocess_env` builds a child process environment from it.

moto answers ``GetAuthorizationToken`` with the password ``<registryId>-auth-token``
(``AWS:<registryId>-auth-token`` base64-encoded) and ``expiresAt`` fixed at
2015-01-01 00:00 in the *server's* local time; the server runs with ``TZ=UTC``, so
botocore parses it as the instant :data:`MOTO_EXPIRES_AT` (an aware datetime, its
tzinfo being ``dateutil.tz.tzlocal()`` of the client, so compare instants, not tzinfo).

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from server_process import ServerError, ServerProcess
from upstream_registry import free_loopback_port

INSTALL_HINT = "pip install 'moto[server]'"

# The JSON 1.1 target prefix of the ECR API (``ecr`` in botocore, API version 2015-09-21).
ECR_TARGET_PREFIX = "AmazonEC2ContainerRegistry_V20150921."
GET_AUTHORIZATION_TOKEN = ECR_TARGET_PREFIX + "GetAuthorizationToken"

# What moto's GetAuthorizationToken answers, with the server running under TZ=UTC.
MOTO_EXPIRES_AT = datetime(2015, 1, 1, tzinfo=UTC)

DEFAULT_REGION = "us-east-1"
DUMMY_ACCESS_KEY_ID = "AKIAMOTOTESTING00000"
DUMMY_SECRET_ACCESS_KEY = "moto-testing-secret-access-key"
LOOPBACK_NO_PROXY = "127.0.0.1,localhost,::1"

# moto is imported only by the server process; these say whether it can start there.
_SERVER_MODULES = ("moto", "flask", "flask_cors", "werkzeug")


def require_moto_server() -> list[str]:
    """The command that runs moto's server, or skip (fail on CI) when it is missing.

    ``python -m moto.server`` with this interpreter rather than the ``moto_server``
    console script: no PATH lookup, no pyenv shim (which wants the real HOME), and the
    same site-packages as the tests.  Nothing is imported here.
    """
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return [sys.executable, "-m", "moto.server"]
    message = (
        f"moto server mode is not installed (missing: {', '.join(missing)}); "
        f"install it with: {INSTALL_HINT}"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


# --------------------------------------------------------------------------- environment


def aws_env(endpoint: str, home: Path, *, region: str = DEFAULT_REGION) -> dict[str, str]:
    """Variables under which botocore talks to ``endpoint`` only.

    * ``AWS_ENDPOINT_URL`` sends every service there (STS too, should the code under
      test ever assume a role); ``AWS_ENDPOINT_URL_ECR`` is the service-specific form,
      which wins over the global one.  botocore 1.43 honours both.
    * Static dummy keys: the environment provider comes first in the default credential
      chain, so no later provider (container, instance metadata, SSO, ...) is consulted.
    * ``AWS_EC2_METADATA_DISABLED``, and the metadata endpoint moved to a closed
      loopback port in case anything ignores that, so 169.254.169.254 is never tried.
    * Config and credentials files that do not exist, under ``home``: no profile of the
      machine can add a ``credential_process``, SSO, role or endpoint.
    * ``NO_PROXY``: an ``HTTP(S)_PROXY`` of the machine must not capture loopback.

    This only *adds* variables; other ``AWS_*`` variables of the host (``AWS_PROFILE``,
    ``AWS_SESSION_TOKEN``, ``AWS_CONTAINER_CREDENTIALS_*``, ...) must be removed too,
    which :func:`apply_aws_env` and :func:`aws_subprocess_env` do.
    """
    aws_dir = home / ".aws-nonexistent"
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_ECR": endpoint,
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "false",
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,  # not read by botocore, but by other SDKs and tools
        "AWS_CONFIG_FILE": str(aws_dir / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9/",
        "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "1",
        "AWS_METADATA_SERVICE_TIMEOUT": "1",
        "AWS_USE_FIPS_ENDPOINT": "false",
        "AWS_USE_DUALSTACK_ENDPOINT": "false",
        "AWS_CSM_ENABLED": "false",
        "NO_PROXY": LOOPBACK_NO_PROXY,
        "no_proxy": LOOPBACK_NO_PROXY,
    }


def apply_aws_env(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, *, region: str = DEFAULT_REGION
) -> dict[str, str]:
    """Install :func:`aws_env` in this process; every other ``AWS_*`` variable is removed.

    Undone by ``monkeypatch`` at teardown.  botocore reads the environment when a
    session or client is created, so create them after this call.
    """
    env = aws_env(endpoint, home, region=region)
    for name in list(os.environ):
        if name.upper().startswith("AWS_") and name not in env:
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def aws_subprocess_env(
    endpoint: str,
    home: Path,
    *,
    base: Mapping[str, str] | None = None,
    region: str = DEFAULT_REGION,
) -> dict[str, str]:
    """``env=`` for a child process: ``base`` without its ``AWS_*`` variables, plus :func:`aws_env`.

    ``base`` defaults to just ``PATH`` and ``HOME=home``; build it from scratch rather
    than from ``os.environ`` so nothing of the machine leaks in.
    """
    if base is None:
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    env = {k: v for k, v in base.items() if not k.upper().startswith("AWS_")}
    env.update(aws_env(endpoint, home, region=region))
    return env


# --------------------------------------------------------------------------- recording


@dataclass(frozen=True)
class RecordedRequest:
    """One request as moto's recorder wrote it (before moto handled it)."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes

    @property
    def target(self) -> str:
        """The ``X-Amz-Target`` header (JSON protocol operation), ``""`` if none."""
        for name, value in self.headers.items():
            if name.lower() == "x-amz-target":
                return value
        return ""

    @property
    def user_agent(self) -> str:
        for name, value in self.headers.items():
            if name.lower() == "user-agent":
                return value
        return ""

    def json_body(self) -> Any:
        return json.loads(self.body) if self.body else None


def parse_recording_line(line: str) -> RecordedRequest:
    """Parse one line of moto's recording file (``MOTO_RECORDER_FILEPATH``)."""
    entry = json.loads(line)
    raw_body = entry.get("body") or ""
    body = (
        base64.b64decode(raw_body) if entry.get("body_encoded") else str(raw_body).encode("utf-8")
    )
    return RecordedRequest(
        method=str(entry.get("method", "")),
        url=str(entry.get("url", "")),
        headers={str(k): str(v) for k, v in dict(entry.get("headers") or {}).items()},
        body=body,
    )


# --------------------------------------------------------------------------- process


class MotoError(ServerError):
    """moto's server did not come up (the message carries the log tail)."""


class MotoServer(ServerProcess):
    """moto's server on 127.0.0.1, recording every request it receives.

    The port is chosen once, at construction, so ``url`` is known before the first
    start and stays the same across :meth:`restart`.  The recording and the log are
    appended to across restarts, so counts cover the whole test (moto's *state* does
    not survive a restart, which ECR auth does not care about).

    Start-up takes about half a second to a second (importing moto); ``start``/``stop``
    block, so from a test whose event loop also runs the mirror, call them via
    ``await asyncio.to_thread(server.restart)``.  SIGTERM stops it at once.
    """

    name = "moto server"
    error = MotoError

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        command: Sequence[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            workdir, workdir / "moto-server.log", port or free_loopback_port(), startup_timeout
        )
        self.command = list(command) if command is not None else require_moto_server()
        self.recording_path = workdir / "moto-recording.jsonl"
        self._extra_env = dict(extra_env or {})
        # Readiness probes carry this User-Agent: a probe answered by some *other*
        # server that grabbed the port shows up as a probe missing from our recording.
        self._probe_agent = f"moto-readiness-probe-{secrets.token_hex(8)}"
        self._count_offset = 0  # see reset_counts()

    def aws_env(self, home: Path, *, region: str = DEFAULT_REGION) -> dict[str, str]:
        """:func:`aws_env` for this server."""
        return aws_env(self.url, home, region=region)

    def server_env(self) -> dict[str, str]:
        """The server's environment, built from scratch (moto reads many ``MOTO_*``/``AWS_*``)."""
        home = self.workdir / "moto-home"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            # moto computes expiresAt with time.mktime, i.e. in the server's local time.
            "TZ": "UTC",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MOTO_ENABLE_RECORDING": "true",
            "MOTO_RECORDER_FILEPATH": str(self.recording_path),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(home / ".aws-nonexistent" / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / ".aws-nonexistent" / "credentials"),
            "NO_PROXY": LOOPBACK_NO_PROXY,
            "no_proxy": LOOPBACK_NO_PROXY,
        }
        env.update(self._extra_env)
        return env

    def _prepare(self) -> None:
        self.recording_path.touch()
        (self.workdir / "moto-home").mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        return [*self.command, "-H", "127.0.0.1", "-p", str(self.port)]

    def _env(self) -> dict[str, str]:
        return self.server_env()

    def _ready(self) -> bool:
        if not _probe(self.url + "/moto-api/config", self._probe_agent):
            return False
        if self._probe_agent not in _read_text(self.recording_path):
            raise MotoError(
                f"{self.host} answered, but not the moto server started here "
                f"(port taken?):\n{self.log_tail()}"
            )
        return True

    # ---- request counting

    def reset_counts(self) -> None:
        """Make later :meth:`requests` calls ignore everything recorded so far."""
        try:
            self._count_offset = self.recording_path.stat().st_size
        except FileNotFoundError:
            self._count_offset = 0

    def requests(self) -> list[RecordedRequest]:
        """Requests received since the last :meth:`reset_counts`, readiness probes excluded.

        moto records a request before handling it, in one ``write`` for small requests,
        so every request whose response a client has seen is here.  A line without its
        newline is still being written and is left for next time.
        """
        try:
            with self.recording_path.open("rb") as f:
                f.seek(self._count_offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1].decode("utf-8", "replace")
        parsed = [parse_recording_line(line) for line in complete.splitlines() if line.strip()]
        return [r for r in parsed if r.user_agent != self._probe_agent]

    def calls(self, target: str) -> list[RecordedRequest]:
        """Recorded JSON-protocol calls with this exact ``X-Amz-Target``."""
        return [r for r in self.requests() if r.target == target]

    def auth_token_calls(self) -> int:
        """How many ECR ``GetAuthorizationToken`` calls the server received."""
        return len(self.calls(GET_AUTHORIZATION_TOKEN))


def _probe(url: str, user_agent: str) -> bool:
    # No proxy handler: an HTTP_PROXY in the environment must not capture loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"User-Agent": user_agent})
    try:
        with opener.open(request, timeout=1.0) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return ""
