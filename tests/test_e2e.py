"""End to end: a real docker-registry upstream, the mirror (in-process or `mirror serve`),
and real skopeo pulling through it.

Upstream traffic is counted on the upstream side, from the registry's own access log.
"""

from __future__ import annotations

import asyncio
import json
import platform
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from pytest_aiohttp import AiohttpClient, AiohttpServer
from upstream_registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Flavour,
    PushedImage,
    RegistryProcess,
    dir_digests,
    push_image,
    push_index,
    sha256_digest,
    skopeo_copy_async,
    skopeo_inspect,
)

from mirror.app import make_app
from mirror.config import Config, StorageConfig, UpstreamConfig

if TYPE_CHECKING:
    from conftest import MirrorClient, MirrorProcess

    MakeMirror = Callable[..., Awaitable[MirrorClient]]
    StartMirrorProcess = Callable[..., MirrorProcess]

KIB = 1024
MISSING = "sha256:" + "0" * 64

# skopeo 1.9 sends six separate Accept lines; containerd one comma-joined line ending in */*.
SKOPEO_ACCEPT = [
    ("Accept", OCI_MANIFEST),
    ("Accept", DOCKER_MANIFEST),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+json"),
    ("Accept", DOCKER_MANIFEST_LIST),
    ("Accept", OCI_INDEX),
]
CONTAINERD_ACCEPT = [
    ("Accept", ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"]))
]
MANIFEST_HEADERS = ("Content-Type", "Docker-Content-Digest", "Content-Length")


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def picked(self, names: Iterable[str] = MANIFEST_HEADERS) -> dict[str, str | None]:
        return {name: self.headers.get(name) for name in names}


async def call(method: str, url: str, headers: Iterable[tuple[str, str]] = ()) -> Answer:
    """One plain HTTP request; `headers` may repeat a name (several Accept lines)."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, url, headers=CIMultiDict(headers)) as resp,
    ):
        return Answer(resp.status, resp.headers, await resp.read())


def base_url(client: MirrorClient) -> str:
    port = client.server.port
    assert port is not None
    return f"http://127.0.0.1:{port}"


def assert_oci_error(answer: Answer, statuses: set[int], code: str | None = None) -> None:
    assert answer.status in statuses, (answer.status, answer.body[:500])
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer.headers
    errors = answer.json()["errors"]
    assert isinstance(errors, list) and errors, answer.body
    assert all(isinstance(e.get("code"), str) and e["code"] for e in errors), answer.body
    if code is not None:
        assert errors[0]["code"] == code, answer.body


async def push_kind(registry: RegistryProcess, kind: str, name: str) -> PushedImage:
    """An OCI image, a Docker v2 image, or a two-platform OCI index; small layers."""
    if kind == "index":
        return await push_index(registry.url, name, "v1", layer_size=48 * KIB)
    flavour: Flavour = "docker" if kind == "docker" else "oci"
    return await push_image(registry.url, name, "v1", [64 * KIB, 300 * KIB], media_type=flavour)


def expected_files(image: PushedImage) -> set[str]:
    """What skopeo's `dir:` layout holds after a pull: every manifest and every blob."""
    return image.manifest_digests() | image.blob_digests()


async def put_manifest(base: str, name: str, reference: str, body: bytes, media_type: str) -> str:
    """Push manifest bytes under a tag (or digest) with the registry HTTP API."""
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"{base}/v2/{name}/manifests/{reference}",
            data=body,
            headers={"Content-Type": media_type},
        ) as resp,
    ):
        assert resp.status == 201, (resp.status, await resp.text())
        digest = resp.headers["Docker-Content-Digest"]
    assert digest == sha256_digest(body)
    return digest


async def serve(start_mirror_process: StartMirrorProcess, *args: str) -> MirrorProcess:
    """`mirror serve ARGS` in a subprocess (its readiness wait blocks, so off the loop)."""
    return await asyncio.to_thread(start_mirror_process, *args)


# --------------------------------------------------------------------------- 1. skopeo


@pytest.mark.parametrize("kind", ["oci", "docker", "index"])
async def test_skopeo_pulls_through_mirror_serve_twice(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
    kind: str,
) -> None:
    image = await push_kind(registry, kind, f"e2e/{kind}")
    mirror = await serve(
        start_mirror_process, "--storage", str(tmp_path / "cache"), "--upstream", registry.url
    )
    await registry.settle()
    registry.reset_counts()

    first, second = tmp_path / "first", tmp_path / "second"
    source = f"{mirror.host}/{image.reference}"
    await skopeo_copy_async(source, first, all_images=kind == "index")
    assert dir_digests(first) == expected_files(image)
    await registry.settle()
    # One upstream GET per blob, however the pull went.
    assert registry.blob_gets(image.name) == len(image.blob_digests())

    registry.reset_counts()
    await skopeo_copy_async(source, second, all_images=kind == "index")
    assert dir_digests(second) == expected_files(image)
    await registry.settle()
    assert registry.blob_gets() == 0
    # The tag is within the default tag_ttl (300 s): not even a HEAD upstream.
    assert registry.requests() == [], mirror.log()


# --------------------------------------------------------------------------- 2. upstream down


async def test_upstream_down_serves_warm_pulls_and_fails_cold_ones(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
) -> None:
    warm = await push_image(registry.url, "e2e/warm", "v1", [100 * KIB, 20 * KIB])
    cold = await push_image(registry.url, "e2e/cold", "v1", [50 * KIB])
    config = tmp_path / "mirror.yaml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "storage": {"path": str(tmp_path / "cache"), "max_size": "1GiB"},
                "upstreams": [
                    {"name": "local", "url": registry.url, "default": True, "tag_ttl": "0s"}
                ],
            }
        )
    )
    mirror = await serve(start_mirror_process, "--config", str(config))
    await skopeo_copy_async(f"{mirror.host}/{warm.reference}", tmp_path / "warm")
    tags_before = await call("GET", f"{mirror.url}/v2/{warm.name}/tags/list")
    assert tags_before.json() == {"name": warm.name, "tags": ["v1"]}
    await asyncio.to_thread(registry.stop)

    # tag_ttl 0: the tag must be revalidated, that fails, and the cached copy is served.
    by_tag = tmp_path / "by-tag"
    await skopeo_copy_async(f"{mirror.host}/{warm.reference}", by_tag)
    assert dir_digests(by_tag) == expected_files(warm)
    by_digest = tmp_path / "by-digest"
    await skopeo_copy_async(f"{mirror.host}/{warm.name}@{warm.manifest_digest}", by_digest)
    assert dir_digests(by_digest) == expected_files(warm)
    for method in ("HEAD", "GET"):  # dockerd HEADs the tag first
        stale = await call(method, f"{mirror.url}/v2/{warm.name}/manifests/v1", SKOPEO_ACCEPT)
        assert stale.status == 200, method
        assert stale.headers["Docker-Content-Digest"] == warm.manifest_digest
        assert stale.headers["Content-Length"] == str(len(warm.manifest_bytes))
    assert stale.body == warm.manifest_bytes
    tags = await call("GET", f"{mirror.url}/v2/{warm.name}/tags/list")
    assert (tags.status, tags.body) == (200, tags_before.body)

    # Never pulled: nothing to serve, and the answer says "upstream failed", not "unknown".
    with pytest.raises(AssertionError, match="skopeo copy"):
        await skopeo_copy_async(f"{mirror.host}/{cold.reference}", tmp_path / "cold")
    paths = [
        f"/v2/{cold.name}/manifests/v1",
        f"/v2/{cold.name}/manifests/{cold.manifest_digest}",
        f"/v2/{cold.name}/blobs/{cold.layer_digests[0]}",
        f"/v2/{cold.name}/blobs/{cold.config_digest}",
    ]
    for path in paths:
        answer = await call("GET", mirror.url + path, SKOPEO_ACCEPT)
        assert_oci_error(answer, {502, 504})
        head = await call("HEAD", mirror.url + path, SKOPEO_ACCEPT)
        assert head.status in {502, 504}, path

    # Nothing negative was remembered: with the upstream back, the cold image pulls.
    await asyncio.to_thread(registry.start)
    await skopeo_copy_async(f"{mirror.host}/{cold.reference}", tmp_path / "cold-later")
    assert dir_digests(tmp_path / "cold-later") == expected_files(cold)


# --------------------------------------------------------------------------- 3. restart


@pytest.mark.parametrize("shutdown", ["sigterm", "sigkill"])
async def test_restart_on_same_storage_serves_from_disk(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
    shutdown: str,
) -> None:
    image = await push_image(registry.url, "e2e/restart", "v1", [80 * KIB, 200 * KIB])
    index = await push_index(registry.url, "e2e/restart-multi", "v1", layer_size=32 * KIB)
    args = ("--storage", str(tmp_path / "cache"), "--upstream", registry.url)
    pulls = [
        (image, image.reference, False),
        (image, f"{image.name}@{image.manifest_digest}", False),
        (index, index.reference, True),
        (index, f"{index.name}@{index.manifest_digest}", True),
    ]

    first = await serve(start_mirror_process, *args)
    for n, (_, ref, all_images) in enumerate(pulls):
        await skopeo_copy_async(f"{first.host}/{ref}", tmp_path / f"a{n}", all_images=all_images)
    if shutdown == "sigkill":  # a crash: whatever was answered must already be durable
        first.proc.kill()
        await asyncio.to_thread(first.proc.wait)
    await asyncio.to_thread(first.stop)

    # Upstream running: a new mirror on the same cache asks it nothing at all.
    await registry.settle()
    registry.reset_counts()
    second = await serve(start_mirror_process, *args)
    for n, (pushed, ref, all_images) in enumerate(pulls):
        dest = tmp_path / f"b{n}"
        await skopeo_copy_async(f"{second.host}/{ref}", dest, all_images=all_images)
        assert dir_digests(dest) == expected_files(pushed)
    await asyncio.to_thread(second.stop)
    await registry.settle()
    assert registry.requests() == [], second.log()

    # Upstream stopped: by digest and by tag (within tag_ttl) still pull.
    await asyncio.to_thread(registry.stop)
    third = await serve(start_mirror_process, *args)
    for n, (pushed, ref, all_images) in enumerate(pulls):
        dest = tmp_path / f"c{n}"
        await skopeo_copy_async(f"{third.host}/{ref}", dest, all_images=all_images)
        assert dir_digests(dest) == expected_files(pushed)


# --------------------------------------------------------------------------- 4. manifest answers


async def test_manifest_answers_match_upstream_exactly(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    images = [await push_kind(registry, kind, f"e2e/answers-{kind}") for kind in ("oci", "docker")]
    images.append(await push_kind(registry, "index", "e2e/answers-index"))
    mirror = base_url(await make_mirror(registry.url))

    for n, image in enumerate(images):
        # Cold by tag for some images, cold by digest for the others.
        refs = ["v1", image.manifest_digest]
        for ref in refs if n % 2 else refs[::-1]:
            path = f"/v2/{image.name}/manifests/{ref}"
            for accept in (SKOPEO_ACCEPT, CONTAINERD_ACCEPT):
                # HEAD first: on a cold cache the mirror's first answer is a HEAD's.
                for method in ("HEAD", "GET"):
                    direct = await call(method, registry.url + path, accept)
                    mirrored = await call(method, mirror + path, accept)
                    what = (image.name, ref, method, accept[0][1][:40])
                    assert direct.status == mirrored.status == 200, what
                    assert mirrored.picked() == direct.picked(), what
                    assert mirrored.body == direct.body, what
                    assert mirrored.headers["Docker-Content-Digest"] == image.manifest_digest
                    assert mirrored.headers["Content-Type"] == image.media_type
                    assert mirrored.headers["Content-Length"] == str(len(image.manifest_bytes))
                    api_version = mirrored.headers["Docker-Distribution-Api-Version"]
                    assert api_version == "registry/2.0"
                    if method == "GET":
                        assert mirrored.body == image.manifest_bytes, what


async def test_containerd_first_head_with_ns_query(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    image = await push_image(registry.url, "library/alpine", "latest", [40 * KIB])
    # The upstream plays Docker Hub: it answers for docker.io.
    mirror = base_url(await make_mirror(registry.url, hosts=("docker.io",)))
    ns = "?ns=docker.io"

    # containerd's very first request on a cold mirror: HEAD by tag with ?ns=.
    head = await call("HEAD", f"{mirror}/v2/library/alpine/manifests/latest{ns}", CONTAINERD_ACCEPT)
    direct = await call(
        "HEAD", f"{registry.url}/v2/library/alpine/manifests/latest", CONTAINERD_ACCEPT
    )
    assert head.status == 200, head.body
    assert head.picked() == direct.picked()
    assert head.headers["Docker-Content-Digest"] == image.manifest_digest
    assert head.headers["OCI-Namespace"] == "docker.io"
    assert head.body == b""

    path = f"/v2/library/alpine/manifests/{image.manifest_digest}{ns}"
    got = await call("GET", mirror + path, CONTAINERD_ACCEPT)
    assert got.status == 200
    assert got.body == image.manifest_bytes
    assert got.headers["Content-Type"] == OCI_MANIFEST

    for digest in image.blob_digests():
        blob = await call(
            "GET", f"{mirror}/v2/library/alpine/blobs/{digest}{ns}", [("Accept", "*/*")]
        )
        assert blob.status == 200
        assert sha256_digest(blob.body) == digest


async def test_cold_manifest_by_digest_with_generic_accept(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    """A digest names one content: the mirror fetches it whatever the client accepts.

    (distribution itself refuses an OCI manifest to `Accept: */*`; the first asker's
    narrow Accept must not decide what a shared fetch gets for everyone.)
    """
    image = await push_index(registry.url, "e2e/generic", "v1", layer_size=4 * KIB)
    mirror = base_url(await make_mirror(registry.url))
    for digest, body in [(image.manifest_digest, image.manifest_bytes)] + [
        (child.manifest_digest, child.manifest_bytes) for child in image.children
    ]:
        answer = await call(
            "GET", f"{mirror}/v2/{image.name}/manifests/{digest}", [("Accept", "*/*")]
        )
        assert (answer.status, answer.body) == (200, body), answer.body[:300]
        assert answer.headers["Docker-Content-Digest"] == digest


# --------------------------------------------------------------------------- 5. tag revalidation


async def test_tag_revalidated_with_head_when_ttl_expired(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    old = await push_image(registry.url, "e2e/moving", "latest", [16 * KIB])
    mirror = base_url(await make_mirror(registry.url, tag_ttl=0))
    url = f"{mirror}/v2/e2e/moving/manifests/latest"

    first = await call("GET", url, SKOPEO_ACCEPT)
    assert (first.status, first.body) == (200, old.manifest_bytes)

    await registry.settle()
    registry.reset_counts()
    again = await call("GET", url, SKOPEO_ACCEPT)
    assert (again.status, again.body) == (200, old.manifest_bytes)
    await registry.settle()
    assert registry.count("HEAD", "/v2/e2e/moving/manifests/latest") == 1
    assert registry.count("GET", "/manifests/") == 0
    assert len(registry.requests()) == 1, registry.requests()

    new = await push_image(registry.url, "e2e/moving", "latest", [16 * KIB])
    assert new.manifest_digest != old.manifest_digest
    await registry.settle()
    registry.reset_counts()
    moved = await call("GET", url, SKOPEO_ACCEPT)
    assert (moved.status, moved.body) == (200, new.manifest_bytes)
    assert moved.headers["Docker-Content-Digest"] == new.manifest_digest
    await registry.settle()
    assert registry.count("HEAD", "/manifests/") == 1
    assert registry.count("GET", "/manifests/") == 1

    # The old manifest stays available by digest, from the cache.
    registry.reset_counts()
    by_digest = await call("GET", f"{mirror}/v2/e2e/moving/manifests/{old.manifest_digest}")
    assert (by_digest.status, by_digest.body) == (200, old.manifest_bytes)
    await registry.settle()
    assert registry.requests() == []


async def test_tag_within_ttl_makes_no_upstream_request(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    old = await push_image(registry.url, "e2e/fresh", "latest", [16 * KIB])
    mirror = base_url(await make_mirror(registry.url))  # default tag_ttl: 300 s
    url = f"{mirror}/v2/e2e/fresh/manifests/latest"
    assert (await call("GET", url, SKOPEO_ACCEPT)).body == old.manifest_bytes

    await push_image(registry.url, "e2e/fresh", "latest", [16 * KIB])
    await registry.settle()
    registry.reset_counts()
    for method in ("GET", "HEAD"):
        answer = await call(method, url, SKOPEO_ACCEPT)
        assert answer.status == 200
        assert answer.headers["Docker-Content-Digest"] == old.manifest_digest
    await registry.settle()
    assert registry.requests() == []


# --------------------------------------------------------------------------- 6. tags/list


async def test_tags_list_is_paged_by_the_mirror(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    image = await push_image(registry.url, "e2e/tagged", "a", [8 * KIB])
    for tag in ("d", "B", "c", "a10", "a2"):
        await put_manifest(registry.url, image.name, tag, image.manifest_bytes, image.media_type)
    mirror = base_url(await make_mirror(registry.url))
    every = ["B", "a", "a10", "a2", "c", "d"]  # lexical: by code point

    # distribution 2.8.2 ignores n and last (and sends no Link): the mirror pages itself.
    for query, tags, link in [
        ("", every, None),
        ("?n=2", every[:2], "?n=2&last=a"),
        ("?n=2&last=a", every[2:4], "?n=2&last=a2"),
        ("?n=2&last=a2", every[4:], None),
        ("?n=3&last=a1", every[2:5], "?n=3&last=c"),  # `last` need not be a tag
        ("?last=c", ["d"], None),
        ("?n=0", [], None),
        ("?n=6", every, None),
    ]:
        answer = await call("GET", f"{mirror}/v2/e2e/tagged/tags/list{query}")
        assert answer.status == 200, (query, answer.body)
        assert answer.json() == {"name": "e2e/tagged", "tags": tags}, query
        expected = f'</v2/e2e/tagged/tags/list{link}>; rel="next"' if link else None
        assert answer.headers.get("Link") == expected, query
        assert answer.headers["Content-Type"].startswith("application/json")
    bad = await call("GET", f"{mirror}/v2/e2e/tagged/tags/list?n=-1")
    assert_oci_error(bad, {400}, "PAGINATION_NUMBER_INVALID")

    unknown = await call("GET", f"{mirror}/v2/e2e/no-such-repo/tags/list")
    assert_oci_error(unknown, {404}, "NAME_UNKNOWN")


async def test_tags_list_pagination_and_link_pass_through(
    make_mirror: MakeMirror,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    """A paginating upstream (as the OCI spec describes; distribution 2.8 does not paginate).

    The `Link` the client gets names the path it asked (prefix and ns included), never
    the upstream's own: following it must reach the same upstream through the mirror.
    """
    all_tags = [f"t{i}" for i in range(7)]

    async def tags_list(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name != "paged":
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        last = request.query.get("last")
        rest = [t for t in all_tags if last is None or t > last]
        n = int(request.query.get("n", len(rest)))
        page, more = rest[:n], len(rest) > n
        headers = {}
        if more and page:
            headers["Link"] = f'</v2/{name}/tags/list?n={n}&last={page[-1]}>; rel="next"'
        return web.json_response({"name": name, "tags": page}, headers=headers)

    app = web.Application()
    app.router.add_get("/v2/{name}/tags/list", tags_list)
    upstream = await aiohttp_server(app)
    upstream_url = str(upstream.make_url("")).rstrip("/")
    mirror = base_url(await make_mirror(upstream_url))
    config = Config(
        storage=StorageConfig(path=tmp_path / "routed"),
        upstreams=(
            UpstreamConfig(
                name="hub", url="http://127.0.0.1:9", hosts=("docker.io",), default=True
            ),
            UpstreamConfig(name="paged", url=upstream_url, hosts=("paged.example",), prefix="p"),
        ),
    )
    routed = base_url(await aiohttp_client(make_app(config)))

    for start in (
        f"{mirror}/v2/paged/tags/list?n=3",
        f"{routed}/v2/p/paged/tags/list?n=3",
        f"{routed}/v2/paged/tags/list?n=3&ns=paged.example",
    ):
        base = start[: start.index("/v2/")]
        collected: list[str] = []
        path: str | None = start[len(base) :]
        pages = 0
        while path is not None:
            answer = await call("GET", base + path)
            assert answer.status == 200, answer.body
            collected += answer.json()["tags"]
            pages += 1
            link = answer.headers.get("Link")
            path = link[link.index("<") + 1 : link.index(">")] if link else None
        assert collected == all_tags, start
        assert pages == 3

    second = await call("GET", f"{mirror}/v2/paged/tags/list?n=3&last=t2")
    assert second.json()["tags"] == ["t3", "t4", "t5"]
    assert second.headers["Link"] == '</v2/paged/tags/list?n=3&last=t5>; rel="next"'
    prefixed = await call("GET", f"{routed}/v2/p/paged/tags/list?n=3&last=t2")
    assert prefixed.headers["Link"] == '</v2/p/paged/tags/list?n=3&last=t5>; rel="next"'
    assert_oci_error(await call("GET", f"{mirror}/v2/nope/tags/list"), {404}, "NAME_UNKNOWN")


# --------------------------------------------------------------------------- 7. referrers


async def test_referrers_fall_back_to_tag_schema(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    subject = await push_image(registry.url, "e2e/signed", "v1", [8 * KIB])
    mirror = base_url(await make_mirror(registry.url, tag_ttl=0))
    url = f"{mirror}/v2/e2e/signed/referrers/{subject.manifest_digest}"

    empty = await call("GET", url)
    assert empty.status == 200, empty.body
    assert empty.headers["Content-Type"] == OCI_INDEX
    assert empty.json()["manifests"] == []
    assert empty.json()["mediaType"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in empty.headers

    # The referrers tag schema: an OCI index under the tag `sha256-<hex of the subject>`.
    signature = await push_image(registry.url, "e2e/signed", None, [1 * KIB])
    sbom = await push_image(registry.url, "e2e/signed", None, [2 * KIB])
    descriptors = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": artifact.manifest_digest,
            "size": len(artifact.manifest_bytes),
            "artifactType": artifact_type,
        }
        for artifact, artifact_type in (
            (signature, "application/vnd.example.signature"),
            (sbom, "application/vnd.example.sbom"),
        )
    ]
    fallback = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}, indent=2
    ).encode()
    tag = subject.manifest_digest.replace(":", "-")
    await put_manifest(registry.url, "e2e/signed", tag, fallback, OCI_INDEX)

    listed = await call("GET", url)
    assert listed.status == 200, listed.body
    assert listed.headers["Content-Type"] == OCI_INDEX
    assert listed.json()["manifests"] == descriptors

    filtered = await call("GET", url + "?artifactType=application/vnd.example.sbom")
    assert filtered.status == 200
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert filtered.json()["manifests"] == descriptors[1:]

    none = await call("GET", url + "?artifactType=x")
    assert none.status == 200
    assert none.headers["OCI-Filters-Applied"] == "artifactType"
    assert none.json()["manifests"] == []


@pytest.mark.parametrize("tag_ttl", [0, 300])
async def test_referrers_from_fallback_tag_served_stale_when_upstream_down(
    registry: RegistryProcess, make_mirror: MakeMirror, tag_ttl: float
) -> None:
    subject = await push_image(registry.url, "e2e/signed-down", "v1", [8 * KIB])
    signature = await push_image(registry.url, "e2e/signed-down", None, [1 * KIB])
    descriptors = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": signature.manifest_digest,
            "size": len(signature.manifest_bytes),
            "artifactType": "application/vnd.example.signature",
        }
    ]
    fallback = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
    tag = subject.manifest_digest.replace(":", "-")
    await put_manifest(registry.url, subject.name, tag, fallback.encode(), OCI_INDEX)
    mirror = base_url(await make_mirror(registry.url, tag_ttl=tag_ttl))
    url = f"{mirror}/v2/{subject.name}/referrers/{subject.manifest_digest}"
    assert (await call("GET", url)).json()["manifests"] == descriptors

    await asyncio.to_thread(registry.stop)
    stale = await call("GET", url)
    assert stale.status == 200, stale.body
    assert stale.json()["manifests"] == descriptors

    # Never asked before: no answer to give, and it is not "no referrers" either.
    other = await call("GET", f"{mirror}/v2/{subject.name}/referrers/{signature.manifest_digest}")
    assert_oci_error(other, {502, 504})


# --------------------------------------------------------------------------- 8. unknown, Range


async def test_unknown_manifest_and_blob_are_404(
    registry: RegistryProcess, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    image = await push_image(registry.url, "e2e/known", "v1", [8 * KIB])
    storage = tmp_path / "cache"
    mirror = base_url(await make_mirror(registry.url, storage=storage))
    name = image.name

    for ref in (MISSING, "no-such-tag"):
        answer = await call("GET", f"{mirror}/v2/{name}/manifests/{ref}", SKOPEO_ACCEPT)
        assert_oci_error(answer, {404}, "MANIFEST_UNKNOWN")
        assert (await call("HEAD", f"{mirror}/v2/{name}/manifests/{ref}")).status == 404
    for _ in range(2):  # a failed fetch leaves nothing behind that changes the answer
        answer = await call("GET", f"{mirror}/v2/{name}/blobs/{MISSING}")
        assert_oci_error(answer, {404}, "BLOB_UNKNOWN")
    assert (await call("HEAD", f"{mirror}/v2/{name}/blobs/{MISSING}")).status == 404
    assert list((storage / "tmp").iterdir()) == []  # no temp file left behind
    assert not (storage / "blobs" / "sha256" / "00" / MISSING.removeprefix("sha256:")).exists()

    # The image itself still answers.
    found = await call("GET", f"{mirror}/v2/{name}/manifests/v1", SKOPEO_ACCEPT)
    assert (found.status, found.body) == (200, image.manifest_bytes)


async def test_range_on_cached_blob(registry: RegistryProcess, make_mirror: MakeMirror) -> None:
    image = await push_image(registry.url, "e2e/ranged", "v1", [200 * KIB])
    digest, size = image.layer_digests[0], image.layer_sizes[0]
    mirror = base_url(await make_mirror(registry.url))
    url = f"{mirror}/v2/{image.name}/blobs/{digest}"

    whole = await call("GET", url)
    assert whole.status == 200
    assert sha256_digest(whole.body) == digest
    data = whole.body

    head = await call("HEAD", url)
    assert head.status == 200
    assert head.headers["Content-Length"] == str(size)
    assert head.headers["Docker-Content-Digest"] == digest

    await registry.settle()
    registry.reset_counts()
    cases = [
        ("bytes=1000-1999", 1000, 1999),
        ("bytes=0-0", 0, 0),
        (f"bytes={size - 100}-", size - 100, size - 1),
        ("bytes=-100", size - 100, size - 1),
        (f"bytes=5-{size + 10}", 5, size - 1),
    ]
    for header, start, end in cases:
        part = await call("GET", url, [("Range", header)])
        assert part.status == 206, (header, part.body[:200])
        assert part.headers["Content-Range"] == f"bytes {start}-{end}/{size}", header
        assert part.body == data[start : end + 1], header
        assert part.headers["Content-Length"] == str(end - start + 1), header

    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}"):
        refused = await call("GET", url, [("Range", header)])
        assert_oci_error(refused, {416})
        assert refused.headers.get("Content-Range") == f"bytes */{size}", header
    await registry.settle()
    assert registry.requests() == []


async def test_range_on_uncached_blob(registry: RegistryProcess, make_mirror: MakeMirror) -> None:
    image = await push_image(registry.url, "e2e/ranged-cold", "v1", [300 * KIB])
    digest, size = image.layer_digests[0], image.layer_sizes[0]
    mirror = base_url(await make_mirror(registry.url))
    url = f"{mirror}/v2/{image.name}/blobs/{digest}"
    data = (await call("GET", f"{registry.url}/v2/{image.name}/blobs/{digest}")).body
    await registry.settle()
    registry.reset_counts()

    head = await call("HEAD", url)  # cold: the size comes from the upstream
    assert head.status == 200
    assert head.headers["Content-Length"] == str(size)
    assert head.headers["Docker-Content-Digest"] == digest

    part = await call("GET", url, [("Range", "bytes=100000-100999")])
    assert part.status == 206, part.body[:200]
    assert part.headers["Content-Range"] == f"bytes 100000-100999/{size}"
    assert part.headers["Content-Length"] == "1000"
    assert part.body == data[100000:101000]

    # The range started the one full fetch: the whole blob follows without another.
    whole = await call("GET", url)
    assert (whole.status, whole.body) == (200, data)
    tail = await call("GET", url, [("Range", "bytes=-10")])
    assert (tail.status, tail.body) == (206, data[-10:])
    await registry.settle()
    assert registry.blob_gets() == 1


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_skopeo_pulls_fetch_each_blob_once(
    registry: RegistryProcess, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    image = await push_index(registry.url, "e2e/together", "v1", layer_size=2 * 1024 * KIB)
    mirror = await make_mirror(registry.url)
    source = f"127.0.0.1:{mirror.server.port}/{image.reference}"
    await registry.settle()
    registry.reset_counts()

    dests = [tmp_path / f"pull{n}" for n in range(3)]
    await asyncio.gather(
        *(skopeo_copy_async(source, d, all_images=True, timeout=30) for d in dests)
    )
    for dest in dests:
        assert dir_digests(dest) == expected_files(image)
    await registry.settle()
    for digest in image.blob_digests():
        assert registry.count("GET", f"/blobs/{digest}") == 1, digest


async def test_concurrent_manifest_by_digest_fetched_once(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    image = await push_image(registry.url, "e2e/herd", "v1", [4 * KIB])
    mirror = base_url(await make_mirror(registry.url))
    url = f"{mirror}/v2/{image.name}/manifests/{image.manifest_digest}"
    await registry.settle()
    registry.reset_counts()

    answers = await asyncio.gather(*(call("GET", url, SKOPEO_ACCEPT) for _ in range(8)))
    assert all(a.status == 200 and a.body == image.manifest_bytes for a in answers)
    await registry.settle()
    assert registry.count("GET", f"/manifests/{image.manifest_digest}") == 1


async def test_skopeo_inspect_and_single_platform_copy_of_an_index(
    registry: RegistryProcess, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    index = await push_index(registry.url, "e2e/multi", "v1", layer_size=24 * KIB)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
    native = next(c for c in index.children if c.platform == ("linux", arch))
    mirror = f"127.0.0.1:{(await make_mirror(registry.url)).server.port}"

    for ref in ("e2e/multi:v1", f"e2e/multi@{index.manifest_digest}"):
        raw = await asyncio.to_thread(skopeo_inspect, f"{mirror}/{ref}", raw=True)
        assert raw.encode() == index.manifest_bytes  # the index, byte for byte
        info = json.loads(await asyncio.to_thread(skopeo_inspect, f"{mirror}/{ref}"))
        assert info["Architecture"] == arch  # resolved to this machine's platform
        assert info["Layers"] == native.layer_digests

    # Without --all, skopeo copies the one platform it runs on: that image alone arrives.
    await skopeo_copy_async(f"{mirror}/e2e/multi:v1", tmp_path / "one")
    assert dir_digests(tmp_path / "one") == native.manifest_digests() | native.blob_digests()
