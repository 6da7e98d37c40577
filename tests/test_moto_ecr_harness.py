"""The moto ECR harness itself: botocore reaches moto_server, and only it; calls are counted.

Only 127.0.0.1 is ever contacted: in this process a socket guard (autouse) fails any
non-loopback connect or name lookup; the child process of the subprocess test gets
the same environment, and ``strace -f -e trace=connect`` over this file shows only
127.0.0.1 (and glibc's local nscd socket).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from moto_ecr import (
    DUMMY_ACCESS_KEY_ID,
    GET_AUTHORIZATION_TOKEN,
    MOTO_EXPIRES_AT,
    MotoServer,
    apply_aws_env,
    aws_env,
    aws_subprocess_env,
)

ACCOUNT = "123456789012"


def _new_session() -> botocore.session.Session:
    return botocore.session.get_session()


def _ecr_client() -> Any:
    """A fresh client: botocore reads the environment when it is created."""
    client: Any = _new_session().create_client("ecr", region_name="us-east-1")
    return client


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def server(moto: MotoServer) -> MotoServer:
    moto.reset_counts()
    return moto


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail on any connect or name lookup that is not loopback; yields what was connected."""
    connected: list[Any] = []
    offending: list[str] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def is_loopback(host: object) -> bool:
        if host is None:  # getaddrinfo(None, port): the local wildcard, no lookup
            return True
        text = host.decode() if isinstance(host, bytes) else str(host)
        try:
            return ipaddress.ip_address(text.split("%")[0]).is_loopback
        except ValueError:
            return text == "localhost"

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            connected.append(address)
            if not is_loopback(address[0]):
                offending.append(f"connect {address!r}")
                raise OSError(f"non-loopback connect blocked: {address!r}")
        real_connect(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_loopback(host):
            offending.append(f"getaddrinfo {host!r}")
            raise OSError(f"non-loopback name lookup blocked: {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield connected
    assert offending == [], offending


@pytest.fixture
def ecr_env(
    server: MotoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    loopback_only: list[Any],
) -> dict[str, str]:
    return apply_aws_env(monkeypatch, server.url, tmp_path)


# --------------------------------------------------------------------------- tests


def test_get_authorization_token_is_served_and_counted(
    server: MotoServer, ecr_env: dict[str, str], loopback_only: list[Any]
) -> None:
    client = _ecr_client()
    assert client.meta.endpoint_url == server.url
    assert server.auth_token_calls() == 0

    response = client.get_authorization_token(registryIds=[ACCOUNT])

    [data] = response["authorizationData"]
    assert base64.b64decode(data["authorizationToken"]) == f"AWS:{ACCOUNT}-auth-token".encode()
    assert data["proxyEndpoint"] == f"https://{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com"
    expires_at = data["expiresAt"]
    assert isinstance(expires_at, datetime)
    assert expires_at.tzinfo is not None  # botocore: dateutil tzlocal()
    assert expires_at == MOTO_EXPIRES_AT  # 2015-01-01T00:00:00Z, long past
    assert server.auth_token_calls() == 1
    [call] = server.calls(GET_AUTHORIZATION_TOKEN)
    assert call.json_body() == {"registryIds": [ACCOUNT]}
    assert f"Credential={DUMMY_ACCESS_KEY_ID}/" in call.headers["Authorization"]

    client.get_authorization_token(registryIds=[ACCOUNT])
    assert server.auth_token_calls() == 2

    # Other calls are recorded but not counted as token calls.
    client.describe_repositories()
    assert server.auth_token_calls() == 2
    assert len(server.requests()) == 3

    assert loopback_only, "the guard saw no connection at all"
    assert {address[0] for address in loopback_only} == {"127.0.0.1"}


def test_reset_counts_forgets_earlier_calls(server: MotoServer, ecr_env: dict[str, str]) -> None:
    client = _ecr_client()
    client.get_authorization_token()
    assert server.auth_token_calls() == 1
    server.reset_counts()
    assert server.auth_token_calls() == 0
    client.get_authorization_token()
    assert server.auth_token_calls() == 1


def test_credentials_come_from_env_and_nothing_else(
    server: MotoServer, ecr_env: dict[str, str]
) -> None:
    credentials = _new_session().get_credentials()
    assert credentials is not None
    assert credentials.method == "env"
    assert credentials.access_key == DUMMY_ACCESS_KEY_ID
    assert not Path(ecr_env["AWS_CONFIG_FILE"]).exists()
    assert not Path(ecr_env["AWS_SHARED_CREDENTIALS_FILE"]).exists()


def test_apply_aws_env_removes_other_aws_variables(
    server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "someone-elses")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stale")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://169.254.170.2/creds")
    env = apply_aws_env(monkeypatch, server.url, tmp_path)
    aws_now = {k: v for k, v in os.environ.items() if k.upper().startswith("AWS_")}
    assert aws_now == {k: v for k, v in env.items() if k.startswith("AWS_")}


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_ECR"])
def test_botocore_honours_each_endpoint_variable(
    variable: str,
    server: MotoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    loopback_only: list[Any],
) -> None:
    apply_aws_env(monkeypatch, server.url, tmp_path)
    other = "AWS_ENDPOINT_URL_ECR" if variable == "AWS_ENDPOINT_URL" else "AWS_ENDPOINT_URL"
    monkeypatch.delenv(other)
    client = _ecr_client()
    assert client.meta.endpoint_url == server.url
    client.get_authorization_token()
    assert server.auth_token_calls() == 1


def test_subprocess_env_reaches_the_server(server: MotoServer, tmp_path: Path) -> None:
    script = (
        "import base64, json, botocore.session\n"
        "c = botocore.session.get_session().create_client('ecr', region_name='us-east-1')\n"
        f"r = c.get_authorization_token(registryIds=['{ACCOUNT}'])\n"
        "d = r['authorizationData'][0]\n"
        "print(json.dumps({'token': base64.b64decode(d['authorizationToken']).decode(),\n"
        "                  'expires': d['expiresAt'].timestamp()}))\n"
    )
    env = aws_subprocess_env(server.url, tmp_path)
    assert env["HOME"] == str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == {
        "token": f"AWS:{ACCOUNT}-auth-token",
        "expires": MOTO_EXPIRES_AT.timestamp(),
    }
    assert server.auth_token_calls() == 1


def test_restart_keeps_url_and_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback_only: list[Any]
) -> None:
    with MotoServer(tmp_path / "moto") as server:
        assert server.startup_seconds is not None
        url = server.url
        apply_aws_env(monkeypatch, url, tmp_path)
        _ecr_client().get_authorization_token()
        server.restart()
        assert server.url == url and server.running
        _ecr_client().get_authorization_token()
        assert server.auth_token_calls() == 2
    assert not server.running


def test_aws_env_is_loopback_only(tmp_path: Path) -> None:
    env = aws_env("http://127.0.0.1:1", tmp_path)
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    for name, value in env.items():
        if value.startswith("http"):
            host = value.split("//", 1)[1].split(":", 1)[0]
            assert ipaddress.ip_address(host).is_loopback, name
