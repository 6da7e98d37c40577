"""Pinned images kept fresh in the background (mirror/proxy/pins.py): prefetched for every
platform without any client, revalidated with a HEAD every tag_ttl, a moved tag's content
fetched before anyone asks and served while the upstream is down; failures logged once.

Upstream traffic is counted on the upstream's side: docker-registry's own access log, or
the fake upstream's record for a download slow enough to join.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from containerd import ContainerdProcess
from fake_upstream import FakeUpstream, manifest_bytes
from podman import push_tar_image
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient
from upstream_registry import (
    PushedImage,
    RegistryProcess,
    dir_digests,
    push_image,
    push_index,
    skopeo_copy_async,
)

from mirror.app import make_app
from mirror.reference import parse_image_reference

if TYPE_CHECKING:
    from conftest import MirrorClient, MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

KIB, MIB = 1024, 1024 * 1024
WAIT = 15.0  # seconds allowed for a background refresh to have done something


def blob_path(storage: Path, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":", 1)
    return storage / "blobs" / algorithm / hex_digest[:2] / hex_digest


def content(image: PushedImage) -> set[str]:
    """Every manifest and blob of the image, all platforms."""
    return image.manifest_digests() | image.blob_digests()


def content_bytes(image: PushedImage) -> int:
    manifests = [image, *image.children]
    configs: list[int] = [
        json.loads(m.manifest_bytes)["config"]["size"] for m in manifests if m.config_digest
    ]
    return sum(len(m.manifest_bytes) + sum(m.layer_sizes) for m in manifests) + sum(configs)


def all_cached(storage: Path, digests: Iterable[str]) -> bool:
    return all(blob_path(storage, d).exists() for d in digests)


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll `condition` every 50 ms, for WAIT seconds at most."""
    deadline = time.monotonic() + WAIT
    while True:
        met = condition()
        if met if isinstance(met, bool) else await met:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT}s: {what}")
        await asyncio.sleep(0.05)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def refreshes(samples: Samples, result: str) -> float:
    return samples.get(("mirror_pin_refreshes_total", frozenset({("result", result)})), 0.0)


def prefetched_bytes(samples: Samples) -> float:
    return samples.get(("mirror_pin_prefetched_bytes_total", frozenset()), 0.0)


def upstream_bytes(samples: Samples) -> float:
    return samples.get(("mirror_upstream_bytes_total", frozenset({("upstream", "upstream")})), 0)


def client_url(mirror: MirrorClient) -> str:
    return f"http://127.0.0.1:{mirror.server.port}"


async def pinned_mirror(
    aiohttp_client: AiohttpClient,
    storage: Path,
    upstream_url: str,
    pins: Iterable[str],
    tag_ttl: float = 1.0,
    max_size: int | None = None,
) -> MirrorClient:
    """The mirror in-process (make_app, as `mirror serve` builds it) with `pins`."""
    from conftest import mirror_config

    budget = {"max_size": max_size} if max_size else None
    config = dataclasses.replace(
        mirror_config(storage, upstream_url, tag_ttl, budget=budget),
        pins=tuple(parse_image_reference(pin) for pin in pins),
    )
    return await aiohttp_client(make_app(config))


# --------------------------------------------------------------------------- mirror serve


async def test_a_pinned_index_is_prefetched_kept_fresh_with_heads_and_served_when_down(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    first = await push_index(registry.url, "pins/app", "v1", layer_size=32 * KIB)
    storage = tmp_path / "cache"
    config = tmp_path / "mirror.yaml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "storage": {"path": str(storage)},
                "upstreams": [{"name": "upstream", "url": registry.url, "tag_ttl": "1s"}],
                "pins": [f"{registry.host}/pins/app:v1"],
            }
        )
    )
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))

    # No client asks: every platform's manifest, config and layer arrives all the same.
    await until(lambda: all_cached(storage, content(first)), f"v1 cached\n{mirror.log()}")
    await registry.settle()
    assert registry.blob_gets("pins/app") == len(first.blob_digests())

    # Unchanged: each tag_ttl one HEAD of the tag, nothing else (no GET, no blob).
    registry.reset_counts()
    await until(lambda: len(registry.requests()) >= 2, f"two rounds\n{mirror.log()}")
    await registry.settle()
    seen = [(r.method, r.path) for r in registry.requests()]
    assert set(seen) == {("HEAD", "/v2/pins/app/manifests/v1")}, seen

    # Moved: the new content of every platform is cached before anyone asks.
    second = await push_index(registry.url, "pins/app", "v1", layer_size=32 * KIB)
    await until(lambda: all_cached(storage, content(second)), f"v2 cached\n{mirror.log()}")
    await until(lambda: "moved from" in mirror.log(), "the move logged")
    pin = f"{registry.host}/pins/app:v1"
    moved = (
        f"pin {pin} moved from {first.manifest_digest} to {second.manifest_digest};"
        f" prefetched 3 manifests and 4 blobs ({content_bytes(second)} bytes)"
    )
    assert mirror.log().count(moved) == 1, mirror.log()
    assert mirror.log().count(f"pin {pin} is at {first.manifest_digest}") == 1
    samples = await scrape(mirror.url)
    assert refreshes(samples, "moved") == 2  # fetched at start, then moved
    assert refreshes(samples, "unchanged") >= 2
    assert prefetched_bytes(samples) == content_bytes(first) + content_bytes(second)

    # Upstream down: a pull of every platform is served from the cache (the tag stale).
    await asyncio.to_thread(registry.stop)
    pulled = tmp_path / "pulled"
    await skopeo_copy_async(f"{mirror.host}/pins/app:v1", pulled, all_images=True)
    assert dir_digests(pulled) == content(second)
    await until(lambda: _failed_rounds(mirror.url, 3), f"three failed rounds\n{mirror.log()}")
    assert mirror.log().count(f"pin {pin} could not be refreshed") == 1, mirror.log()


async def test_containerd_pulls_a_moved_pin_from_the_cache_while_the_upstream_is_down(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """containerd (hosts.toml, `?ns=`, a HEAD on the tag first) gets the tag's new content,
    fetched by the mirror before any client asked, with the upstream gone."""
    first = await push_tar_image(registry.url, "pins/ctr", "v1", [8 * KIB])
    storage = tmp_path / "cache"
    config = tmp_path / "mirror.yaml"
    config.write_text(
        json.dumps(
            {
                "storage": {"path": str(storage)},
                "upstreams": [{"name": "upstream", "url": registry.url, "tag_ttl": "1s"}],
                "pins": [f"{registry.host}/pins/ctr:v1"],
            }
        )
    )
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    await until(lambda: all_cached(storage, content(first)), f"v1 cached\n{mirror.log()}")
    second = await push_tar_image(registry.url, "pins/ctr", "v1", [8 * KIB])
    await until(lambda: all_cached(storage, content(second)), f"v2 cached\n{mirror.log()}")
    await asyncio.to_thread(registry.stop)

    hosts = tmp_path / "certs.d" / registry.host
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    with ContainerdProcess(tmp_path / "containerd") as containerd:
        pulled = await containerd.pull_async(f"{registry.host}/pins/ctr:v1", tmp_path / "certs.d")
    assert second.manifest_digest in pulled, pulled
    assert first.manifest_digest not in pulled
    answers = [
        line for line in mirror.log().splitlines() if "mirror.access" in line and "?ns=" in line
    ]
    assert len(answers) >= 4, mirror.log()  # the tag, its manifest, config and layer
    assert all(" 200 " in a and ("cache=hit" in a or "cache=stale" in a) for a in answers), answers


async def _failed_rounds(url: str, at_least: int) -> bool:
    return refreshes(await scrape(url), "failed") >= at_least


# --------------------------------------------------------------------------- in-process


async def test_a_client_asking_mid_prefetch_joins_the_download(
    fake_upstream: FakeUpstream, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    fake_upstream.blobs.first_byte_delay = 2.0
    config = b"pinned bytes " * 4096
    layer = fake_upstream.blobs.put(config)
    fake_upstream.manifests.put("x/app", "v1", manifest_bytes(config))
    host = fake_upstream.url.removeprefix("http://")
    mirror = await pinned_mirror(
        aiohttp_client, tmp_path / "cache", fake_upstream.url, [f"{host}/x/app:v1"]
    )
    async with asyncio.timeout(WAIT):
        await fake_upstream.blobs.requested.wait()  # the prefetch's GET, its answer delayed
    async with mirror.get(f"/v2/x/app/blobs/{layer}") as resp:
        assert resp.status == 200
        assert await resp.read() == fake_upstream.blobs.data[layer]
    assert len(fake_upstream.requests("GET", layer)) == 1
    samples = await scrape(client_url(mirror))
    assert samples[("mirror_fetch_joins_total", frozenset())] == 1
    await until(lambda: all_cached(tmp_path / "cache", [layer]), "the blob cached")


async def test_a_pin_by_digest_is_fetched_once_without_any_tag_request(
    registry: RegistryProcess, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    image = await push_image(registry.url, "pins/fixed", None, [16 * KIB, 8 * KIB])
    await registry.settle()
    registry.reset_counts()
    storage = tmp_path / "cache"
    pin = f"{registry.host}/pins/fixed@{image.manifest_digest}"
    mirror = await pinned_mirror(aiohttp_client, storage, registry.url, [pin])
    await until(lambda: all_cached(storage, content(image)), "the image cached")
    await until(
        lambda: _refreshed(mirror, "unchanged", 2), "two more rounds, with nothing to fetch"
    )
    await registry.settle()
    gets = [r.path for r in registry.requests() if r.method == "GET"]
    assert sorted(gets) == sorted(
        [f"/v2/pins/fixed/manifests/{image.manifest_digest}"]
        + [f"/v2/pins/fixed/blobs/{d}" for d in image.blob_digests()]
    )
    assert registry.count("HEAD", "/manifests/") == 0


async def _refreshed(mirror: MirrorClient, result: str, at_least: int) -> bool:
    return refreshes(await scrape(client_url(mirror)), result) >= at_least


async def test_a_blob_over_the_budget_is_not_downloaded_for_nobody(
    registry: RegistryProcess,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Passing through, a blob would be cached nowhere: the prefetch leaves it at once, and
    without a client the download stops (instead of receiving every byte for no one)."""
    caplog.set_level(logging.INFO)
    image = await push_image(registry.url, "pins/big", "v1", [8 * MIB])
    storage = tmp_path / "cache"
    pin = f"{registry.host}/pins/big:v1"
    mirror = await pinned_mirror(
        aiohttp_client, storage, registry.url, [pin], tag_ttl=60, max_size=2 * MIB
    )
    await until(lambda: _refreshed(mirror, "failed", 1), "the refresh failed")
    samples = await scrape(client_url(mirror))
    assert upstream_bytes(samples) < 2 * MIB, upstream_bytes(samples)
    assert not blob_path(storage, image.layer_digests[0]).exists()
    assert all_cached(storage, [image.manifest_digest, image.config_digest or ""])
    assert f"pin {pin} could not be refreshed: no room in the cache budget for 1" in caplog.text
    # A client still gets the whole blob, passed through.
    async with mirror.get(f"/v2/pins/big/blobs/{image.layer_digests[0]}") as resp:
        assert resp.status == 200
        assert len(await resp.read()) == 8 * MIB


async def test_a_vanished_tag_and_a_down_upstream_are_logged_once_and_refreshing_goes_on(
    registry: RegistryProcess,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mirror")
    keep = await push_image(registry.url, "pins/keep", "v1", [16 * KIB])
    gone = await push_image(registry.url, "pins/gone", "v1", [16 * KIB])
    storage = tmp_path / "cache"
    keep_pin, gone_pin = f"{registry.host}/pins/keep:v1", f"{registry.host}/pins/gone:v1"
    await pinned_mirror(aiohttp_client, storage, registry.url, [keep_pin, gone_pin])
    await until(lambda: all_cached(storage, content(keep) | content(gone)), "both cached")

    async with (
        aiohttp.ClientSession() as session,
        session.delete(f"{registry.url}/v2/pins/gone/manifests/{gone.manifest_digest}") as resp,
    ):
        assert resp.status == 202, await resp.text()
    failing = f"pin {gone_pin} could not be refreshed: manifest unknown to upstream"
    await until(lambda: failing in caplog.text, "the vanished tag logged")
    await asyncio.sleep(2.2)  # two more rounds
    assert caplog.text.count(f"pin {gone_pin} could not be refreshed") == 1, caplog.text
    assert all_cached(storage, content(gone))  # still pinned, still cached

    await asyncio.to_thread(registry.stop)
    await until(lambda: f"pin {keep_pin} could not be refreshed" in caplog.text, "down logged")
    await asyncio.sleep(2.2)
    assert caplog.text.count(f"pin {keep_pin} could not be refreshed") == 1, caplog.text
    assert caplog.text.count(f"pin {gone_pin} could not be refreshed") == 1, caplog.text
    assert "Traceback" not in caplog.text

    # The task went on: with the upstream back, a new image under the tag is fetched.
    await asyncio.to_thread(registry.start)
    moved = await push_image(registry.url, "pins/keep", "v1", [16 * KIB])
    await until(lambda: all_cached(storage, content(moved)), "the moved tag cached")
    await until(lambda: f"pin {keep_pin} moved from" in caplog.text, "the move logged")
    assert caplog.text.count(f"pin {keep_pin} refreshes again") == 1, caplog.text
    assert f"pin {gone_pin} refreshes again" not in caplog.text
