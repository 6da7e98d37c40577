"""One upstream's failure stays its own: a hanging upstream does not hold back another
upstream's clients of the same digest, nor its quota another's pulls."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import MirrorClient
from fake_upstream import OCI_MANIFEST, FakeUpstream, Serve, manifest_bytes, sha256
from pytest_aiohttp import AiohttpClient

from mirror.app import make_app
from mirror.config import Config, StorageConfig, UpstreamConfig


@pytest.fixture
async def upstreams(serve: Serve) -> tuple[FakeUpstream, ...]:
    return (await serve(FakeUpstream()), await serve(FakeUpstream()))


@pytest.fixture
async def mirror(
    aiohttp_client: AiohttpClient, tmp_path: Path, upstreams: tuple[FakeUpstream, ...]
) -> MirrorClient:
    first, second = upstreams
    config = Config(
        storage=StorageConfig(path=tmp_path / "cache"),
        upstreams=(
            UpstreamConfig(name="first", url=first.url, hosts=("docker.io",), default=True),
            UpstreamConfig(name="second", url=second.url, hosts=("b.example",), prefix="b"),
        ),
    )
    return await aiohttp_client(make_app(config))


async def test_a_hanging_upstream_does_not_hold_back_anothers_clients(
    mirror: MirrorClient, upstreams: tuple[FakeUpstream, ...]
) -> None:
    first = upstreams[0]
    data = os.urandom(256 * 1024)
    for fake in upstreams:
        fake.blobs.put(data)
        fake.manifests.put("team/app", "1", manifest_bytes("app"))
    first.mode = "hang"
    digest = sha256(data)

    stuck_blob = asyncio.create_task(mirror.get(f"/v2/team/app/blobs/{digest}"))
    stuck_manifest = asyncio.create_task(
        mirror.get("/v2/team/app/manifests/1", headers={"Accept": OCI_MANIFEST})
    )
    await asyncio.sleep(0.2)  # both are waiting on the first upstream now
    async with asyncio.timeout(5):
        async with mirror.get(f"/v2/b/team/app/blobs/{digest}") as response:
            assert response.status == 200
            assert await response.read() == data
        path = f"/v2/b/team/app/manifests/{sha256(manifest_bytes('app'))}"
        async with mirror.get(path, headers={"Accept": OCI_MANIFEST}) as response:
            assert response.status == 200
    assert not stuck_blob.done() and not stuck_manifest.done()
    first.release.set()
    for task in (stuck_blob, stuck_manifest):
        (await task).release()


async def test_one_upstreams_exhausted_quota_does_not_block_another(
    mirror: MirrorClient, upstreams: tuple[FakeUpstream, ...]
) -> None:
    first, second = upstreams
    for fake in upstreams:
        fake.manifests.put("team/app", "1", manifest_bytes("app"))
    first.quota.remaining = 0
    second.quota.remaining = 10
    async with mirror.get("/v2/team/app/manifests/1", headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 429
    async with mirror.get("/v2/b/team/app/manifests/1", headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 200
    assert second.quota.remaining == 9
