"""/metrics after real pulls, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import downloads_stored
from fake_upstream import OCI_MANIFEST, FakeUpstream, manifest_bytes
from prometheus_client.parser import text_string_to_metric_families
from upstream_registry import RegistryProcess, push_image

if TYPE_CHECKING:
    from conftest import MirrorClient

    MakeMirror = Callable[..., Awaitable[MirrorClient]]

KIB = 1024


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(mirror: MirrorClient) -> Samples:
    """Every sample of /metrics, keyed by name and labels."""
    async with mirror.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_cold_then_warm_pull(registry: RegistryProcess, make_mirror: MakeMirror) -> None:
    image = await push_image(registry.url, "m/app", "v1", [100 * KIB, 50 * KIB])
    mirror = await make_mirror(registry.url)
    blobs = sorted(image.blob_digests())
    blob_bytes = 100 * KIB + 50 * KIB + json.loads(image.manifest_bytes)["config"]["size"]

    async def pull() -> None:
        headers = {"Accept": OCI_MANIFEST}
        async with mirror.get("/v2/m/app/manifests/v1", headers=headers) as resp:
            assert await resp.read() == image.manifest_bytes
        for digest in blobs:
            async with mirror.get(f"/v2/m/app/blobs/{digest}") as resp:
                assert resp.status == 200
                await resp.read()
        await downloads_stored(mirror)

    await pull()
    cold = await scrape(mirror)
    assert value(cold, "mirror_cache_requests_total", kind="manifest", result="miss") == 1
    assert value(cold, "mirror_cache_requests_total", kind="blob", result="miss") == 3
    assert value(cold, "mirror_served_bytes_total", source="upstream") == blob_bytes + len(
        image.manifest_bytes
    )
    assert value(cold, "mirror_upstream_bytes_total", upstream="upstream") >= blob_bytes
    assert value(cold, "mirror_upstream_requests_total", upstream="upstream", method="GET",
                 status="200") == 4  # fmt: skip
    assert value(cold, "mirror_cache_blobs") == 4  # three blobs and the manifest

    await pull()
    warm = await scrape(mirror)
    assert value(warm, "mirror_cache_requests_total", kind="manifest", result="hit") == 1
    assert value(warm, "mirror_cache_requests_total", kind="blob", result="hit") == 3
    assert value(warm, "mirror_served_bytes_total", source="cache") == blob_bytes + len(
        image.manifest_bytes
    )
    upstream_gets = ("mirror_upstream_requests_total", frozenset(
        {"upstream": "upstream", "method": "GET", "status": "200"}.items()))  # fmt: skip
    assert warm[upstream_gets] == cold[upstream_gets]
    assert value(warm, "mirror_http_requests_total", route="blob", method="GET", status="200") == 6
    assert value(warm, "mirror_http_request_duration_seconds_count", route="manifest") == 2
    assert value(warm, "mirror_cache_size_bytes") > blob_bytes
    assert value(warm, "mirror_cache_max_bytes") == 20 * 1024**3


async def test_joined_requests_are_counted(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(2 * 1024 * KIB)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = 64 * KIB, 0.01
    mirror = await make_mirror(fake_upstream.url)

    async def get() -> bytes:
        async with mirror.get(f"/v2/x/blobs/{digest}") as resp:
            return await resp.read()

    bodies = await asyncio.gather(*(get() for _ in range(8)))
    assert bodies == [data] * 8
    await downloads_stored(mirror)  # the last byte goes out before the commit
    samples = await scrape(mirror)
    assert value(samples, "mirror_fetch_joins_total") == 7
    assert value(samples, "mirror_fetches_in_flight") == 0


async def test_unusual_methods_are_counted_as_other(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    """Methods outside the registry API (the parser knows dozens) share one series."""
    mirror = await make_mirror(fake_upstream.url)
    for method in ("PROPFIND", "MKCOL", "PUT"):
        async with mirror.request(method, "/v2/x/blobs/uploads/") as resp:
            assert resp.status in (404, 405)
    samples = await scrape(mirror)
    methods = {
        dict(labels)["method"]
        for name, labels in samples
        if name == "mirror_http_requests_total" and dict(labels)["route"] == "unsupported"
    }
    assert methods == {"other", "PUT"}
    assert value(samples, "mirror_http_requests_total", route="unsupported", method="other",
                 status="405") == 2  # fmt: skip


async def test_hub_quota_gauges(fake_upstream: FakeUpstream, make_mirror: MakeMirror) -> None:
    hub = fake_upstream
    hub.auth.scheme, hub.quota.remaining, hub.quota.limit = "bearer", 42, 100
    hub.manifests.put("library/x", "1", manifest_bytes("x"))
    mirror = await make_mirror(hub.url, hosts=("docker.io",))
    async with mirror.get("/v2/x/manifests/1", headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 200
    samples = await scrape(mirror)
    assert value(samples, "mirror_upstream_ratelimit_remaining", upstream="upstream") == 41
    assert value(samples, "mirror_upstream_ratelimit_limit", upstream="upstream") == 100


async def test_health_and_readiness(make_mirror: MakeMirror, tmp_path: Path) -> None:
    storage = tmp_path / "cache"
    mirror = await make_mirror("http://127.0.0.1:9", storage=storage)
    async with mirror.get("/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    async with mirror.get("/readyz") as resp:
        assert (resp.status, await resp.json()) == (200, {"ready": True, "problems": []})

    shutil.rmtree(storage / "tmp")
    (storage / "tmp").write_text("not a directory")  # root ignores permissions; this it cannot
    async with mirror.get("/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
        assert body["ready"] is False
        assert body["problems"][0].startswith("storage not writable")
    async with mirror.get("/healthz") as resp:
        assert resp.status == 200
