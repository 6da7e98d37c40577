"""In-process fake upstreams: a registry with a Docker-Hub-like token service, and a CDN.

A real docker-registry cannot show what these can: Hub's Bearer token flow, blob GETs
redirected to a CDN that refuses `Authorization` (as S3 presigned URLs do), 429s, 5xx,
dropped connections and upstreams that never answer. Both are real aiohttp servers on
127.0.0.1 port 0; nothing else is ever contacted.

Nothing here is a fixture: tests wrap `FakeRegistry` and `FakeCDN` with `aiohttp_server`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, MultiDict
from pytest_aiohttp import AiohttpServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
HANG_LIMIT = 10.0  # a hanging handler gives up after this long, whatever happens

# ok: answer normally; status: answer `fail_status` to every /v2/ request;
# drop: close the connection without an answer; hang: never answer;
# reject: 401 with a Bearer challenge whatever token is sent.
Mode = Literal["ok", "status", "drop", "hang", "reject"]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_bytes(label: str, size: int = 0) -> bytes:
    """A small OCI manifest, distinct per `label`; padded with spaces to at least `size`."""
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(label.encode()),
            "size": len(label),
        },
        "layers": [],
    }
    raw = json.dumps(body, indent=2).encode()
    return raw + b" " * max(size - len(raw), 0)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def oci_error(status: int, code: str, message: str) -> web.Response:
    body = {"errors": [{"code": code, "message": message}]}
    return web.json_response(body, status=status)


@dataclass
class Seen:
    """One request as a fake received it, and the status it answered (None: no answer)."""

    method: str
    path: str
    query: MultiDict[str]
    headers: CIMultiDict[str]
    status: int | None = None

    @classmethod
    def of(cls, request: web.Request) -> Seen:
        return cls(
            request.method, request.path, MultiDict(request.query), CIMultiDict(request.headers)
        )

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")


@dataclass
class FakeRegistry:
    """A registry that wants Bearer tokens from its own /token realm (when `auth`).

    `realm_host` is the host named in the challenge's realm: `127.0.0.1` (the registry's
    own host) or `localhost` (the same server, but another site as far as the mirror can
    tell).
    """

    auth: bool = True
    realm_host: str = "127.0.0.1"
    mode: Mode = "ok"
    fail_status: int = 503
    fail_headers: dict[str, str] = field(default_factory=dict)
    token_status: int = 200
    expires_in: int | None = 300
    token_delay: float = 0.05
    chunked: bool = False  # manifests without Content-Length
    stall_blobs: bool = False  # send half of a blob, then nothing more
    blob_redirect: str | None = None  # where blob GETs are redirected: base URL or path
    manifest_redirects: int = 0  # same-origin hops before a manifest GET is answered
    # Docker Hub's pull quota: remaining manifest GETs (HEADs are free), None for no quota.
    quota: int | None = None
    quota_limit: int = 100
    quota_window: int = 21600
    credentials: tuple[str, str] | None = None  # what the token service requires, if any
    # ECR-style: Basic auth with these credentials on every request, no token service.
    basic_auth: tuple[str, str] | None = None
    refuse_next: int = 0  # answer this many more requests 401 whatever they carry
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)  # token -> scope granted
    token_expiry: dict[str, float] = field(default_factory=dict)  # token -> loop time
    port: int = 0

    def __post_init__(self) -> None:
        self.release = asyncio.Event()
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/token", self._token)
        app.router.add_get("/v2/", self._ping)
        app.router.add_get("/v2/{name:.+}/manifests/{reference}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/{name:.+}/tags/list", self._tags)
        app.router.add_get("/hop/{left:\\d+}", self._hop)
        app.router.add_get("/data/{digest}", self._data)
        self.app = app

    # --- test-side helpers -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def put_manifest(self, name: str, tag: str, body: bytes) -> str:
        """Serve `body` under `tag` and under its digest; returns the digest."""
        digest = sha256(body)
        self.manifests[(name, tag)] = (body, OCI_MANIFEST)
        self.manifests[(name, digest)] = (body, OCI_MANIFEST)
        return digest

    def put_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def count(self, method: str, fragment: str = "/v2/", status: int | None = None) -> int:
        """Requests seen with `method` and `fragment` in the path (and `status`, if given)."""
        return sum(
            1
            for s in self.seen
            if s.method == method and fragment in s.path and status in (None, s.status)
        )

    @property
    def token_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.path == "/token"]

    def revoke(self) -> None:
        """Forget every token issued, as an upstream rotating its signing key would."""
        self.tokens.clear()

    def fail(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.mode, self.fail_status, self.fail_headers = "status", status, headers or {}

    # --- the server ----------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        seen = Seen.of(request)
        self.seen.append(seen)
        try:
            response: web.StreamResponse | None = None
            if request.path.startswith("/v2/") and request.path != "/v2/":
                response = await self._failure(request)
            if response is None:
                response = await handler(request)
        except web.HTTPException as exc:
            seen.status = exc.status
            raise
        seen.status = response.status
        return response

    async def _failure(self, request: web.Request) -> web.StreamResponse | None:
        if self.mode == "status":
            return web.json_response(
                {"errors": [{"code": "FAKE", "message": f"fake {self.fail_status}"}]},
                status=self.fail_status,
                headers=self.fail_headers,
            )
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # nothing can be answered on a closed connection
        if self.mode == "hang":
            await self._hang()
        return None

    async def _hang(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), HANG_LIMIT)

    def _challenge(self, scope: str) -> web.Response:
        realm = f"http://{self.realm_host}:{self.port}/token"
        challenge = f'Bearer realm="{realm}",service="fake",scope="{scope}"'
        if self.basic_auth is not None:
            challenge = f'Basic realm="http://{self.realm_host}:{self.port}/",service="ecr"'
        response = oci_error(401, "UNAUTHORIZED", "authentication required")
        response.headers["WWW-Authenticate"] = challenge
        return response

    def _authorized(self, request: web.Request, scope: str | None) -> bool:
        """Whether the request carries a token granted for `scope` (None: any scope)."""
        if not self.auth:
            return True
        if self.mode == "reject":
            return False
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return False
        header = request.headers.get("Authorization", "")
        if self.basic_auth is not None:
            return header == basic(*self.basic_auth)
        scheme, _, token = header.partition(" ")
        granted = self.tokens.get(token) if scheme == "Bearer" else None
        expired = self.token_expiry.get(token, math.inf) <= asyncio.get_running_loop().time()
        return granted is not None and not expired and (scope is None or granted == scope)

    def _guard(self, request: web.Request, name: str) -> web.Response | None:
        scope = f"repository:{name}:pull"
        return None if self._authorized(request, scope) else self._challenge(scope)

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _token(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.token_delay)
        if self.token_status != 200:
            return web.json_response({"details": "access denied"}, status=self.token_status)
        wanted = basic(*self.credentials) if self.credentials else None
        if wanted is not None and request.headers.get("Authorization") != wanted:
            return web.json_response({"details": "incorrect username or password"}, status=401)
        token = f"token-{len(self.token_requests)}"  # this request is counted already
        self.tokens[token] = request.query.get("scope", "")
        body: dict[str, object] = {"token": token, "issued_at": "2026-01-01T00:00:00Z"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
            self.token_expiry[token] = asyncio.get_running_loop().time() + self.expires_in
        return web.json_response(body)

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        name, reference = request.match_info["name"], request.match_info["reference"]
        refused = self._guard(request, name)
        if refused is not None:
            return refused
        if self.manifest_redirects and "hopped" not in request.query:
            query = {"name": name, "reference": reference}
            raise web.HTTPTemporaryRedirect(
                f"/hop/{self.manifest_redirects - 1}?" + urlencode(query)
            )
        return await self._serve_manifest(request, name, reference)

    async def _hop(self, request: web.Request) -> web.StreamResponse:
        """Same-origin redirects that still need the token: the last hop answers."""
        name, reference = request.query["name"], request.query["reference"]
        refused = self._guard(request, name)
        if refused is not None:
            return refused
        left = int(request.match_info["left"])
        if left > 0:
            raise web.HTTPTemporaryRedirect(f"/hop/{left - 1}?{request.query_string}")
        return await self._serve_manifest(request, name, reference)

    async def _serve_manifest(
        self, request: web.Request, name: str, reference: str
    ) -> web.StreamResponse:
        quota = self._spend_quota(request)
        if quota is not None and quota.status == 429:
            return quota
        found = self.manifests.get((name, reference))
        if found is None:
            return oci_error(404, "MANIFEST_UNKNOWN", f"{name}:{reference} unknown")
        body, media_type = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": sha256(body)}
        if quota is not None:
            headers.update(quota.headers)
        if not self.chunked:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 64 * 1024):
            await response.write(body[start : start + 64 * 1024])
        await response.write_eof()
        return response

    def _spend_quota(self, request: web.Request) -> web.Response | None:
        """Hub's accounting: a GET spends a pull, a HEAD does not; both say what is left.

        Returns None without a quota, else a 429 when it is spent, else a response
        carrying just the headers to add.
        """
        if self.quota is None:
            return None
        exhausted = request.method == "GET" and self.quota <= 0
        if request.method == "GET" and not exhausted:
            self.quota -= 1
        headers = {
            "ratelimit-limit": f"{self.quota_limit};w={self.quota_window}",
            "ratelimit-remaining": f"{self.quota};w={self.quota_window}",
            "docker-ratelimit-source": "127.0.0.1",
        }
        if exhausted:
            response = oci_error(429, "TOOMANYREQUESTS", "You have reached your pull rate limit.")
            response.headers.update(headers)
            return response
        return web.Response(headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        name, digest = request.match_info["name"], request.match_info["digest"]
        refused = self._guard(request, name)
        if refused is not None:
            return refused
        if digest not in self.blobs:
            return oci_error(404, "BLOB_UNKNOWN", f"{digest} unknown")
        if self.blob_redirect is not None:
            raise web.HTTPTemporaryRedirect(f"{self.blob_redirect}/{digest}?sig=fake")
        data = self.blobs[digest]
        if not self.stall_blobs:
            return web.Response(body=data, content_type="application/octet-stream")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        await self._hang()
        return response

    async def _data(self, request: web.Request) -> web.Response:
        """A same-origin blob location that, unlike a CDN, wants the token too."""
        if not self._authorized(request, None):
            return self._challenge("repository:unknown:pull")
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return oci_error(404, "BLOB_UNKNOWN", "unknown")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _tags(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        refused = self._guard(request, name)
        if refused is not None:
            return refused
        tags = sorted(ref for (repo, ref) in self.manifests if repo == name and ":" not in ref)
        if not tags:
            return oci_error(404, "NAME_UNKNOWN", f"{name} unknown")
        return web.json_response({"name": name, "tags": tags})


@dataclass
class FakeCDN:
    """A blob host like Hub's CDN or S3: 400 to any request carrying `Authorization`."""

    blobs: dict[str, bytes]
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_get("/blobs/{digest}", self._blob)

    async def _blob(self, request: web.Request) -> web.Response:
        seen = Seen.of(request)
        self.seen.append(seen)
        data = self.blobs.get(request.match_info["digest"])
        if seen.authorization is not None:
            response = web.Response(
                status=400,
                text="<Error><Code>InvalidArgument</Code>"
                "<Message>Only one auth mechanism allowed</Message></Error>",
                content_type="application/xml",
            )
        elif data is None:
            response = web.Response(status=404)
        else:
            response = web.Response(body=data, content_type="application/octet-stream")
        seen.status = response.status
        return response


class _Fake(Protocol):
    app: web.Application
    port: int


F = TypeVar("F", bound=_Fake)


async def serve(aiohttp_server: AiohttpServer, fake: F, host: str = "127.0.0.1") -> F:
    """Start `fake` on a free port of `host` (a loopback address)."""
    server = await aiohttp_server(fake.app, host=host)
    assert server.port is not None
    fake.port = server.port
    return fake


async def slow_blobs(
    aiohttp_server: AiohttpServer,
    blobs: dict[str, bytes],
    chunk: int = 32 * 1024,
    pause: float = 0.005,
) -> str:
    """A registry that sends blobs `chunk` bytes at a time, `pause` seconds apart, so
    downloads overlap and last; returns its base URL."""

    async def blob(request: web.Request) -> web.StreamResponse:
        data = blobs[request.match_info["digest"]]
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        for start in range(0, len(data), chunk):
            await response.write(data[start : start + chunk])
            await asyncio.sleep(pause)
        return response

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")
