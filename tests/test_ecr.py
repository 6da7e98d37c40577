"""AWS ECR as an upstream: tokens from a real GetAuthorizationToken (moto in server mode).

The fake ECR registry wants Basic `AWS:<password>` with the password moto hands out
(`<registry id>-auth-token`) and redirects blobs to a fake S3 that refuses any request
carrying `Authorization`, as presigned S3 URLs do. GetAuthorizationToken calls are
counted on moto's side, from its request recording.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MirrorClient
from fake_upstream import CDN, OCI_MANIFEST, FakeUpstream, Serve, basic, manifest_bytes
from moto_ecr import MotoServer, apply_aws_env
from pytest_aiohttp import AiohttpClient

from mirror.app import make_app
from mirror.config import AuthConfig, Config, StorageConfig, UpstreamConfig, config_from_dict
from mirror.upstream import ecr

REGISTRY_ID = "123456789012"
ECR_HOST = f"{REGISTRY_ID}.dkr.ecr.us-east-1.amazonaws.com"
PASSWORD = f"{REGISTRY_ID}-auth-token"  # what moto's GetAuthorizationToken hands out
ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def aws(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """botocore's whole credential chain and endpoint pointed at moto, counts reset."""
    apply_aws_env(monkeypatch, moto.url, tmp_path / "home")
    moto.reset_counts()
    return moto


@pytest.fixture
async def registry(fake_upstream: FakeUpstream, serve: Serve) -> FakeUpstream:
    fake_upstream.auth.scheme, fake_upstream.auth.credentials = "basic", ("AWS", PASSWORD)
    s3 = await serve(CDN(fake_upstream.blobs))
    fake_upstream.blob_redirect = f"http://localhost:{s3.port}/blobs"
    fake_upstream.manifests.put("team/app", "1", manifest_bytes("app"))
    fake_upstream.blobs.put(b"layer bytes of team/app")
    return fake_upstream


@pytest.fixture
async def mirror(
    aiohttp_client: AiohttpClient, tmp_path: Path, registry: FakeUpstream, aws: MotoServer
) -> MirrorClient:
    """Docker Hub (unreachable here) as the default, and the ECR registry under `ecr/`."""
    hub = UpstreamConfig(name="hub", url="http://127.0.0.1:9", hosts=("docker.io",), default=True)
    private = UpstreamConfig(
        name="ecr",
        url=registry.url,
        hosts=(ECR_HOST,),
        prefix="ecr",
        auth=AuthConfig("ecr", region="us-east-1", registry_id=REGISTRY_ID),
    )
    config = Config(storage=StorageConfig(path=tmp_path / "cache"), upstreams=(hub, private))
    return await aiohttp_client(make_app(config))


async def get(mirror: MirrorClient, path: str) -> tuple[int, bytes]:
    async with mirror.get(path, headers=ACCEPT) as response:
        return response.status, await response.read()


async def test_pull_through_ecr(
    mirror: MirrorClient, registry: FakeUpstream, aws: MotoServer
) -> None:
    digest = next(d for d in registry.blobs.data)
    by_prefix = await get(mirror, "/v2/ecr/team/app/manifests/1")
    by_ns = await get(mirror, f"/v2/team/app/manifests/1?ns={ECR_HOST}")
    assert by_prefix == by_ns == (200, manifest_bytes("app"))
    assert await get(mirror, f"/v2/ecr/team/app/blobs/{digest}") == (
        200,
        b"layer bytes of team/app",
    )

    assert aws.auth_token_calls() == 1  # one token serves every request
    sent = {s.authorization for s in registry.seen}
    assert sent == {basic("AWS", PASSWORD)}  # sent up front: no 401 round trip
    assert all(s.status != 401 for s in registry.seen)


async def test_token_is_renewed_in_the_background(
    mirror: MirrorClient, registry: FakeUpstream, aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto's token expired in 2015: only the floor between renewals holds them back.
    monkeypatch.setattr(ecr, "MIN_REFRESH_INTERVAL", 0.3)
    assert (await get(mirror, "/v2/ecr/team/app/manifests/1"))[0] == 200
    assert aws.auth_token_calls() == 1
    await asyncio.sleep(1.0)
    assert aws.auth_token_calls() >= 3  # renewed with no request asking for it
    seen = len(registry.seen)
    digest = registry.manifests.put("team/app", "2", manifest_bytes("2"))
    assert (await get(mirror, f"/v2/ecr/team/app/manifests/{digest}"))[0] == 200
    assert [s.status for s in registry.seen[seen:]] == [200]


def test_renewal_is_due_at_three_quarters_of_the_token_life() -> None:
    credentials = ecr.EcrCredentials("ecr", "us-east-1", REGISTRY_ID)
    credentials._expires_at = time.time() + 12 * 3600
    assert 9 * 3600 - 5 < credentials.next_refresh_delay() <= 9 * 3600
    credentials._expires_at = time.time() - 3600  # moto's 2015, or a clock gone wrong
    assert credentials.next_refresh_delay() == ecr.MIN_REFRESH_INTERVAL


async def test_a_401_triggers_one_renewal(
    mirror: MirrorClient, registry: FakeUpstream, aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await get(mirror, "/v2/ecr/team/app/manifests/1"))[0] == 200
    monkeypatch.setattr(ecr, "RENEW_ON_REJECT_INTERVAL", 0.0)
    registry.auth.refuse_next = 1  # the registry no longer takes the token it issued
    seen = len(registry.seen)
    digest = registry.manifests.put("team/app", "2", manifest_bytes("2"))
    assert (await get(mirror, f"/v2/ecr/team/app/manifests/{digest}"))[0] == 200
    assert [s.status for s in registry.seen[seen:]] == [401, 200]
    assert aws.auth_token_calls() == 2


async def test_a_registry_that_keeps_refusing_is_not_hammered(
    mirror: MirrorClient, registry: FakeUpstream, aws: MotoServer
) -> None:
    registry.mode = "reject"
    for _ in range(3):
        async with mirror.get("/v2/ecr/team/app/manifests/1", headers=ACCEPT) as response:
            assert response.status == 401
            [error] = (await response.json())["errors"]
            assert error["code"] == "UNAUTHORIZED"
            assert PASSWORD not in await response.text()
    assert aws.auth_token_calls() == 1  # a renewal at most every RENEW_ON_REJECT_INTERVAL


async def test_missing_aws_credentials_fail_only_that_upstream(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    registry: FakeUpstream,
    aws: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    serve: Serve,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    public = await serve(FakeUpstream())
    public.manifests.put("library/alpine", "3", manifest_bytes("alpine"))
    config = config_from_dict(
        {
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": [
                {"name": "public", "url": public.url, "default": True},
                {
                    "name": "ecr",
                    "url": registry.url,
                    "prefix": "ecr",
                    "auth": {"type": "ecr", "region": "us-east-1", "registry_id": REGISTRY_ID},
                    "access": "public",
                },
            ],
        }
    )
    mirror = await aiohttp_client(make_app(config))
    async with mirror.get("/v2/ecr/team/app/manifests/1", headers=ACCEPT) as response:
        assert response.status == 401
        [error] = (await response.json())["errors"]
        assert "no usable AWS credentials" in error["message"]
    assert await get(mirror, "/v2/library/alpine/manifests/3") == (200, manifest_bytes("alpine"))
    assert registry.seen == []  # nothing was sent without a token
