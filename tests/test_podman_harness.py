"""The podman harness (tests/podman.py): real podman pulling through a "mirror".

A plain docker-registry plays the mirror (it cannot strip a path prefix, so the prefix
test stores the image under the prefixed name), and an aiohttp server on the test's
event loop plays a mirror that has nothing, to show what podman does then.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from aiohttp import web
from podman import (
    PodmanResult,
    podman_cleanup,
    podman_image_digest,
    podman_pull_async,
    podman_rmi,
    push_tar_image,
    run_podman,
)
from pytest_aiohttp import AiohttpServer
from upstream_registry import PushedImage, RegistryProcess, push_image

KIB = 1024
IMAGE = "docker.io/library/busybox:1"
HUB_FALLBACK = "CONNECT registry-1.docker.io:443 HTTP/1.1"


Request = tuple[str, str, str, int]


def logged(registry: RegistryProcess) -> list[Request]:
    return [(r.method, r.path, r.query, r.status) for r in registry.requests()]


def expected_pull(image: PushedImage) -> tuple[list[Request], list[Request]]:
    """The ping and manifest GET, in order; then one GET per blob, in any order."""
    repo = f"/v2/{image.name}"
    first = [("GET", "/v2/", "", 200), ("GET", f"{repo}/manifests/{image.tag}", "", 200)]
    blobs = sorted(("GET", f"{repo}/blobs/{d}", "", 200) for d in image.blob_digests())
    return first, blobs


async def assert_pulled(
    registry: RegistryProcess, image: PushedImage, work: Path, mirror: str
) -> PodmanResult:
    """Pull IMAGE through ``mirror``; podman must ask the registry for exactly ``image``."""
    await registry.settle()
    registry.reset_counts()
    result = await podman_pull_async(IMAGE, mirror, work)
    assert result.escapes == ()
    assert f"sha256:{result.image_id}" == image.config_digest
    assert podman_image_digest(IMAGE, work) == image.manifest_digest
    await registry.settle()
    requests = logged(registry)
    first, blobs = expected_pull(image)
    assert requests[:2] == first, requests
    assert sorted(requests[2:]) == blobs, requests
    return result


@pytest.mark.parametrize("pusher", ["tar-layers", "push_image-empty-layer"])
async def test_pull_through_registry_as_mirror_twice(
    registry: RegistryProcess, podman_work: Path, pusher: str
) -> None:
    if pusher == "tar-layers":
        image = await push_tar_image(registry.url, "library/busybox", "1", [64 * KIB, 1 * KIB])
    else:
        # Random-byte layers are not tars and podman cannot unpack them; a 0-byte blob
        # is an empty tar.
        image = await push_image(registry.url, "library/busybox", "1", [0])

    await assert_pulled(registry, image, podman_work, registry.host)
    assert registry.blob_gets("library/busybox") == len(image.blob_digests())

    # After rmi every blob is fetched again.
    podman_rmi(IMAGE, podman_work)
    await assert_pulled(registry, image, podman_work, registry.host)

    # Still present: podman re-reads the manifest and the config, not the layers.
    await registry.settle()
    registry.reset_counts()
    await podman_pull_async(IMAGE, registry.host, podman_work)
    await registry.settle()
    first, _ = expected_pull(image)
    config = f"/v2/library/busybox/blobs/{image.config_digest}"
    assert logged(registry) == [*first, ("GET", config, "", 200)]


async def test_mirror_location_with_path_prefix(
    registry: RegistryProcess, podman_work: Path
) -> None:
    # podman asks the mirror for second/library/busybox: stored under that name here.
    image = await push_image(registry.url, "second/library/busybox", "1", [0])
    await assert_pulled(registry, image, podman_work, f"{registry.host}/second")


async def test_mirror_miss_falls_back_to_hub_and_the_tripwire_stops_it(
    aiohttp_server: AiohttpServer, podman_work: Path
) -> None:
    """An empty mirror on this event loop: podman asks it, then tries Docker Hub."""
    seen: list[tuple[str, str, list[str], str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(
            (
                request.method,
                request.path_qs,
                request.headers.getall("Accept", []),
                request.headers.get("User-Agent", ""),
            )
        )
        if request.path == "/v2/":
            return web.json_response({})
        error = {"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": None}
        return web.json_response({"errors": [error]}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    mirror = f"127.0.0.1:{server.port}"

    result = await podman_pull_async(IMAGE, mirror, podman_work, check=False)
    assert result.returncode != 0
    assert "Mirrors also failed" in result.stderr, result.stderr
    # The Hub fallback: /v2/ then /v1/_ping, each refused at the tripwire.
    assert result.escapes and set(result.escapes) == {HUB_FALLBACK}, result.escapes
    # The mirror was served by this loop while podman ran in a thread.
    assert [(method, path) for method, path, _, _ in seen] == [
        ("GET", "/v2/"),
        ("GET", "/v2/library/busybox/manifests/1"),
    ]
    accept = seen[1][2]
    assert "application/vnd.oci.image.manifest.v1+json" in accept, accept
    assert seen[1][3].startswith("containers/"), seen[1][3]

    # Blocking podman_pull here would stall this loop and the mirror with it.
    with pytest.raises(AssertionError, match="refused off-loopback request: CONNECT"):
        await podman_pull_async(IMAGE, mirror, podman_work)


async def test_timeout_kills_podman(podman_work: Path) -> None:
    """A mirror that accepts connections and never answers: the harness kills podman."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        mirror = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(AssertionError, match="still running after 2s; killed"):
            await podman_pull_async(IMAGE, mirror, podman_work, timeout=2)
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and runs_in(pid, podman_work)]


def runs_in(pid: str, work: Path) -> bool:
    try:
        return str(work).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def test_cleanup_removes_images_and_the_runroot(
    registry: RegistryProcess, podman_work: Path
) -> None:
    podman_cleanup(podman_work)  # podman never ran here: nothing to do
    assert runroot_of(podman_work) is None
    image = await push_tar_image(registry.url, "library/busybox", "1")
    await assert_pulled(registry, image, podman_work, registry.host)
    runroot = runroot_of(podman_work)
    assert runroot is not None and len(str(runroot)) <= 50, runroot

    podman_cleanup(podman_work)
    assert runroot_of(podman_work) is None
    assert not await asyncio.to_thread(runroot.exists)
    assert run_podman(podman_work, "images", "--all", "--quiet").stdout == ""


def runroot_of(work: Path) -> Path | None:
    """The short directory ``work/runroot`` links to, while the link exists."""
    link = work / "runroot"
    return link.resolve() if link.is_symlink() else None
