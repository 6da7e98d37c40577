"""Manifests and tags through the whole app (`make_app`): the media type belongs to the
content, upstream answers that are not manifests are upstream errors, references that
name nothing are unknown, and tags/list is sorted and paged by the mirror.

A real docker-registry where it can show the behaviour; the fake upstream for what it
cannot (another type for the same bytes, a maintenance page, tags in its own order and
pages).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fake_upstream import FakeUpstream, manifest_bytes
from pytest_aiohttp import AiohttpClient
from upstream_registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    RegistryProcess,
    json_bytes,
    push_image,
    put_manifest,
)

from mirror.app import make_app
from mirror.config import Config, StorageConfig, UpstreamConfig, default_hosts
from mirror.proxy import manifests
from mirror.proxy.manifests import MAX_TAG_PAGES
from mirror.reference import MANIFEST_TYPES, digest_of
from mirror.storage.blobs import BlobStore
from mirror.storage.index import INDEX_FILE

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

MirrorClient = TestClient[web.Request, web.Application]
MakeMirror = Callable[..., Awaitable[MirrorClient]]
KIB = 1024
ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}
OCTET_STREAM = "application/octet-stream"


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    """The message of the one OCI error in `response`."""
    assert response.status == status, await response.text()
    [error] = (await response.json())["errors"]
    assert error["code"] == code, error
    return str(error["message"])


def recorded_type(storage: Path, digest: str) -> str | None:
    with sqlite3.connect(storage / INDEX_FILE) as db:
        row = db.execute("SELECT media_type FROM blobs WHERE digest = ?", (digest,)).fetchone()
    return None if row is None else str(row[0])


def tag_row(storage: Path, tag: str) -> str | None:
    with sqlite3.connect(storage / INDEX_FILE) as db:
        row = db.execute("SELECT digest FROM tags WHERE tag = ?", (tag,)).fetchone()
    return None if row is None else str(row[0])


# --- the media type belongs to the content ---------------------------------------------


@pytest.mark.parametrize(
    ("declared", "sent_by_b", "b_status"),
    [
        (True, DOCKER_MANIFEST, 200),  # its own mediaType says OCI
        (False, DOCKER_MANIFEST, 200),  # no mediaType: the first type recorded stays
        (True, OCTET_STREAM, 502),  # no manifest type at all: an upstream error
    ],
    ids=["declared", "undeclared", "octet-stream"],
)
async def test_another_upstreams_type_for_the_same_bytes_changes_nothing(
    registry: RegistryProcess,
    fake_upstream: FakeUpstream,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    declared: bool,
    sent_by_b: str,
    b_status: int,
) -> None:
    """Upstream a (a real registry) serves an OCI manifest; upstream b serves the very same
    bytes under another Content-Type. Whatever b sent, pulls from a, by tag or digest,
    get the OCI type, from memory and from the index."""
    image = await push_image(registry.url, "media/app", "v1", [4 * KIB])
    body = image.manifest_bytes
    if not declared:
        fields = json.loads(body)
        del fields["mediaType"]
        body = json_bytes(fields)
        async with aiohttp.ClientSession() as session:
            await put_manifest(session, registry.url, image.name, "v1", body, OCI_MANIFEST)
    digest = fake_upstream.manifests.put("media/app", "v1", body)
    fake_upstream.manifests.media_type = sent_by_b
    storage = tmp_path / "cache"
    config = Config(
        storage=StorageConfig(path=storage),
        upstreams=(
            UpstreamConfig(name="a", url=registry.url, hosts=default_hosts(registry.url),
                           default=True),
            UpstreamConfig(name="b", url=fake_upstream.url, hosts=("b.example",), prefix="b"),
        ),
    )  # fmt: skip
    mirror = await aiohttp_client(make_app(config))

    async with mirror.get("/v2/media/app/manifests/v1", headers=ACCEPT) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.content_type == OCI_MANIFEST
    async with mirror.get("/v2/b/media/app/manifests/v1", headers=ACCEPT) as response:
        assert response.status == b_status, await response.text()
        if b_status == 200:
            assert response.content_type == OCI_MANIFEST
            assert await response.read() == body
    assert [s.method for s in fake_upstream.seen] == ["GET"]  # b's answer was fetched, and judged

    for path in (f"/v2/media/app/manifests/{digest}", "/v2/media/app/manifests/v1"):
        async with mirror.get(path, headers=ACCEPT) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == OCI_MANIFEST
            assert await response.read() == body
    assert recorded_type(storage, digest) == OCI_MANIFEST


async def test_a_manifest_is_served_as_its_own_type_whatever_the_index_says(
    make_mirror: MakeMirror, tmp_path: Path, unused_tcp_port: int
) -> None:
    """A cache written before types belonged to the content may hold the type the last
    upstream sent; the manifest's own `mediaType` is what is served."""
    body = json_bytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []})
    storage = tmp_path / "cache"
    mirror = await make_mirror(f"http://127.0.0.1:{unused_tcp_port}", storage=storage)
    digest = digest_of(body)
    BlobStore(storage).write(digest, body)
    with sqlite3.connect(storage / INDEX_FILE) as db:
        now = time.time()
        db.execute(
            "INSERT INTO blobs (digest, size, media_type, created, last_access)"
            " VALUES (?, ?, ?, ?, ?)",
            (str(digest), len(body), OCTET_STREAM, now, now),
        )

    async with mirror.get(f"/v2/x/manifests/{digest}", headers=ACCEPT) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == OCI_MANIFEST
        assert await response.read() == body


# --- answers that are not manifests -----------------------------------------------------

GOOD = json_bytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []})
NEW = json_bytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": [{}]})
UNDECLARED = json_bytes({"schemaVersion": 2, "config": {}, "layers": [{}]})


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        (None, None),  # the maintenance page: HTML, answered 200
        (NEW, OCTET_STREAM),  # a manifest, and a type that is none
        (NEW, "text/html"),
        (json_bytes({"errors": [{"code": "UNAVAILABLE"}]}), OCI_MANIFEST),
        (json_bytes({"schemaVersion": 2, "mediaType": "text/html"}), None),
        (UNDECLARED, None),  # no type anywhere
    ],
    ids=["maintenance", "octet-stream", "html-type", "error-json", "declares-html", "untyped"],
)
async def test_an_answer_that_is_no_manifest_is_an_upstream_error(
    make_mirror: MakeMirror,
    fake_upstream: FakeUpstream,
    tmp_path: Path,
    body: bytes | None,
    sent: str | None,
) -> None:
    """502 UPSTREAM_ERROR, nothing stored, the tag not recorded; a tag cached before is
    served stale meanwhile, and all is well once the upstream answers manifests again."""
    storage = tmp_path / "cache"
    cached = fake_upstream.manifests.put("team/app", "cached", GOOD)
    mirror = await make_mirror(fake_upstream.url, tag_ttl=0, storage=storage)
    async with mirror.get("/v2/team/app/manifests/cached", headers=ACCEPT) as response:
        assert response.status == 200, await response.text()

    if body is None:
        fake_upstream.manifests.maintenance = True
        bad = fake_upstream.manifests.put("team/app", "new", NEW)  # behind the page: never seen
    else:
        fake_upstream.manifests.media_type = sent
        fake_upstream.manifests.put("team/app", "cached", body)
        bad = fake_upstream.manifests.put("team/app", "new", body)
    for path in ("/v2/team/app/manifests/new", f"/v2/team/app/manifests/{bad}"):
        for method in ("GET", "HEAD"):
            async with mirror.request(method, path, headers=ACCEPT) as response:
                if method == "GET":
                    await expect_error(response, 502, "UPSTREAM_ERROR")
                assert response.status == 502
    async with mirror.get("/v2/team/app/manifests/cached", headers=ACCEPT) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Docker-Content-Digest"] == cached  # stale
        assert await response.read() == GOOD
    assert [str(d) for d in BlobStore(storage).scan()] == [cached]  # nothing else stored
    assert recorded_type(storage, bad) is None
    assert (tag_row(storage, "new"), tag_row(storage, "cached")) == (None, cached)

    fake_upstream.manifests.maintenance, fake_upstream.manifests.media_type = False, OCI_MANIFEST
    fake_upstream.manifests.put("team/app", "cached", GOOD)
    fake_upstream.manifests.put("team/app", "new", GOOD)
    async with mirror.get("/v2/team/app/manifests/new", headers=ACCEPT) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == OCI_MANIFEST
    assert tag_row(storage, "new") == cached


async def test_a_manifest_sent_without_a_type_has_its_own(
    make_mirror: MakeMirror, fake_upstream: FakeUpstream
) -> None:
    digest = fake_upstream.manifests.put("team/app", "v1", GOOD)
    fake_upstream.manifests.media_type = None
    mirror = await make_mirror(fake_upstream.url)
    for path in ("/v2/team/app/manifests/v1", f"/v2/team/app/manifests/{digest}"):
        async with mirror.get(path, headers=ACCEPT) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == OCI_MANIFEST
            assert await response.read() == GOOD
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{fake_upstream.url}/v2/team/app/manifests/v1") as response,
    ):
        assert "Content-Type" not in response.headers  # as sent: no type but its own


# --- references that name nothing -------------------------------------------------------

NOT_REFERENCES = [
    ".INVALID_MANIFEST_NAME",
    "-bad",
    "t" * 129,
    "sha256:abc",
    "sha256:" + "A" * 64,
    "md5:" + "a" * 32,
    "sha384:" + "a" * 96,
]


async def test_a_reference_that_is_neither_tag_nor_digest_is_unknown_without_upstream(
    registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    await push_image(registry.url, "conf/app", "v1", [KIB])
    mirror = await make_mirror(registry.url)
    await registry.settle()
    registry.reset_counts()
    for reference in NOT_REFERENCES:
        path = f"/v2/conf/app/manifests/{reference}"
        async with mirror.get(path, headers=ACCEPT) as response:
            message = await expect_error(response, 404, "MANIFEST_UNKNOWN")
            assert reference[:20] in message
        async with mirror.head(path, headers=ACCEPT) as response:
            assert response.status == 404
            assert await response.read() == b""
    async with mirror.get("/v2/conf/app/blobs/sha256:abc") as response:
        await expect_error(response, 400, "DIGEST_INVALID")  # where a digest is required
    await registry.settle()
    assert registry.requests() == []
    async with mirror.get("/v2/conf/app/manifests/v1", headers=ACCEPT) as response:
        assert response.status == 200  # the registry was there to be asked


async def test_every_process_answers_an_invalid_reference_alike(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """With workers, a worker parses the reference before anything is handed off; the
    kernel spreads 16 connections over both processes (see test_workers)."""
    mirror = start_mirror_process(
        "--storage", str(tmp_path / "cache"), "--upstream", registry.url, "--workers", "2"
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while "worker 1 (pid" not in mirror.log():
        assert time.monotonic() < deadline, mirror.log()
        await asyncio.sleep(0.05)
    url = f"{mirror.url}/v2/conf/app/manifests/.INVALID_MANIFEST_NAME"
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(16):
            async with session.get(url) as response:
                await expect_error(response, 404, "MANIFEST_UNKNOWN")
    await registry.settle()
    assert registry.requests() == []


# --- tags/list, paged by the mirror -----------------------------------------------------

UPSTREAM_ORDER = ["v10", "latest", "v2", "B", "v1", "_x", "a", "v1.1"]
SORTED = sorted(UPSTREAM_ORDER)  # B, _x, a, latest, v1, v1.1, v10, v2


def put_tags(upstream: FakeUpstream, name: str, tags: list[str]) -> None:
    """`tags` listed by the upstream in this order, each naming a manifest of its own."""
    for tag in tags:
        upstream.manifests.put(name, tag, manifest_bytes(tag))


async def pages(mirror: MirrorClient, start: str) -> list[list[str]]:
    """The tags of each page from `start` on, following the mirror's `Link`s."""
    found: list[list[str]] = []
    path: str | None = start
    while path is not None and len(found) < 20:
        async with mirror.get(path) as response:
            assert response.status == 200, await response.text()
            found.append((await response.json())["tags"])
            link = response.headers.get("Link")
        path = link[link.index("<") + 1 : link.index(">")] if link else None
    return found


async def test_tags_are_sorted_and_paged_by_the_mirror_whatever_the_upstream_does(
    make_mirror: MakeMirror, fake_upstream: FakeUpstream
) -> None:
    """The upstream lists its tags unsorted, three a page behind a cursor of its own, and
    takes `n` from its unsorted list; the mirror follows its pages and pages itself."""
    put_tags(fake_upstream, "team/app", UPSTREAM_ORDER)
    fake_upstream.manifests.page = 3
    mirror = await make_mirror(fake_upstream.url, tag_ttl=0, upstream={"retries": 0})

    async with mirror.get("/v2/team/app/tags/list") as response:
        assert response.status == 200, await response.text()
        assert await response.json() == {"name": "team/app", "tags": SORTED}
        assert "Link" not in response.headers
    asked = [s.path_qs for s in fake_upstream.seen]
    assert asked == [f"/v2/team/app/tags/list{q}" for q in ("", "?page=1", "?page=2")]

    expected = [
        ("?n=3", SORTED[:3], "?n=3&last=a"),
        ("?n=3&last=a", SORTED[3:6], "?n=3&last=v1.1"),
        ("?n=3&last=v1.1", SORTED[6:], None),
        ("?n=2&last=b", ["latest", "v1"], "?n=2&last=v1"),  # `last` need not be a tag
        ("?last=v1", SORTED[5:], None),
        ("?n=0", [], None),
        ("?n=0&last=a", [], None),
        (f"?n={len(SORTED)}", SORTED, None),
        ("?n=" + "9" * 5000, SORTED, None),
    ]
    for query, tags, link in expected:
        async with mirror.get(f"/v2/team/app/tags/list{query}") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["tags"] == tags, query
            next_page = f'</v2/team/app/tags/list{link}>; rel="next"' if link else None
            assert response.headers.get("Link") == next_page, query
    assert await pages(mirror, "/v2/team/app/tags/list?n=3") == [
        SORTED[:3],
        SORTED[3:6],
        SORTED[6:],
    ]
    assert not any("n=" in s.path_qs or "last=" in s.path_qs for s in fake_upstream.seen)

    for bad in ("ten", "-1", "²", "1.5"):
        async with mirror.get(f"/v2/team/app/tags/list?n={bad}") as response:
            await expect_error(response, 400, "PAGINATION_NUMBER_INVALID")

    # tag_ttl 0: asked again each time; while it fails, the list is served stale, paged.
    fake_upstream.fail(500)
    assert await pages(mirror, "/v2/team/app/tags/list?n=5") == [SORTED[:5], SORTED[5:]]
    async with mirror.get("/v2/team/app/tags/list?n=2&last=v1") as response:
        assert (await response.json())["tags"] == ["v1.1", "v10"]
        assert response.headers["Link"] == '</v2/team/app/tags/list?n=2&last=v10>; rel="next"'
    assert fake_upstream.seen[-1].status == 500


async def test_tags_link_keeps_the_path_and_namespace_the_client_asked(
    fake_upstream: FakeUpstream, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    put_tags(fake_upstream, "team/app", UPSTREAM_ORDER)
    config = Config(
        storage=StorageConfig(path=tmp_path / "cache"),
        upstreams=(
            UpstreamConfig(name="hub", url="http://127.0.0.1:9", hosts=("docker.io",),
                           default=True),
            UpstreamConfig(name="f", url=fake_upstream.url, hosts=("f.example",), prefix="f"),
        ),
    )  # fmt: skip
    mirror = await aiohttp_client(make_app(config))
    for path in ("/v2/f/team/app/tags/list?n=4", "/v2/team/app/tags/list?ns=f.example&n=4"):
        found = await pages(mirror, path)
        assert found == [SORTED[:4], SORTED[4:]], path
    async with mirror.get("/v2/f/team/app/tags/list?n=4") as response:
        assert await response.json() == {"name": "f/team/app", "tags": SORTED[:4]}
        assert response.headers["Link"] == '</v2/f/team/app/tags/list?n=4&last=latest>; rel="next"'
    async with mirror.get("/v2/team/app/tags/list?n=4&ns=f.example") as response:
        link = '</v2/team/app/tags/list?n=4&last=latest&ns=f.example>; rel="next"'
        assert response.headers["Link"] == link


@pytest.mark.parametrize("failure", ["loop", "pages", "maintenance"])
async def test_an_upstream_tag_list_that_never_ends_or_is_no_list_is_an_upstream_error(
    make_mirror: MakeMirror, fake_upstream: FakeUpstream, failure: str
) -> None:
    tags, fake_upstream.manifests.page = UPSTREAM_ORDER, 2
    if failure == "loop":
        fake_upstream.manifests.link_loops = True  # every page links back to the first
    elif failure == "pages":
        tags, fake_upstream.manifests.page = [f"t{i:03d}" for i in range(MAX_TAG_PAGES + 5)], 1
    else:
        fake_upstream.manifests.maintenance = True
    put_tags(fake_upstream, "team/app", tags)
    mirror = await make_mirror(fake_upstream.url)
    async with mirror.get("/v2/team/app/tags/list?n=2") as response:
        await expect_error(response, 502, "UPSTREAM_ERROR")
    expected = {"loop": 2, "pages": MAX_TAG_PAGES, "maintenance": 1}[failure]
    assert len(fake_upstream.seen) == expected


async def test_tag_lists_kept_for_stale_answers_are_bounded_in_memory(
    make_mirror: MakeMirror, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any client may list any repository: the lists kept to serve stale take at most
    LISTING_CACHE_BYTES, the least recently stored dropped first; a larger one is not kept."""
    monkeypatch.setattr(manifests, "LISTING_CACHE_BYTES", 4096)
    for n in range(30):  # about 200 bytes kept per repository
        put_tags(fake_upstream, f"team/r{n}", ["a", "b", "c"])
    mirror = await make_mirror(fake_upstream.url, tag_ttl=0, upstream={"retries": 0})
    for n in range(30):
        async with mirror.get(f"/v2/team/r{n}/tags/list") as response:
            assert response.status == 200, await response.text()
    big = [f"t{i:04d}" for i in range(200)]  # over 10 KiB as Python strings
    put_tags(fake_upstream, "team/big", big)
    async with mirror.get("/v2/team/big/tags/list") as response:
        assert len((await response.json())["tags"]) == 200

    fake_upstream.fail(500)
    async with mirror.get("/v2/team/r29/tags/list") as response:
        assert (await response.json())["tags"] == ["a", "b", "c"]  # stale
    for dropped in ("r0", "big"):
        async with mirror.get(f"/v2/team/{dropped}/tags/list") as response:
            await expect_error(response, 502, "UPSTREAM_ERROR")
