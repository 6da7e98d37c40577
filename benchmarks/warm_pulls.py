"""Upstream requests per warm pull, by client, counted on the upstream's side.

A real docker-registry (playing Docker Hub: the mirror's upstream lists `docker.io`) holds
one image; `mirror serve` runs as a subprocess in front of it. After one cold pull warms
the cache, each client pulls again and the upstream's access log says what reached it:
first with the tag fresh (inside `tag_ttl`), then with `tag_ttl: 0` (every pull
revalidates). Clients: skopeo and podman (real), containerd's and dockerd's request
sequences (sent by hand: no containerd or Docker engine here).

    python benchmarks/warm_pulls.py

Only loopback is used. Prints a markdown table.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from podman import podman_cleanup, podman_pull, podman_rmi, push_tar_image
from upstream_registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    PushedImage,
    RegistryProcess,
    free_loopback_port,
    skopeo_copy,
)

IMAGE = "library/app"
TAG = "1"
CONTAINERD_ACCEPT = ", ".join([DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX, "*/*"])


def start_mirror(
    work: Path, upstream: RegistryProcess, tag_ttl: str
) -> tuple[subprocess.Popen[bytes], str]:
    config = work / f"mirror-{tag_ttl}.yaml"
    config.write_text(
        f"storage: {{path: {work / ('cache-' + tag_ttl)}}}\n"
        "upstreams:\n"
        f"  - {{name: hub, url: '{upstream.url}', hosts: [docker.io], tag_ttl: {tag_ttl}}}\n"
    )
    host = f"127.0.0.1:{free_loopback_port()}"
    log = (work / f"mirror-{tag_ttl}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--config", str(config), "--listen", host],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            subprocess.run(["curl", "-sf", f"http://{host}/v2/"], check=True, capture_output=True)
            return proc, host
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("mirror did not start")


async def containerd(host: str, image: PushedImage) -> None:
    """HEAD the tag with ?ns=, GET the manifest by digest, then the blobs it lacks (all)."""
    base, ns = f"http://{host}/v2/{IMAGE}", "?ns=docker.io"
    async with aiohttp.ClientSession() as session:
        headers = {"Accept": CONTAINERD_ACCEPT}
        async with session.head(f"{base}/manifests/{TAG}{ns}", headers=headers) as r:
            digest = r.headers["Docker-Content-Digest"]
        async with session.get(f"{base}/manifests/{digest}{ns}", headers=headers) as r:
            await r.read()
        for blob in image.blob_digests():
            async with session.get(f"{base}/blobs/{blob}{ns}") as r:
                await r.read()


async def dockerd(host: str, image: PushedImage) -> None:
    """Ping, HEAD the tag (the image is present), GET it, then the blobs (all, as on a new host)."""
    base = f"http://{host}/v2/{IMAGE}"
    async with aiohttp.ClientSession() as session:
        headers = {"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"}
        async with session.get(f"http://{host}/v2/") as r:
            await r.read()
        async with session.head(f"{base}/manifests/{TAG}", headers=headers) as r:
            pass
        async with session.get(f"{base}/manifests/{TAG}", headers=headers) as r:
            await r.read()
        for blob in image.blob_digests():
            async with session.get(f"{base}/blobs/{blob}") as r:
                await r.read()


async def measure(
    work: Path, upstream: RegistryProcess, image: PushedImage, tag_ttl: str
) -> dict[str, list[str]]:
    proc, host = start_mirror(work, upstream, tag_ttl)
    podman_work = work / f"podman-{tag_ttl}"
    clients: dict[str, Callable[[], Awaitable[object]]] = {
        "skopeo": lambda: asyncio.to_thread(
            skopeo_copy, f"{host}/{IMAGE}:{TAG}", Path(tempfile.mkdtemp(dir=work))
        ),
        "podman": lambda: asyncio.to_thread(
            podman_pull, f"docker.io/{IMAGE}:{TAG}", host, podman_work
        ),
        "containerd": lambda: containerd(host, image),
        "dockerd": lambda: dockerd(host, image),
    }
    seen: dict[str, list[str]] = {}
    try:
        await clients["skopeo"]()  # the cold pull that warms the cache
        for name, pull in clients.items():
            if name == "podman":
                await pull()
                await asyncio.to_thread(podman_rmi, f"docker.io/{IMAGE}:{TAG}", podman_work)
            await upstream.settle()
            upstream.reset_counts()
            await pull()
            await upstream.settle()
            seen[name] = [f"{r.method} {r.path.split('/')[-2]}" for r in upstream.requests()]
    finally:
        proc.terminate()
        proc.wait()
        podman_cleanup(podman_work)
    return seen


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="warm-pulls-") as tmp:
        work = Path(tmp)
        with RegistryProcess(work / "upstream") as upstream:
            image = await push_tar_image(upstream.url, IMAGE, TAG, (64 * 1024, 64 * 1024))
            fresh = await measure(work, upstream, image, "5m")
            expired = await measure(work, upstream, image, "0s")
    print("| client | warm pull, tag inside tag_ttl | warm pull, tag_ttl passed |")
    print("|---|---|---|")
    for client in fresh:
        cells = [f"{len(seen[client])} {seen[client]}" for seen in (fresh, expired)]
        print(f"| {client} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    asyncio.run(main())
