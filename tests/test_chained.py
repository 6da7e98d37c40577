"""Chained mirrors: a node mirror whose one upstream is a regional mirror (`type: mirror`),
in front of two real docker-registry processes, A and B.

Both registries hold `team/app:1`, with different content. The regional mirror lists
each registry's host (`127.0.0.1:PORT`; A also as `registry-a.test`, B also under the
prefix `b`); the node knows only the regional one, and forwards the registry it learns
from containerd's `ns` (or from a name beginning with a registry host) in `ns`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from containerd import NAMESPACE, ContainerdProcess
from multidict import CIMultiDict
from podman import podman_rmi, push_tar_image, run_podman
from upstream_registry import (
    OCI_MANIFEST,
    RegistryProcess,
    free_loopback_port,
    push_image,
)

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

KIB = 1024
ALIAS_A = "registry-a.test"  # another name of registry A at the regional mirror


@pytest.fixture
def second(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path / "second-upstream") as reg:
        yield reg


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[ContainerdProcess]:
    with ContainerdProcess(tmp_path / "containerd") as process:
        yield process


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Chain:
    regional: MirrorProcess
    node: MirrorProcess


async def start_chain(
    start: StartMirrorProcess, a: RegistryProcess, b: RegistryProcess, work: Path, node_ttl: str
) -> Chain:
    regional = work / "regional.yaml"
    regional.write_text(
        f"storage: {{path: {work / 'regional-cache'}}}\n"
        "log: {format: json}\n"
        "upstreams:\n"
        f"  - {{name: a, url: '{a.url}', hosts: ['{a.host}', {ALIAS_A}], default: true}}\n"
        f"  - {{name: b, url: '{b.url}', prefix: b}}\n"
    )
    regional_mirror = await asyncio.to_thread(start, "--config", str(regional))
    node = work / "node.yaml"
    node.write_text(
        f"storage: {{path: {work / 'node-cache'}}}\n"
        "log: {format: json}\n"
        "upstreams:\n"
        f"  - {{name: regional, url: '{regional_mirror.url}', type: mirror, tag_ttl: {node_ttl}}}\n"
    )
    node_mirror = await asyncio.to_thread(start, "--config", str(node))
    return Chain(regional_mirror, node_mirror)


class Hops:
    """Requests each hop received since `mark()`: the mirrors' access lines (JSON), the
    registries' access log."""

    def __init__(self, chain: Chain, a: RegistryProcess, b: RegistryProcess) -> None:
        self.mirrors = {"node": chain.node, "regional": chain.regional}
        self.registries = {"A": a, "B": b}
        self._offsets: dict[str, int] = {}

    async def settle(self) -> None:
        """Until no log grew for 0.3 s (at most 5 s): access lines follow their answers."""
        paths = [m.log_path for m in self.mirrors.values()]
        paths += [r.log_path for r in self.registries.values()]
        deadline = time.monotonic() + 5
        sizes: list[int] = []
        while time.monotonic() < deadline:
            now = [p.stat().st_size for p in paths]
            if now == sizes:
                return
            sizes = now
            await asyncio.sleep(0.3)

    async def mark(self) -> None:
        await self.settle()
        for name, mirror in self.mirrors.items():
            self._offsets[name] = mirror.log_path.stat().st_size
        for registry in self.registries.values():
            registry.reset_counts()

    def mirror(self, name: str) -> list[dict[str, Any]]:
        with self.mirrors[name].log_path.open("rb") as log:
            log.seek(self._offsets[name])
            lines = log.read().decode().splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in entries if e["logger"] == "mirror.access"]

    def counts(self) -> dict[str, int]:
        counts = {name: len(self.mirror(name)) for name in self.mirrors}
        return counts | {name: len(r.requests()) for name, r in self.registries.items()}


def write_hosts_toml(hosts_dir: Path, registry: str, mirror: MirrorProcess) -> None:
    """certs.d/<registry>/hosts.toml: the node mirror first; the registry itself at a dead
    port, so a pull the mirrors failed fails instead of going around them."""
    (hosts_dir / registry).mkdir(parents=True)
    (hosts_dir / registry / "hosts.toml").write_text(
        f'server = "http://127.0.0.1:{free_loopback_port()}"\n'
        f'[host."{mirror.url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


def registries_conf(mirror: MirrorProcess, a: RegistryProcess, b: RegistryProcess) -> str:
    """podman sends no ns: A's mirror location names its host at the regional mirror as
    the first path component, B's the prefix the regional mirror routes to B."""
    entries = [(a.host, f"{mirror.host}/{ALIAS_A}"), (b.host, f"{mirror.host}/b")]
    return "".join(
        f'[[registry]]\nlocation = "{registry}"\n'
        f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n'
        for registry, location in entries
    )


def ctr(containerd: ContainerdProcess, *args: str) -> str:
    command = [containerd.ctr, "--address", str(containerd.address), "--namespace", NAMESPACE]
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def ctr_digests(containerd: ContainerdProcess) -> dict[str, str]:
    """`ctr images ls`: each image's reference and manifest digest."""
    lines = ctr(containerd, "images", "ls").splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in lines}


async def podman(work: Path, conf: str, *args: str) -> None:
    result = await asyncio.to_thread(run_podman, work, *args, registries_conf=conf)
    assert result.escapes == (), result.describe()


async def podman_digest(work: Path, image: str) -> str:
    result = await asyncio.to_thread(
        run_podman, work, "image", "inspect", "--format", "{{.Digest}}", image
    )
    return result.stdout.strip()


async def test_containerd_and_podman_pull_through_a_node_and_a_regional_mirror(
    registry: RegistryProcess,
    second: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    containerd: ContainerdProcess,
    podman_work: Path,
    tmp_path: Path,
) -> None:
    a, b = registry, second
    on_a = await push_tar_image(a.url, "team/app", "1")
    on_b = await push_tar_image(b.url, "team/app", "1")
    assert on_a.manifest_digest != on_b.manifest_digest
    chain = await start_chain(start_mirror_process, a, b, tmp_path, node_ttl="5m")
    hosts_dir = tmp_path / "certs.d"
    for upstream in (a, b):
        write_hosts_toml(hosts_dir, upstream.host, chain.node)
    conf = registries_conf(chain.node, a, b)
    images = {f"{a.host}/team/app:1": on_a, f"{b.host}/team/app:1": on_b}
    hops = Hops(chain, a, b)
    report: dict[str, dict[str, int]] = {}

    # Cold, containerd: each image from its own registry, two hops away, ns forwarded.
    await hops.mark()
    for image in images:
        await containerd.pull_async(image, hosts_dir)
    assert ctr_digests(containerd) == {i: p.manifest_digest for i, p in images.items()}
    await hops.settle()
    report["containerd cold"] = hops.counts()
    for entry in hops.mirror("regional"):  # as the registry knows the name, the host in ns
        assert entry["path"].startswith("/v2/team/app/"), entry
        assert entry["query"] in (f"ns={a.host}", f"ns={b.host}"), entry
    for upstream, pushed in ((a, on_a), (b, on_b)):
        assert upstream.blob_gets() == len(pushed.blob_digests())  # each blob once

    # Cold, podman (no ns): blobs come from the node's cache; the node asks the regional
    # mirror for the tags (named otherwise on the node), which it has.
    await hops.mark()
    for image, pushed in images.items():
        await podman(podman_work, conf, "pull", image)
        assert await podman_digest(podman_work, image) == pushed.manifest_digest
    await hops.settle()
    report["podman cold"] = hops.counts()
    regional = {(e["method"], e["path"], e["query"]) for e in hops.mirror("regional")}
    assert regional == {
        ("GET", "/v2/team/app/manifests/1", f"ns={ALIAS_A}"),
        ("GET", "/v2/b/team/app/manifests/1", ""),
    }
    assert (report["podman cold"]["A"], report["podman cold"]["B"]) == (0, 0)

    # Warm: both clients pull everything again, and the node answers all of it.
    for image in images:
        ctr(containerd, "images", "rm", "--sync", image)
        await asyncio.to_thread(podman_rmi, image, podman_work)
    await hops.mark()
    for image, pushed in images.items():
        await containerd.pull_async(image, hosts_dir)
        await podman(podman_work, conf, "pull", image)
        assert await podman_digest(podman_work, image) == pushed.manifest_digest
    assert ctr_digests(containerd) == {i: p.manifest_digest for i, p in images.items()}
    await hops.settle()
    report["warm"] = hops.counts()
    print(json.dumps(report))
    warm = report["warm"]
    assert (warm["regional"], warm["A"], warm["B"]) == (0, 0, 0), report
    assert warm["node"] > 0
    assert {e["cache"] for e in hops.mirror("node") if "/blobs/" in e["path"]} == {"hit"}


async def test_every_kind_of_request_reaches_the_right_registry_through_the_chain(
    registry: RegistryProcess,
    second: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
) -> None:
    """Manifests (GET, and HEAD when a tag is revalidated), blobs (HEAD), tags/list and
    referrers: the node sends each to the regional mirror with the registry in ns."""
    a, b = registry, second
    on_a = await push_image(a.url, "team/app", "1", [KIB])
    await push_image(a.url, "team/app", "only-a", [KIB])
    on_b = await push_image(b.url, "team/app", "1", [KIB])
    await push_image(b.url, "team/app", "only-b", [KIB])
    chain = await start_chain(start_mirror_process, a, b, tmp_path, node_ttl="0s")
    assert "for every registry host no other upstream lists" in chain.node.log()
    node = chain.node.url
    hops = Hops(chain, a, b)
    await hops.mark()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def ask(path: str, host: str, method: str = "GET") -> Answer:
            url = f"{node}/v2/team/app/{path}"
            headers = {"Accept": OCI_MANIFEST}
            async with session.request(method, url, params={"ns": host}, headers=headers) as r:
                return Answer(r.status, r.headers.copy(), await r.read())

        for upstream, pushed, own_tag in ((a, on_a, "only-a"), (b, on_b, "only-b")):
            for _ in range(2):  # the second revalidates (tag_ttl 0s): a HEAD
                answer = await ask("manifests/1", upstream.host)
                assert answer.headers["Docker-Content-Digest"] == pushed.manifest_digest
            answer = await ask("tags/list", upstream.host)
            assert json.loads(answer.body)["tags"] == ["1", own_tag]
            layer = pushed.layer_digests[0]
            answer = await ask(f"blobs/{layer}", upstream.host, "HEAD")
            assert answer.status == 200
            assert answer.headers["Content-Length"] == str(pushed.layer_sizes[0])
            answer = await ask(f"referrers/{pushed.manifest_digest}", upstream.host)
            assert (answer.status, json.loads(answer.body)["manifests"]) == (200, [])
        answer = await ask(f"blobs/{on_a.layer_digests[0]}", b.host, "HEAD")
        assert answer.status == 404  # A's layer is asked of B, which has none

    await hops.settle()
    # (method, what: manifests, blobs, tags or referrers, query)
    at_regional = {
        (e["method"], e["path"].split("/")[4], e["query"]) for e in hops.mirror("regional")
    }
    for host in (a.host, b.host):
        ns = f"ns={host}"
        assert {("GET", "manifests", ns), ("HEAD", "manifests", ns), ("GET", "tags", ns),
                ("HEAD", "blobs", ns), ("GET", "referrers", ns)} <= at_regional  # fmt: skip
    assert all(e["path"].startswith("/v2/team/app/") for e in hops.mirror("regional"))
    # The referrers fallback tag of each manifest was asked of its own registry only.
    for upstream, pushed, other_registry in ((a, on_a, b), (b, on_b, a)):
        fallback = "manifests/sha256-" + pushed.manifest_digest.removeprefix("sha256:")
        assert upstream.count("GET", fallback) + upstream.count("HEAD", fallback) >= 1
        assert other_registry.count("GET", fallback) + other_registry.count("HEAD", fallback) == 0
