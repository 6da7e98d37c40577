"""Real engines for fleet-mode tests: an S3 server (moto), started once per test session.

Plain classes and functions, with thin fixtures at the end (``pytest_plugins`` in
conftest.py makes those visible to every test module).

* :class:`S3Endpoint` is where an S3-compatible store answers and with which keys.
  ``moto_s3`` yields one for moto's server, which accepts any keys and starts in about
  a second: the fast engine.  It accepts tampered and expired presigned URLs.
* ``s3_bucket_name`` names a bucket (not created) that no other test uses: tests share
  the session's server, and a bucket of their own keeps their objects apart.

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import botocore.config
import botocore.session
import pytest
from moto_ecr import DEFAULT_REGION, DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, MotoServer


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
