"""End to end with two real docker-registry upstreams behind one `mirror serve`.

The first plays Docker Hub (it answers for `docker.io` and is the default); the second
is reached by containerd's `?ns=<its host>` or by the path prefix `second/`. Both hold
an image under the same repository name and tag, with different content.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from podman import (
    podman_image_digest,
    podman_pull_async,
    podman_rmi,
    push_tar_image,
)
from upstream_registry import (
    OCI_MANIFEST,
    PushedImage,
    RegistryProcess,
    dir_digests,
    push_image,
    skopeo_copy_async,
)

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

KIB = 1024
ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture
def second(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path / "second-upstream") as reg:
        yield reg


def write_config(path: Path, first: RegistryProcess, second: RegistryProcess) -> Path:
    path.write_text(
        f"storage: {{path: {path.parent / 'cache'}}}\n"
        "upstreams:\n"
        f"  - name: first\n"
        f"    url: {first.url}\n"
        "    hosts: [docker.io, index.docker.io]\n"
        "    default: true\n"
        f"  - name: second\n"
        f"    url: {second.url}\n"
        "    prefix: second\n"
    )
    return path


async def manifest(url: str) -> tuple[int, str | None, str | None]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=ACCEPT) as response:
        await response.read()
        return (
            response.status,
            response.headers.get("Docker-Content-Digest"),
            response.headers.get("OCI-Namespace"),
        )


def files(image: PushedImage) -> set[str]:
    return image.manifest_digests() | image.blob_digests()


async def test_two_upstreams_behind_one_mirror(
    registry: RegistryProcess,
    second: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
) -> None:
    on_first = await push_image(registry.url, "library/app", "1", [64 * KIB])
    on_second = await push_image(second.url, "library/app", "1", [64 * KIB])
    assert on_first.manifest_digest != on_second.manifest_digest
    config = write_config(tmp_path / "mirror.yaml", registry, second)
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    for upstream in (registry, second):
        await upstream.settle()
        upstream.reset_counts()

    # containerd: the registry's host in ?ns=, the repository as the image names it.
    tag = "/v2/library/app/manifests/1"
    assert await manifest(f"{mirror.url}{tag}?ns=docker.io") == (
        200,
        on_first.manifest_digest,
        "docker.io",
    )
    assert await manifest(f"{mirror.url}{tag}?ns={second.host}") == (
        200,
        on_second.manifest_digest,
        second.host,
    )
    # dockerd (no ns, the default upstream; library/ added) and a prefix-style pull.
    assert (await manifest(f"{mirror.url}/v2/app/manifests/1"))[1] == on_first.manifest_digest
    assert (await manifest(f"{mirror.url}/v2/second/library/app/manifests/1"))[:2] == (
        200,
        on_second.manifest_digest,
    )
    assert (await manifest(f"{mirror.url}{tag}?ns=quay.io"))[0] == 404

    # skopeo through the prefix and through the default: each gets its own image.
    await skopeo_copy_async(f"{mirror.host}/second/library/app:1", tmp_path / "s1")
    await skopeo_copy_async(f"{mirror.host}/library/app:1", tmp_path / "f1")
    assert dir_digests(tmp_path / "s1") == files(on_second)
    assert dir_digests(tmp_path / "f1") == files(on_first)
    for upstream in (registry, second):
        await upstream.settle()
        assert upstream.blob_gets() == 2  # config and layer, once each
        upstream.reset_counts()

    # Warm: both cached side by side, neither upstream asked anything.
    await skopeo_copy_async(f"{mirror.host}/second/library/app:1", tmp_path / "s2")
    await skopeo_copy_async(f"{mirror.host}/library/app:1", tmp_path / "f2")
    assert dir_digests(tmp_path / "s2") == files(on_second)
    assert dir_digests(tmp_path / "f2") == files(on_first)
    for upstream in (registry, second):
        await upstream.settle()
        assert upstream.requests() == []


async def test_one_failing_upstream_leaves_the_other_alone(
    registry: RegistryProcess,
    second: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
) -> None:
    on_second = await push_image(second.url, "team/tool", "2", [32 * KIB])
    config = write_config(tmp_path / "mirror.yaml", registry, second)
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    await asyncio.to_thread(registry.stop)

    status, _, _ = await manifest(f"{mirror.url}/v2/library/app/manifests/1")
    assert status == 502  # the first is down, and says so
    await skopeo_copy_async(f"{mirror.host}/second/team/tool:2", tmp_path / "tool")
    assert dir_digests(tmp_path / "tool") == files(on_second)


async def test_podman_mirror_location_with_a_prefix_reaches_the_second_upstream(
    registry: RegistryProcess,
    second: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
    podman_work: Path,
) -> None:
    """registries.conf: docker.io mirrored at `MIRROR/second`; podman asks for
    `/v2/second/library/app/...`, which the mirror routes to the second upstream."""
    await push_tar_image(registry.url, "library/app", "1")  # a decoy on the default
    on_second = await push_tar_image(second.url, "library/app", "1")
    config = write_config(tmp_path / "mirror.yaml", registry, second)
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    for upstream in (registry, second):
        await upstream.settle()
        upstream.reset_counts()

    image = "docker.io/library/app:1"
    location = f"{mirror.host}/second"
    result = await podman_pull_async(image, location, podman_work)
    assert result.escapes == ()
    assert podman_image_digest(image, podman_work) == on_second.manifest_digest
    await second.settle()
    assert second.blob_gets() == len(on_second.blob_digests())
    assert registry.requests() == []

    # Warm, after `podman rmi`: podman pings, GETs the manifest and every blob again; the
    # mirror answers all of it from its cache.
    await asyncio.to_thread(podman_rmi, image, podman_work)
    second.reset_counts()
    await podman_pull_async(image, location, podman_work)
    assert podman_image_digest(image, podman_work) == on_second.manifest_digest
    await second.settle()
    assert second.requests() == []
