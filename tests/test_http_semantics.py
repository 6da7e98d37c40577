"""HTTP semantics of blob and manifest answers (RFC 9110): which `Range` is honoured,
`If-Range`, `If-None-Match`. A real docker-registry upstream, the mirror in-process.

A Range the mirror does not honour (another unit, several ranges, an `If-Range` that
does not match) gets a 200 with the whole blob, on a miss as on a hit; a client whose
`If-None-Match` names the ETag (the digest) gets a 304 without a body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from multidict import CIMultiDictProxy
from upstream_registry import OCI_MANIFEST, PushedImage, RegistryProcess, push_image

if TYPE_CHECKING:
    from conftest import MirrorClient

    MakeMirror = Callable[..., Awaitable[MirrorClient]]

KIB = 1024
MISSING = "sha256:" + "0" * 64
# Answered whole, never as a range: RFC 9110 §14.2 (a unit the server does not know is
# ignored; several ranges may be).
IGNORED_RANGES = ("items=0-9", "Bytes=0-1,5-9", "bytes=0-1, 3-4, 8-", "bytes=-1,0-0")
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


async def call(method: str, url: str, headers: Mapping[str, str] | None = None) -> Answer:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as session,
        session.request(method, url, headers=headers) as resp,
    ):
        return Answer(resp.status, resp.headers, await resp.read())


async def setup(
    registry: RegistryProcess, make_mirror: MakeMirror, name: str
) -> tuple[PushedImage, str, bytes]:
    """An image pushed upstream (one 64 KiB layer), the mirror's base URL, and the layer."""
    image = await push_image(registry.url, name, "v1", [64 * KIB])
    layer = image.layer_digests[0]
    data = (await call("GET", f"{registry.url}/v2/{name}/blobs/{layer}")).body
    mirror = await make_mirror(registry.url)
    await registry.settle()
    registry.reset_counts()
    return image, f"http://127.0.0.1:{mirror.server.port}", data


def assert_whole(answer: Answer, data: bytes, digest: str) -> None:
    assert answer.status == 200, answer.body[:300]
    assert answer.body == data
    assert answer.headers["Content-Length"] == str(len(data))
    assert answer.headers["Docker-Content-Digest"] == digest
    assert "Content-Range" not in answer.headers


def assert_not_modified(answer: Answer, digest: str) -> None:
    assert answer.status == 304, answer.body[:300]
    assert answer.body == b""
    assert answer.headers["ETag"] == f'"{digest}"'
    assert answer.headers["Docker-Content-Digest"] == digest


async def test_unknown_units_and_several_ranges_get_the_whole_blob(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    image, mirror, data = await setup(registry, make_mirror, "http/ignored")
    layer = image.layer_digests[0]
    url = f"{mirror}/v2/{image.name}/blobs/{layer}"

    # On the miss (served from the growing file) and then on hits (from the cached file).
    for header in IGNORED_RANGES:
        assert_whole(await call("GET", url, {"Range": header}), data, layer)
    await registry.settle()
    assert registry.blob_gets() == 1

    # One bytes range is still honoured; a malformed or unsatisfiable one is still a 416.
    part = await call("GET", url, {"Range": "bytes=5-9"})
    assert (part.status, part.body) == (206, data[5:10])
    for header in ("bytes=a-b", f"bytes={len(data)}-"):
        refused = await call("GET", url, {"Range": header})
        assert refused.status == 416, header
        assert refused.headers["Content-Range"] == f"bytes */{len(data)}"
        assert b'"RANGE_INVALID"' in refused.body


async def test_if_range_with_the_etag_gets_the_range_and_any_other_the_whole_blob(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    image, mirror, data = await setup(registry, make_mirror, "http/if-range")
    layer = image.layer_digests[0]
    url = f"{mirror}/v2/{image.name}/blobs/{layer}"
    etag = f'"{layer}"'

    stale = {"Range": "bytes=0-9", "If-Range": f'"{MISSING}"'}
    assert_whole(await call("GET", url, stale), data, layer)  # a miss
    await registry.settle()
    assert registry.blob_gets() == 1

    part = await call("GET", url, {"Range": "bytes=0-9", "If-Range": etag})
    assert part.status == 206
    assert (part.body, part.headers["Content-Range"]) == (data[:10], f"bytes 0-9/{len(data)}")
    # Not our ETag, a weak one (If-Range compares strongly), a date (we send no
    # Last-Modified): the whole blob.
    for validator in (f'"{MISSING}"', f"W/{etag}", "Wed, 21 Oct 2015 07:28:00 GMT"):
        answer = await call("GET", url, {"Range": "bytes=0-9", "If-Range": validator})
        assert_whole(answer, data, layer)
    # An If-Range without a Range is no request for a range.
    assert_whole(await call("GET", url, {"If-Range": etag}), data, layer)


async def test_if_none_match_on_blobs_is_304_for_hits_and_misses(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    image, mirror, data = await setup(registry, make_mirror, "http/none-match-blob")
    layer, config = image.layer_digests[0], image.config_digest
    url = f"{mirror}/v2/{image.name}/blobs/{layer}"
    etag = f'"{layer}"'

    # A miss: the upstream is asked whether the blob exists (a HEAD), nothing downloaded.
    assert_not_modified(await call("GET", url, {"If-None-Match": etag}), layer)
    await registry.settle()
    assert [(r.method, r.status) for r in registry.requests()] == [("HEAD", 200)]
    unknown = await call("GET", f"{mirror}/v2/{image.name}/blobs/{MISSING}", {"If-None-Match": "*"})
    assert unknown.status == 404 and b'"BLOB_UNKNOWN"' in unknown.body

    assert_whole(await call("GET", url), data, layer)  # now cached
    registry.reset_counts()
    for matching in (etag, f"W/{etag}", f'"{MISSING}", {etag}', f'W/"x",\t{etag} ,"y"', "*"):
        for method in ("GET", "HEAD"):
            assert_not_modified(await call(method, url, {"If-None-Match": matching}), layer)
    # If-None-Match comes before Range.
    ranged = await call("GET", url, {"If-None-Match": etag, "Range": "bytes=0-9"})
    assert_not_modified(ranged, layer)
    for other in (f'"{MISSING}"', f'"{config}"', layer, '"*"', f'"{layer}'):
        assert_whole(await call("GET", url, {"If-None-Match": other}), data, layer)
    await registry.settle()
    assert registry.requests() == []


async def test_if_none_match_on_manifests_is_304_by_digest_and_by_tag(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    image, mirror, _ = await setup(registry, make_mirror, "http/none-match-manifest")
    digest = image.manifest_digest
    by_digest = f"{mirror}/v2/{image.name}/manifests/{digest}"
    by_tag = f"{mirror}/v2/{image.name}/manifests/v1"
    accept = {"Accept": OCI_MANIFEST}
    matching = {**accept, "If-None-Match": f'W/"{MISSING}", "{digest}"'}

    assert_not_modified(await call("GET", by_digest, matching), digest)  # a miss
    assert_not_modified(await call("GET", by_tag, matching), digest)  # the tag's ETag
    for method in ("GET", "HEAD"):
        for url in (by_digest, by_tag):
            assert_not_modified(await call(method, url, matching), digest)
            assert_not_modified(await call(method, url, {**accept, "If-None-Match": "*"}), digest)
    for url in (by_digest, by_tag):
        other = await call("GET", url, {**accept, "If-None-Match": f'"{MISSING}"'})
        assert (other.status, other.body) == (200, image.manifest_bytes)
        assert other.headers["ETag"] == f'"{digest}"'
