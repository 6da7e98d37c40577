"""Manifest requests through the whole app (`make_app`): references that name nothing
are unknown, without asking upstream.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fault_upstream import FaultyUpstream
from pytest_aiohttp import AiohttpServer
from upstream_registry import (
    RegistryProcess,
    push_image,
)

from mirror.reference import MANIFEST_TYPES
from mirror.storage.index import INDEX_FILE

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

MirrorClient = TestClient[web.Request, web.Application]
MakeMirror = Callable[..., Awaitable[MirrorClient]]
KIB = 1024
ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}
OCTET_STREAM = "application/octet-stream"


@pytest.fixture
async def fault(aiohttp_server: AiohttpServer) -> AsyncIterator[FaultyUpstream]:
    fake = FaultyUpstream()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    fake.release.set()


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    """The message of the one OCI error in `response`."""
    assert response.status == status, await response.text()
    [error] = (await response.json())["errors"]
    assert error["code"] == code, error
    return str(error["message"])


def recorded_type(storage: Path, digest: str) -> str | None:
    with sqlite3.connect(storage / INDEX_FILE) as db:
        row = db.execute("SELECT media_type FROM blobs WHERE digest = ?", (digest,)).fetchone()
    return None if row is None else str(row[0])


def tag_row(storage: Path, tag: str) -> str | None:
    with sqlite3.connect(storage / INDEX_FILE) as db:
        row = db.execute("SELECT digest FROM tags WHERE tag = ?", (tag,)).fetchone()
    return None if row is None else str(row[0])


# --- references that name nothing -------------------------------------------------------

NOT_REFERENCES = [
    ".INVALID_MANIFEST_NAME",
    "-bad",
    "t" * 129,
    "sha256:abc",
    "sha256:" + "A" * 64,
    "md5:" + "a" * 32,
    "sha384:" + "a" * 96,
]


async def test_a_reference_that_is_neither_tag_nor_digest_is_unknown_without_upstream(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    await push_image(registry.url, "conf/app", "v1", [KIB])
    mirror = await make_mirror(registry.url)
    await registry.settle()
    registry.reset_counts()
    for reference in NOT_REFERENCES:
        path = f"/v2/conf/app/manifests/{reference}"
        async with mirror.get(path, headers=ACCEPT) as response:
            message = await expect_error(response, 404, "MANIFEST_UNKNOWN")
            assert reference[:20] in message
        async with mirror.head(path, headers=ACCEPT) as response:
            assert response.status == 404
            assert await response.read() == b""
    async with mirror.get("/v2/conf/app/blobs/sha256:abc") as response:
        await expect_error(response, 400, "DIGEST_INVALID")  # where a digest is required
    await registry.settle()
    assert registry.requests() == []
    async with mirror.get("/v2/conf/app/manifests/v1", headers=ACCEPT) as response:
        assert response.status == 200  # the registry was there to be asked


async def test_every_process_answers_an_invalid_reference_alike(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """With workers, a worker parses the reference before anything is handed off; the
    kernel spreads 16 connections over both processes (see test_workers)."""
    mirror = start_mirror_process(
        "--storage", str(tmp_path / "cache"), "--upstream", registry.url, "--workers", "2"
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while "worker 1 (pid" not in mirror.log():
        assert time.monotonic() < deadline, mirror.log()
        await asyncio.sleep(0.05)
    url = f"{mirror.url}/v2/conf/app/manifests/.INVALID_MANIFEST_NAME"
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(16):
            async with session.get(url) as response:
                await expect_error(response, 404, "MANIFEST_UNKNOWN")
    await registry.settle()
    assert registry.requests() == []
