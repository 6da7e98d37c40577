"""Docker Hub as the upstream: counted pulls spared, the quota honoured, tokens reused.

The fake Hub (fake_upstream.FakeUpstream on loopback) wants Bearer tokens from its token
service, sends `ratelimit-*` headers that count down on manifest GETs and not on HEADs,
answers 429 once the quota is spent, and redirects blob GETs to a CDN that refuses any
request carrying `Authorization`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MirrorClient
from fake_upstream import CDN, OCI_MANIFEST, FakeUpstream, Serve, sha256
from pytest_aiohttp import AiohttpClient

from mirror.app import make_app
from mirror.config import AuthConfig, Config, StorageConfig, UpstreamConfig
from mirror.upstream import ratelimit

ACCEPT = {"Accept": OCI_MANIFEST}
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Image:
    name: str  # as a dockerd user writes it: no library/
    tag: str
    digest: str
    blobs: tuple[str, ...]


def put_image(hub: FakeUpstream, name: str, tag: str) -> Image:
    config = json.dumps({"image": name, "tag": tag, "nonce": os.urandom(8).hex()}).encode()
    layer = os.urandom(32 * 1024)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}],
    }
    digest = hub.manifests.put(f"library/{name}", tag, json.dumps(manifest).encode())
    return Image(name, tag, digest, (hub.blobs.put(config), hub.blobs.put(layer)))


async def pull(mirror: MirrorClient, image: Image) -> int:
    """What dockerd does: the manifest by tag, then each blob; returns the status."""
    async with mirror.get(f"/v2/{image.name}/manifests/{image.tag}", headers=ACCEPT) as resp:
        if resp.status != 200:
            return resp.status
        assert resp.headers["Docker-Content-Digest"] == image.digest
        assert sha256(await resp.read()) == image.digest
    for digest in image.blobs:
        async with mirror.get(f"/v2/{image.name}/blobs/{digest}") as resp:
            assert resp.status == 200
            assert "sha256:" + hashlib.sha256(await resp.read()).hexdigest() == digest
    return 200


@dataclass
class Hub:
    registry: FakeUpstream
    cdn: CDN

    def manifest_gets(self) -> int:
        return self.registry.count("GET", "/manifests/", status=200)

    def manifest_heads(self) -> int:
        return self.registry.count("HEAD", "/manifests/", status=200)

    def requests(self) -> int:
        """Every request the registry and its CDN received."""
        return len(self.registry.seen) + len(self.cdn.seen)


@pytest.fixture
async def hub(fake_upstream: FakeUpstream, serve: Serve) -> Hub:
    fake_upstream.auth.scheme, fake_upstream.quota.remaining = "bearer", 100
    cdn = await serve(CDN(fake_upstream.blobs))
    # Another host name for the same loopback: Authorization must not follow the redirect.
    fake_upstream.blob_redirect = f"http://localhost:{cdn.port}/blobs"
    return Hub(fake_upstream, cdn)


StartMirror = Callable[..., Awaitable[MirrorClient]]


@pytest.fixture
def start_mirror(aiohttp_client: AiohttpClient, tmp_path: Path, hub: Hub) -> StartMirror:
    async def start(**upstream: object) -> MirrorClient:
        config = Config(
            storage=StorageConfig(path=tmp_path / "cache"),
            upstreams=(
                UpstreamConfig(
                    name="hub",
                    url=hub.registry.url,
                    hosts=("docker.io", "index.docker.io"),
                    default=True,
                    **upstream,  # type: ignore[arg-type]
                ),
            ),
        )
        return await aiohttp_client(make_app(config))

    return start


async def test_warm_pull_inside_tag_ttl_makes_no_upstream_request(
    hub: Hub, start_mirror: StartMirror
) -> None:
    image = put_image(hub.registry, "alpine", "3.20")
    mirror = await start_mirror()

    assert await pull(mirror, image) == 200
    # Cold: one free HEAD for the tag, one counted GET for the digest; blobs via the CDN.
    assert (hub.manifest_heads(), hub.manifest_gets()) == (1, 1)
    assert hub.registry.quota.remaining == 99
    assert [s.authorization for s in hub.cdn.seen] == [None, None]

    before = hub.requests()
    for _ in range(3):
        assert await pull(mirror, image) == 200
    assert hub.requests() == before


async def test_after_tag_ttl_one_head_and_no_get(hub: Hub, start_mirror: StartMirror) -> None:
    image = put_image(hub.registry, "alpine", "3.20")
    mirror = await start_mirror(tag_ttl=0)
    assert await pull(mirror, image) == 200
    heads, gets, blobs = hub.manifest_heads(), hub.manifest_gets(), len(hub.cdn.seen)

    assert await pull(mirror, image) == 200
    assert hub.manifest_heads() == heads + 1
    assert (hub.manifest_gets(), len(hub.cdn.seen)) == (gets, blobs)
    assert hub.registry.quota.remaining == 99  # the HEAD was free


async def test_a_tag_moved_costs_one_get_and_a_known_digest_none(
    hub: Hub, start_mirror: StartMirror
) -> None:
    first = put_image(hub.registry, "alpine", "3.20")
    mirror = await start_mirror(tag_ttl=0)
    assert await pull(mirror, first) == 200

    moved = put_image(hub.registry, "alpine", "3.20")  # the tag now names a new image
    assert await pull(mirror, moved) == 200
    assert hub.manifest_gets() == 2

    # Another tag of a digest already cached: the HEAD finds it, no GET is spent.
    body = hub.registry.manifests.bodies[("library/alpine", moved.digest)]
    hub.registry.manifests.put("library/alpine", "latest", body)
    assert await pull(mirror, Image("alpine", "latest", moved.digest, moved.blobs)) == 200
    assert hub.manifest_gets() == 2
    assert hub.registry.quota.remaining == 98


async def test_concurrent_cold_pulls_of_a_tag_spend_one_pull(
    hub: Hub, start_mirror: StartMirror
) -> None:
    image = put_image(hub.registry, "alpine", "3.20")
    mirror = await start_mirror()
    statuses = await asyncio.gather(*(pull(mirror, image) for _ in range(8)))
    assert statuses == [200] * 8
    assert (hub.manifest_heads(), hub.manifest_gets()) == (1, 1)
    assert hub.registry.quota.remaining == 99


async def test_at_the_reserve_cached_images_pull_and_others_get_429(
    hub: Hub, start_mirror: StartMirror, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror")
    cached = put_image(hub.registry, "alpine", "3.20")
    uncached = put_image(hub.registry, "busybox", "1")
    hub.registry.quota.remaining = 6
    mirror = await start_mirror(tag_ttl=0, ratelimit_reserve=5)
    assert await pull(mirror, cached) == 200
    assert hub.registry.quota.remaining == 5  # at the reserve now

    gets = hub.manifest_gets()
    for _ in range(2):
        assert await pull(mirror, cached) == 200  # revalidated by free HEADs
        async with mirror.get("/v2/busybox/manifests/1", headers=ACCEPT) as resp:
            assert resp.status == 429
            [error] = (await resp.json())["errors"]
            assert error["code"] == "TOOMANYREQUESTS"
            assert "quota" in error["message"]
            assert 21000 < int(resp.headers["Retry-After"]) <= 21600
    assert hub.manifest_gets() == gets  # no counted pull was spent
    assert hub.registry.quota.remaining == 5
    assert "upstream hub: pull quota 6 of 100 per 21600s left" in caplog.text
    assert caplog.text.count("pull quota exhausted") == 1  # once per event, not per request

    # The window slides: once a free HEAD shows pulls to spare, they are spent again.
    hub.registry.quota.remaining = 50
    assert await pull(mirror, uncached) == 200
    assert hub.registry.quota.remaining == 49
    assert "pull quota back (50 left)" in caplog.text


async def test_a_blocked_upstream_is_probed_with_a_free_head(
    hub: Hub, start_mirror: StartMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A by-digest miss has no tag HEAD of its own: the mirror HEADs the digest first."""
    monkeypatch.setattr(ratelimit, "PROBE_INTERVAL", 0.0)
    image = put_image(hub.registry, "alpine", "3.20")
    hub.registry.quota.remaining = 1
    mirror = await start_mirror()
    assert await pull(mirror, put_image(hub.registry, "busybox", "1")) == 200
    assert hub.registry.quota.remaining == 0
    path = f"/v2/alpine/manifests/{image.digest}"
    async with mirror.get(path, headers=ACCEPT) as resp:
        assert resp.status == 429
    heads = hub.manifest_heads()

    hub.registry.quota.remaining = 10
    async with mirror.get(path, headers=ACCEPT) as resp:
        assert resp.status == 200
    assert hub.manifest_heads() == heads + 1
    assert hub.registry.quota.remaining == 9


async def test_quota_spent_by_others_serves_cache_and_refuses_new_pulls(
    hub: Hub, start_mirror: StartMirror
) -> None:
    cached = put_image(hub.registry, "alpine", "3.20")
    put_image(hub.registry, "busybox", "1")
    mirror = await start_mirror(tag_ttl=0)
    assert await pull(mirror, cached) == 200
    hub.registry.quota.remaining = 0  # others behind the same address spent it
    assert await pull(mirror, cached) == 200
    async with mirror.get("/v2/busybox/manifests/1", headers=ACCEPT) as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) > 0


async def test_tokens_are_reused_then_refreshed_when_expired(
    hub: Hub, start_mirror: StartMirror
) -> None:
    # The mirror renews 10 s before expiry, 1 s at the least: a 2 s token lives 1 s here.
    hub.registry.auth.expires_in = 2
    image = put_image(hub.registry, "alpine", "3.20")
    mirror = await start_mirror(tag_ttl=0)
    for _ in range(3):
        assert await pull(mirror, image) == 200
    scopes = [t.query.get("scope") for t in hub.registry.token_requests]
    assert scopes == ["repository:library/alpine:pull"]

    await asyncio.sleep(1.2)
    assert await pull(mirror, image) == 200
    assert len(hub.registry.token_requests) == 2
    tokens = [s.authorization for s in hub.registry.seen if s.status == 200 and s.path != "/token"]
    assert tokens[-1] == "Bearer token-2"


async def test_docker_id_with_an_access_token_from_a_file(
    hub: Hub, start_mirror: StartMirror, tmp_path: Path
) -> None:
    secret = tmp_path / "hub-token"
    secret.write_text("dckr_pat_0123456789\n")
    hub.registry.auth.credentials = ("alice", "dckr_pat_0123456789")
    image = put_image(hub.registry, "alpine", "3.20")
    auth = AuthConfig("basic", username="alice", password_file=secret)
    mirror = await start_mirror(auth=auth)
    assert await pull(mirror, image) == 200
    assert all(t.authorization and t.authorization.startswith("Basic ")
               for t in hub.registry.token_requests)  # fmt: skip
    assert all(s.authorization is None for s in hub.cdn.seen)

    hub.registry.auth.credentials = ("alice", "another")
    hub.registry.auth.revoke()
    async with mirror.get("/v2/busybox/manifests/1", headers=ACCEPT) as resp:
        assert resp.status == 401
        [error] = (await resp.json())["errors"]
        assert error["code"] == "UNAUTHORIZED"
        assert "dckr_pat" not in await resp.text()
