"""Manifests by tag: revalidation with HEAD, and serving stale when the upstream fails (§3).

Through the whole app (`make_mirror`) against `FakeUpstream`, a Hub-like upstream on
loopback that can be switched into failing: 429, 5xx, dropped connections, refused
credentials, silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fake_upstream import OCI_MANIFEST, FakeUpstream, manifest_bytes

from mirror.config import Timeouts

MirrorClient = TestClient[web.Request, web.Application]
MakeMirror = Callable[..., Awaitable[MirrorClient]]

ACCEPT = {"Accept": OCI_MANIFEST}
TAG = "/v2/library/x/manifests/latest"
NEVER_CACHED = "/v2/library/x/manifests/other"


@pytest.fixture
def registry(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.auth.scheme = "bearer"
    return fake_upstream


@dataclass(frozen=True)
class Served:
    status: int
    digest: str | None
    content_type: str | None
    length: int | None
    body: bytes


async def fetch(mirror: MirrorClient, path: str, method: str = "GET") -> Served:
    async with mirror.request(method, path, headers=ACCEPT) as response:
        return Served(
            response.status,
            response.headers.get("Docker-Content-Digest"),
            response.headers.get("Content-Type"),
            response.content_length,
            await response.read(),
        )


@dataclass(frozen=True)
class Outage:
    """One way the upstream fails, and what a client gets for a tag never cached."""

    name: str
    status: int
    code: str
    retry_after: str | None = None

    def apply(self, fake: FakeUpstream) -> None:
        if self.name == "429":
            fake.fail(429, {"Retry-After": self.retry_after or ""})
        elif self.name == "503":
            fake.fail(503)
        elif self.name == "drop":
            fake.mode = "drop"
        elif self.name == "hang":
            fake.mode = "hang"
        elif self.name == "denied":
            # The cached token is refused (401), and the token service now denies us.
            fake.mode = "reject"
            fake.auth.token_status = 403
        elif self.name == "forbidden":
            fake.fail(403)
        else:
            raise AssertionError(self.name)


OUTAGES = [
    Outage("429", 429, "TOOMANYREQUESTS", retry_after="1"),
    Outage("503", 502, "UPSTREAM_ERROR"),
    Outage("drop", 502, "UPSTREAM_UNAVAILABLE"),
    Outage("hang", 504, "UPSTREAM_TIMEOUT"),
    Outage("denied", 401, "UNAUTHORIZED"),
    Outage("forbidden", 403, "DENIED"),
]


@pytest.mark.parametrize("outage", OUTAGES, ids=lambda o: o.name)
async def test_cached_tag_is_served_stale_when_upstream_fails(
    make_mirror: MakeMirror,
    registry: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    outage: Outage,
) -> None:
    body = manifest_bytes("x")
    digest = registry.manifests.put("library/x", "latest", body)
    registry.manifests.put("library/x", "other", manifest_bytes("other"))
    fast = Timeouts(connect=2, first_byte=0.5, idle=0.5)
    mirror = await make_mirror(registry.url, tag_ttl=0, upstream={"timeouts": fast})

    fresh = await fetch(mirror, TAG)
    assert fresh == Served(200, digest, OCI_MANIFEST, len(body), body)
    head = await fetch(mirror, TAG, "HEAD")
    assert head == Served(200, digest, OCI_MANIFEST, len(body), b"")

    outage.apply(registry)
    assert await fetch(mirror, TAG) == fresh
    assert await fetch(mirror, TAG, "HEAD") == head  # dockerd asks with HEAD first
    by_digest = await fetch(mirror, f"/v2/library/x/manifests/{digest}")
    assert by_digest == fresh

    async with mirror.get(NEVER_CACHED, headers=ACCEPT) as response:
        assert response.status == outage.status, await response.text()
        [error] = (await response.json())["errors"]
        assert error["code"] == outage.code
        assert response.headers.get("Retry-After") == outage.retry_after

    # The stale answers changed nothing: once the upstream is back, revalidation goes on.
    registry.mode, registry.auth.token_status = "ok", 200
    assert await fetch(mirror, TAG) == fresh
    if outage.retry_after is not None:
        # A 429 is honoured: no counted pull before its Retry-After has passed.
        assert (await fetch(mirror, NEVER_CACHED)).status == 429
        await asyncio.sleep(float(outage.retry_after) + 0.1)
    assert (await fetch(mirror, NEVER_CACHED)).status == 200


async def test_revalidation_uses_head_while_the_digest_is_unchanged(
    make_mirror: MakeMirror, registry: FakeUpstream
) -> None:
    body = manifest_bytes("x")
    digest = registry.manifests.put("library/x", "latest", body)
    mirror = await make_mirror(registry.url, tag_ttl=0)

    for _ in range(4):
        assert await fetch(mirror, TAG) == Served(200, digest, OCI_MANIFEST, len(body), body)

    assert registry.count("GET", "/manifests/", status=200) == 1
    assert registry.count("HEAD", "/manifests/latest", status=200) == 3
    assert len(registry.token_requests) == 1


async def test_fresh_tag_is_served_without_asking_upstream(
    make_mirror: MakeMirror, registry: FakeUpstream
) -> None:
    body = manifest_bytes("x")
    registry.manifests.put("library/x", "latest", body)
    mirror = await make_mirror(registry.url, tag_ttl=300)

    for _ in range(3):
        assert (await fetch(mirror, TAG)).body == body
    registry.fail(503)
    assert (await fetch(mirror, TAG)).body == body
    assert registry.count("GET", "/manifests/", status=200) == 1
    assert registry.count("HEAD", "/manifests/") == 0


async def test_new_digest_on_head_is_fetched_by_digest(
    make_mirror: MakeMirror, registry: FakeUpstream
) -> None:
    old_body, new_body = manifest_bytes("old"), manifest_bytes("new")
    old = registry.manifests.put("library/x", "latest", old_body)
    mirror = await make_mirror(registry.url, tag_ttl=0)
    assert (await fetch(mirror, TAG)).digest == old

    new = registry.manifests.put("library/x", "latest", new_body)
    assert await fetch(mirror, TAG) == Served(200, new, OCI_MANIFEST, len(new_body), new_body)
    manifest_gets = [s.path for s in registry.seen if s.method == "GET" and "/manifests/" in s.path]
    assert [p for p in manifest_gets if p.endswith("latest")] == [TAG, TAG]  # the 401, then 200
    assert manifest_gets[2:] == [f"/v2/library/x/manifests/{new}"]

    # The new digest is now the tag's: only HEADs from here on, and the old one stays
    # servable by digest without the upstream.
    assert (await fetch(mirror, TAG)).body == new_body
    registry.fail(503)
    assert (await fetch(mirror, f"/v2/library/x/manifests/{old}")).body == old_body
    assert registry.count("GET", "/manifests/", status=200) == 2
