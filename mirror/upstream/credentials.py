"""Where an upstream's credentials come from: nowhere, a password, or AWS ECR.

A source hands out the current `Credentials` and, when the upstream has just refused
them, may renew them once (a rotated password file, a fresh ECR token).
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mirror.config import UpstreamConfig
from mirror.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


class CredentialSource(Protocol):
    async def get(self) -> Credentials:
        """The credentials to use now."""

    async def renew(self, rejected: Credentials) -> Credentials | None:
        """After the upstream refused `rejected`: newer credentials, or None if there are
        none to try."""

    async def close(self) -> None: ...


class PasswordCredentials:
    """A username and a password read from an environment variable or a file.

    The password is read at start (a missing one is a config error then, not a failed
    pull later) and read again when the upstream refuses it, so a rotated secret file
    takes effect without a restart.
    """

    def __init__(self, username: str, read_password: Callable[[], str]) -> None:
        self._read = read_password
        self._current = Credentials(username, read_password())

    async def get(self) -> Credentials:
        return self._current

    async def renew(self, rejected: Credentials) -> Credentials | None:
        try:
            fresh = Credentials(self._current.username, self._read())
        except ConfigError as exc:
            log.warning("cannot re-read the upstream password: %s", exc)
            return None
        if fresh == rejected:
            return None
        self._current = fresh
        return fresh

    async def close(self) -> None:
        pass


def credential_source(config: UpstreamConfig) -> CredentialSource | None:
    auth = config.auth
    key = f"upstreams.{config.name}.auth"
    if auth.type == "ecr":
        from mirror.upstream.ecr import EcrCredentials  # botocore loads only when used

        assert auth.region is not None and auth.registry_id is not None
        return EcrCredentials(config.name, auth.region, auth.registry_id)
    if auth.type == "basic":
        assert auth.username is not None
        if auth.password_file is not None:
            return PasswordCredentials(auth.username, _file_reader(auth.password_file, key))
        assert auth.password_env is not None
        return PasswordCredentials(auth.username, _env_reader(auth.password_env, key))
    return None


def _env_reader(variable: str, key: str) -> Callable[[], str]:
    def read() -> str:
        password = os.environ.get(variable)
        if password is None:
            raise ConfigError(f"{key}.password_env", f"environment variable {variable} is not set")
        return password

    return read


def _file_reader(path: Path, key: str) -> Callable[[], str]:
    def read() -> str:
        try:
            # A trailing newline is how editors and `echo` end files, not part of the secret.
            return path.read_text().rstrip("\r\n")
        except OSError as exc:
            problem = f"cannot read {path}: {exc.strerror}"
            raise ConfigError(f"{key}.password_file", problem) from None

    return read
