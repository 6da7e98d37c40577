"""The upstream client: redirects and where `Authorization` goes, and the status table.

Fake upstreams are real aiohttp servers on loopback (`fake_upstream.py`). Each behaviour is
checked on `Upstream` itself and, where a client of the mirror can see it, through the
whole app built by `make_app`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fake_upstream import CDN, OCI_MANIFEST, FakeUpstream, Serve, manifest_bytes, sha256
from pytest_aiohttp import AiohttpClient

from mirror import config as mirror_config
from mirror.app import make_app
from mirror.config import Timeouts, UpstreamConfig
from mirror.errors import (
    BlobUnknown,
    ConfigError,
    Denied,
    ManifestUnknown,
    NameUnknown,
    PeerUnauthorized,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    UpstreamCut,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mirror.reference import parse_digest
from mirror.upstream.client import (
    CHUNK_SIZE,
    MAX_MANIFEST_SIZE,
    MAX_REDIRECTS,
    Upstream,
    _socket_reads,
)

MirrorClient = TestClient[web.Request, web.Application]
MakeMirror = Callable[..., Awaitable[MirrorClient]]

ACCEPT = (OCI_MANIFEST,)
PASSWORD = "s3cret-Pa55"
MISSING = sha256(b"no such blob")
FAST = {"timeouts": Timeouts(connect=2, first_byte=0.5, idle=0.5)}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def registry(fake_upstream: FakeUpstream) -> FakeUpstream:
    """A Hub-like registry: Bearer tokens from its own realm."""
    fake_upstream.auth.scheme = "bearer"
    return fake_upstream


def upstream_for(url: str, session: aiohttp.ClientSession, **fields: Any) -> Upstream:
    return Upstream(UpstreamConfig(name="fake", url=url, default=True, **fields), session)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


async def test_an_upstream_that_compresses_for_clients_asking_is_asked_for_no_encoding(
    make_mirror: MakeMirror, fake_upstream: FakeUpstream
) -> None:
    """Bodies are kept as sent, and a digest is of the bytes themselves: asked for gzip,
    a registry behind a compressing proxy would send bytes that never match it."""
    fake_upstream.blobs.compress = True
    data = bytes(200 * 1024)  # compresses well
    digest = fake_upstream.blobs.put(data)
    fake_upstream.manifests.put("library/x", "1", manifest_bytes("x"))
    mirror = await make_mirror(fake_upstream.url)
    async with mirror.get(f"/v2/library/x/blobs/{digest}") as response:
        assert (response.status, await response.read()) == (200, data)
    async with mirror.get("/v2/library/x/manifests/1", headers={"Accept": OCI_MANIFEST}) as resp:
        assert (resp.status, await resp.read()) == (200, manifest_bytes("x"))
    asked = {s.headers.get("Accept-Encoding") for s in fake_upstream.seen}
    assert asked == {"identity"}


# --- redirects: Authorization never leaves the upstream's origin ---------------------------


@pytest.mark.parametrize("cdn_host", ["localhost", "127.0.0.1"])
async def test_blob_redirected_to_a_cdn_arrives_without_authorization(
    serve: Serve,
    make_mirror: MakeMirror,
    registry: FakeUpstream,
    cdn_host: str,
) -> None:
    data = os.urandom(300 * 1024)
    digest = registry.blobs.put(data)
    cdn = await serve(CDN(registry.blobs))
    registry.blob_redirect = f"http://{cdn_host}:{cdn.port}/blobs"
    mirror = await make_mirror(registry.url)

    async with mirror.get(f"/v2/library/x/blobs/{digest}") as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest
        assert await response.read() == data

    blob_requests = [(s.authorization, s.status) for s in registry.seen if "/blobs/" in s.path]
    assert blob_requests == [(None, 401), ("Bearer token-1", 307)]
    assert [(s.authorization, s.status) for s in cdn.seen] == [(None, 200)]
    assert cdn.seen[0].headers["Host"] == f"{cdn_host}:{cdn.port}"


async def test_configured_credentials_never_reach_the_cdn(
    serve: Serve,
    aiohttp_client: AiohttpClient,
    registry: FakeUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FAKE_UPSTREAM_PASSWORD", PASSWORD)
    data = os.urandom(64 * 1024)
    digest = registry.blobs.put(data)
    cdn = await serve(CDN(registry.blobs))
    registry.blob_redirect = f"http://localhost:{cdn.port}/blobs"
    upstream = UpstreamConfig(
        name="fake",
        url=registry.url,
        default=True,
        auth=mirror_config.AuthConfig(
            "basic", username="alice", password_env="FAKE_UPSTREAM_PASSWORD"
        ),
    )
    config = mirror_config.Config(
        storage=mirror_config.StorageConfig(path=tmp_path / "cache"), upstreams=(upstream,)
    )
    mirror = await aiohttp_client(make_app(config))

    async with mirror.get(f"/v2/library/x/blobs/{digest}") as response:
        assert response.status == 200
        assert await response.read() == data
        assert PASSWORD not in str(response.headers)

    # The upstream and its own token realm got the credentials; the CDN did not.
    assert [t.authorization for t in registry.token_requests] == [basic("alice", PASSWORD)]
    assert [(s.authorization, s.status) for s in cdn.seen] == [(None, 200)]
    assert PASSWORD not in caplog.text
    assert basic("alice", PASSWORD).split()[1] not in caplog.text


@pytest.mark.parametrize("location", ["relative", "absolute"])
async def test_same_origin_redirect_keeps_authorization(
    make_mirror: MakeMirror, registry: FakeUpstream, location: str
) -> None:
    data = os.urandom(100 * 1024)
    digest = registry.blobs.put(data)
    registry.blob_redirect = "/data" if location == "relative" else f"{registry.url}/data"
    mirror = await make_mirror(registry.url)

    async with mirror.get(f"/v2/library/x/blobs/{digest}") as response:
        assert response.status == 200
        assert await response.read() == data

    [data_request] = [s for s in registry.seen if s.path.startswith("/data/")]
    assert (data_request.authorization, data_request.status) == ("Bearer token-1", 200)


async def test_redirects_are_followed_up_to_the_limit(
    registry: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    body = manifest_bytes("x")
    registry.manifests.put("library/x", "latest", body)
    upstream = upstream_for(registry.url, session)

    registry.manifest_redirects = MAX_REDIRECTS
    manifest = await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert manifest.body == body
    hops = [s for s in registry.seen if s.path.startswith("/hop/")]
    assert len(hops) == MAX_REDIRECTS
    assert {s.authorization for s in hops} == {"Bearer token-1"}  # same origin throughout

    registry.manifest_redirects = MAX_REDIRECTS + 1
    with pytest.raises(UpstreamError, match="redirected more than 5 times") as caught:
        await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert (caught.value.code, caught.value.status) == ("UPSTREAM_ERROR", 502)


async def test_redirect_to_a_non_http_url_is_refused(
    registry: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    digest = registry.blobs.put(b"layer")
    registry.blob_redirect = "ftp://127.0.0.1/blobs"
    upstream = upstream_for(registry.url, session)
    with pytest.raises(UpstreamError, match="non-HTTP"):
        async with upstream.blob("library/x", parse_digest(digest)):
            pass


# --- the status table, on Upstream itself ---------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """How the fake upstream misbehaves."""

    status: int | None = None  # answer this to every /v2/ request
    headers: tuple[tuple[str, str], ...] = ()
    mode: str | None = None  # or: a FakeUpstream mode (reject, drop, hang)

    def apply(self, fake: FakeUpstream) -> None:
        if self.status is not None:
            fake.fail(self.status, dict(self.headers))
        if self.mode is not None:
            fake.mode = self.mode  # type: ignore[assignment]


def param_id(value: object) -> str:
    if isinstance(value, Failure):
        return value.mode or str(value.status or "absent")
    if isinstance(value, type):
        return value.__name__
    return str(value)


NOT_FOUND = Failure()  # nothing is stored: the registry answers 404 itself
RETRY_AFTER = (("Retry-After", "17"),)


async def call(upstream: Upstream, kind: str) -> None:
    """One upstream operation of `kind` on `library/x`."""
    if kind == "manifest":
        await upstream.get_manifest("library/x", "latest", ACCEPT)
    elif kind == "manifest-head":
        await upstream.head_manifest("library/x", "latest", ACCEPT)
    elif kind == "blob":
        async with upstream.blob("library/x", parse_digest(MISSING)) as body:
            async for _ in body.chunks():
                pass
    elif kind == "blob-head":
        await upstream.head_blob("library/x", parse_digest(MISSING))
    elif kind == "tags":
        await upstream.listing("library/x", "/v2/library/x/tags/list", {})
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "failure", "error", "code", "status"),
    [
        ("manifest", NOT_FOUND, ManifestUnknown, "MANIFEST_UNKNOWN", 404),
        ("manifest-head", NOT_FOUND, ManifestUnknown, "MANIFEST_UNKNOWN", 404),
        ("blob", NOT_FOUND, BlobUnknown, "BLOB_UNKNOWN", 404),
        ("blob-head", NOT_FOUND, BlobUnknown, "BLOB_UNKNOWN", 404),
        ("tags", NOT_FOUND, NameUnknown, "NAME_UNKNOWN", 404),
        ("manifest", Failure(mode="reject"), Unauthorized, "UNAUTHORIZED", 401),
        ("manifest", Failure(401), Unauthorized, "UNAUTHORIZED", 401),
        ("blob", Failure(mode="reject"), Unauthorized, "UNAUTHORIZED", 401),
        ("manifest", Failure(403), Denied, "DENIED", 403),
        ("blob", Failure(403), Denied, "DENIED", 403),
        ("manifest", Failure(429, RETRY_AFTER), TooManyRequests, "TOOMANYREQUESTS", 429),
        ("manifest-head", Failure(429, RETRY_AFTER), TooManyRequests, "TOOMANYREQUESTS", 429),
        ("blob", Failure(429, RETRY_AFTER), TooManyRequests, "TOOMANYREQUESTS", 429),
        ("tags", Failure(429, RETRY_AFTER), TooManyRequests, "TOOMANYREQUESTS", 429),
        ("manifest", Failure(500), UpstreamError, "UPSTREAM_ERROR", 502),
        ("manifest", Failure(502), UpstreamError, "UPSTREAM_ERROR", 502),
        ("manifest", Failure(503), UpstreamError, "UPSTREAM_ERROR", 502),
        ("blob", Failure(503), UpstreamError, "UPSTREAM_ERROR", 502),
        ("tags", Failure(500), UpstreamError, "UPSTREAM_ERROR", 502),
        ("manifest", Failure(418), UpstreamError, "UPSTREAM_ERROR", 502),
        ("manifest", Failure(mode="drop"), UpstreamUnavailable, "UPSTREAM_UNAVAILABLE", 502),
        ("manifest", Failure(mode="hang"), UpstreamTimeout, "UPSTREAM_TIMEOUT", 504),
        ("manifest-head", Failure(mode="hang"), UpstreamTimeout, "UPSTREAM_TIMEOUT", 504),
        ("blob", Failure(mode="hang"), UpstreamTimeout, "UPSTREAM_TIMEOUT", 504),
    ],
    ids=param_id,
)
async def test_status_table(
    registry: FakeUpstream,
    session: aiohttp.ClientSession,
    kind: str,
    failure: Failure,
    error: type[RegistryError],
    code: str,
    status: int,
) -> None:
    failure.apply(registry)
    with pytest.raises(RegistryError) as caught:
        await call(upstream_for(registry.url, session, **FAST), kind)
    assert type(caught.value) is error
    assert (caught.value.code, caught.value.status) == (code, status)
    if error is TooManyRequests:
        assert caught.value.headers() == {"Retry-After": "17"}


async def test_429_without_retry_after_still_tells_clients_when_to_retry(
    registry: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    registry.fail(429)
    with pytest.raises(TooManyRequests) as caught:
        await call(upstream_for(registry.url, session), "manifest")
    assert caught.value.headers()["Retry-After"].isdigit()


@pytest.mark.parametrize("kind", ["manifest", "blob", "tags"])
async def test_connection_refused_is_unavailable(
    session: aiohttp.ClientSession, unused_tcp_port: int, kind: str
) -> None:
    with pytest.raises(UpstreamUnavailable) as caught:
        await call(upstream_for(f"http://127.0.0.1:{unused_tcp_port}", session), kind)
    assert (caught.value.code, caught.value.status) == ("UPSTREAM_UNAVAILABLE", 502)
    assert "unreachable" in caught.value.message


async def test_blob_that_stops_mid_body_times_out(
    registry: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(512 * 1024)
    digest = registry.blobs.put(data)
    registry.blobs.stall_after, registry.blobs.stalls = len(data) // 2, 1
    received = b""
    with pytest.raises(UpstreamCut):
        async with upstream_for(registry.url, session, **FAST).blob(
            "library/x", parse_digest(digest)
        ) as body:
            assert body.length == len(data)
            async for chunk in body.chunks():
                received += chunk
    assert received == data[: len(data) // 2]


async def test_a_blob_body_is_read_from_the_socket_a_chunk_at_a_time(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """asyncio's transport reads 256 KiB per call; while a blob's body comes, a chunk (a
    quarter of the loop's turns per MiB), and as before afterwards: the connection goes
    back to the pool for answers of any kind."""
    digest = fake_upstream.blobs.put(os.urandom(4 * CHUNK_SIZE))  # not all read with the head
    async with session.get(f"{fake_upstream.url}/v2/library/x/blobs/{digest}") as response:
        assert response.connection is not None
        transport = response.connection.transport
        default = getattr(transport, "max_size", None)
        assert default == 256 * 1024  # asyncio's; if it changes, so may the lever
        with _socket_reads(response, CHUNK_SIZE):
            assert getattr(transport, "max_size", None) == CHUNK_SIZE
        assert getattr(transport, "max_size", None) == default


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_manifest_over_4mib_is_an_upstream_error(
    registry: FakeUpstream, session: aiohttp.ClientSession, chunked: bool
) -> None:
    """The upstream's fault, not the client's: 502, not MANIFEST_INVALID (400)."""
    registry.manifests.chunked = chunked
    registry.manifests.put("library/x", "latest", manifest_bytes("big", MAX_MANIFEST_SIZE + 1))
    registry.manifests.put("library/x", "limit", manifest_bytes("limit", MAX_MANIFEST_SIZE))
    upstream = upstream_for(registry.url, session)

    with pytest.raises(UpstreamError) as caught:
        await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert (caught.value.code, caught.value.status) == ("UPSTREAM_ERROR", 502)
    exactly_4mib = await upstream.get_manifest("library/x", "limit", ACCEPT)
    assert exactly_4mib.body is not None
    assert len(exactly_4mib.body) == MAX_MANIFEST_SIZE


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_large_manifest_and_listing_arrive_whole(
    make_mirror: MakeMirror, registry: FakeUpstream, chunked: bool
) -> None:
    # Regression: one `StreamReader.read(n)` returns what has arrived so far, so anything
    # over a TCP read or two was cut short (and then failed its digest, or was cached cut).
    registry.manifests.chunked = chunked
    body = manifest_bytes("large", 1024 * 1024)
    digest = registry.manifests.put("library/x", "latest", body)
    tags = [f"v{i:05d}-with-a-long-suffix" for i in range(5000)]
    for tag in tags:
        registry.manifests.bodies[("library/x", tag)] = body
    mirror = await make_mirror(registry.url)

    async with mirror.get(PATHS["manifest"], headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Docker-Content-Digest"] == digest
        assert await response.read() == body
    async with mirror.get(PATHS["tags"]) as response:
        assert response.status == 200, await response.text()
        listing = await response.read()
        assert len(listing) > 100 * 1024
        assert json.loads(listing)["tags"] == sorted([*tags, "latest"])


# --- the status table, as a client of the mirror sees it ------------------------------------

PATHS = {
    "manifest": "/v2/library/x/manifests/latest",
    "blob": f"/v2/library/x/blobs/{MISSING}",
    "tags": "/v2/library/x/tags/list",
}


async def expect_oci_error(
    response: aiohttp.ClientResponse, status: int, code: str
) -> dict[str, object]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = json.loads(await response.read())
    [entry] = body["errors"]
    assert entry["code"] == code
    assert isinstance(entry["message"], str)
    assert entry["message"]
    assert set(entry) <= {"code", "message", "detail"}
    return dict(entry)


@pytest.mark.parametrize(
    ("kind", "failure", "status", "code"),
    [
        ("manifest", NOT_FOUND, 404, "MANIFEST_UNKNOWN"),
        ("blob", NOT_FOUND, 404, "BLOB_UNKNOWN"),
        ("tags", NOT_FOUND, 404, "NAME_UNKNOWN"),
        ("manifest", Failure(mode="reject"), 401, "UNAUTHORIZED"),
        ("manifest", Failure(403), 403, "DENIED"),
        ("blob", Failure(403), 403, "DENIED"),
        ("manifest", Failure(429, RETRY_AFTER), 429, "TOOMANYREQUESTS"),
        ("blob", Failure(429, RETRY_AFTER), 429, "TOOMANYREQUESTS"),
        ("tags", Failure(429, RETRY_AFTER), 429, "TOOMANYREQUESTS"),
        ("manifest", Failure(503), 502, "UPSTREAM_ERROR"),
        ("blob", Failure(500), 502, "UPSTREAM_ERROR"),
        ("tags", Failure(503), 502, "UPSTREAM_ERROR"),
        ("manifest", Failure(mode="drop"), 502, "UPSTREAM_UNAVAILABLE"),
        ("blob", Failure(mode="drop"), 502, "UPSTREAM_UNAVAILABLE"),
        ("manifest", Failure(mode="hang"), 504, "UPSTREAM_TIMEOUT"),
        ("blob", Failure(mode="hang"), 504, "UPSTREAM_TIMEOUT"),
    ],
    ids=param_id,
)
async def test_mirror_answers_upstream_failures_as_oci_errors(
    make_mirror: MakeMirror,
    registry: FakeUpstream,
    kind: str,
    failure: Failure,
    status: int,
    code: str,
) -> None:
    failure.apply(registry)
    mirror = await make_mirror(registry.url, upstream=FAST)
    async with mirror.get(PATHS[kind], headers={"Accept": OCI_MANIFEST}) as response:
        await expect_oci_error(response, status, code)
        if status == 429:
            assert response.headers["Retry-After"] == "17"

    # Nothing was cached: once the upstream has it and answers, so does the mirror; but a
    # 429 to a manifest GET (a counted pull) holds further GETs back for its Retry-After.
    registry.mode = "ok"
    registry.manifests.put("library/x", "latest", manifest_bytes("x"))
    registry.blobs.put(b"no such blob")
    async with mirror.get(PATHS[kind], headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == (429 if (kind, status) == ("manifest", 429) else 200)


def registry_errors(kind: type[RegistryError] = RegistryError) -> list[type[RegistryError]]:
    return [kind, *(sub for child in kind.__subclasses__() for sub in registry_errors(child))]


@pytest.mark.parametrize(
    "kind", [k for k in registry_errors() if k.status == 401], ids=lambda k: k.__name__
)
def test_every_401_error_names_a_way_to_authenticate(kind: type[RegistryError]) -> None:
    # Replicas of a fleet present the fleet's secret as a Bearer token; clients log in.
    way = 'Bearer realm="mirror-fleet"' if kind is PeerUnauthorized else 'Basic realm="mirror"'
    assert kind("x").headers()["WWW-Authenticate"] == way


@pytest.mark.parametrize(
    "refusal",
    ["token refused", "bearer refused", "no challenge"],
)
async def test_an_upstream_401_reaches_the_client_with_a_challenge(
    make_mirror: MakeMirror, registry: FakeUpstream, refusal: str
) -> None:
    """A 401 without WWW-Authenticate is no valid HTTP answer; the mirror's own challenge
    goes out, whatever the upstream's was (or that it had none)."""
    if refusal == "token refused":
        registry.auth.token_status = 401
    elif refusal == "bearer refused":
        registry.mode = "reject"
    else:
        registry.fail(401, {})
    mirror = await make_mirror(registry.url, upstream=FAST)
    for path in PATHS.values():
        async with mirror.get(path, headers={"Accept": OCI_MANIFEST}) as response:
            await expect_oci_error(response, 401, "UNAUTHORIZED")
            assert response.headers.getall("WWW-Authenticate") == ['Basic realm="mirror"']


async def test_mirror_answers_unreachable_upstream(
    make_mirror: MakeMirror, unused_tcp_port: int
) -> None:
    mirror = await make_mirror(f"http://127.0.0.1:{unused_tcp_port}")
    for path in PATHS.values():
        async with mirror.get(path) as response:
            entry = await expect_oci_error(response, 502, "UPSTREAM_UNAVAILABLE")
            assert "unreachable" in str(entry["message"])


async def test_mirror_refuses_an_oversized_manifest(
    make_mirror: MakeMirror, registry: FakeUpstream
) -> None:
    registry.manifests.put("library/x", "latest", manifest_bytes("big", MAX_MANIFEST_SIZE + 1))
    mirror = await make_mirror(registry.url)
    async with mirror.get(PATHS["manifest"]) as response:
        await expect_oci_error(response, 502, "UPSTREAM_ERROR")


async def test_mirror_cuts_a_blob_whose_upstream_stalls(
    make_mirror: MakeMirror, registry: FakeUpstream
) -> None:
    data = os.urandom(512 * 1024)
    digest = registry.blobs.put(data)
    # Every try, the first and each resumption, answered whole and stalled half-way.
    registry.blobs.ranges = False
    registry.blobs.stall_after, registry.blobs.stalls = len(data) // 2, 99
    mirror = await make_mirror(registry.url, upstream=FAST)
    async with mirror.get(f"/v2/library/x/blobs/{digest}") as response:
        assert response.status == 200  # headers were sent before the upstream stalled
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()

    registry.blobs.stalls = 0
    async with mirror.get(f"/v2/library/x/blobs/{digest}") as response:
        assert response.status == 200
        assert await response.read() == data


# --- configuration ------------------------------------------------------------------------


def test_missing_password_env_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FAKE_UPSTREAM_PASSWORD", raising=False)
    config = UpstreamConfig(
        name="hub",
        url="https://registry-1.docker.io",
        auth=mirror_config.AuthConfig(
            "basic", username="alice", password_env="FAKE_UPSTREAM_PASSWORD"
        ),
    )
    # Upstream() must fail before it ever uses the session, so none is needed.
    with pytest.raises(ConfigError) as caught:
        Upstream(config, session=None)  # type: ignore[arg-type]
    assert "password_env" in caught.value.key
    assert "hub" in caught.value.key
    assert "FAKE_UPSTREAM_PASSWORD" in str(caught.value)
