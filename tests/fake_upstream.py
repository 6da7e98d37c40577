"""The one fake upstream registry of the tests, for what a real docker-registry cannot be
made to do. Every test that needs a misbehaving upstream uses it.

`FakeUpstream` is a real aiohttp server on a loopback port (the `serve` and `fake_upstream`
fixtures of conftest.py start it), made of small parts, each holding its own knobs:

- `Blobs`: blobs by digest, answered with `Range`, in paced pieces, without a length, with
  bytes past their end, cut or stalled after N bytes, or late. The bytes stored under a
  digest are what is sent for it: a test makes the upstream lie about a blob's content or
  length by storing other bytes under its digest.
- `Manifests`: manifests by repository and reference, under any Content-Type or none, or a
  maintenance page instead; tags/list in the order the tags were stored, in pages behind a
  cursor of its own.
- `Auth`: Bearer tokens from its own token service (as Docker Hub), or Basic credentials on
  every request (as ECR).
- `Quota`: Docker Hub's pull quota, in `ratelimit-*` headers and 429s.
- Redirects: blob GETs to a `CDN` on another origin that refuses `Authorization` (as S3's
  presigned URLs do) or to a location on the same origin; manifest GETs through hops.

The server as a whole answers every request with a status, drops connections, hangs or
refuses every token on command (`mode`, `fail`), and records every request (`seen`).

`RawServer` puts the same blobs and manifests behind a hand-written HTTP/1.1 server, for what
aiohttp's server will not send: bytes past an answer's declared end (a whole second answer,
say) on a kept-alive connection, in the same write or later while it idles.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict, MultiDict
from yarl import URL

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCTET_STREAM = "application/octet-stream"
HOLD_LIMIT = 60.0  # a hang or a stall ends after this long, whatever happens
UNTYPED = web.RequestKey("untyped", bool)  # a manifest answer sent without a Content-Type

# ok: answer normally; status: answer `fail_status` to every /v2/ request; alternate: to
# every other request; drop: close the connection without an answer; hang: answer only
# once released; reject: 401 whatever credentials are sent (when `auth` wants any).
Mode = Literal["ok", "status", "alternate", "drop", "hang", "reject"]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_bytes(config: str | bytes, size: int = 0) -> bytes:
    """A small OCI manifest whose config is `config` (a label's bytes, or a blob's), so one
    per config; padded with spaces to at least `size`."""
    data = config.encode() if isinstance(config, str) else config
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(data),
            "size": len(data),
        },
        "layers": [],
    }
    raw = json.dumps(body, indent=2).encode()
    return raw + b" " * max(size - len(raw), 0)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def oci_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message}]}, status=status)


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
    def path_qs(self) -> str:
        return f"{self.path}?{urlencode(list(self.query.items()))}" if self.query else self.path

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")

    @property
    def range(self) -> str | None:
        return self.headers.get("Range")


def recorder(seen: list[Seen]) -> Middleware:
    """A middleware appending every request, with the status it got, to `seen`."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        entry = Seen.of(request)
        seen.append(entry)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            entry.status = exc.status
            raise
        entry.status = response.status
        return response

    return record


async def held(event: asyncio.Event) -> None:
    """Until `event` is set, or HOLD_LIMIT has passed."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), HOLD_LIMIT)


def cut(request: web.Request) -> None:
    assert request.transport is not None
    request.transport.abort()  # as a broken connection looks


# --- the parts -------------------------------------------------------------------------


@dataclass
class Blobs:
    """Blobs by digest, and how their GETs misbehave (a HEAD never does)."""

    release: asyncio.Event  # ends stalls
    data: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True  # honour `Range: bytes=N-` with a 206
    chunked: bool = False  # no Content-Length
    extra: bytes = b""  # sent past the blob: aiohttp's server drops it unless `chunked`
    piece: int = 64 * 1024  # bytes written at a time
    pause: float = 0.0  # seconds after each piece
    first_byte_delay: float = 0.0
    drop_after: int = 0  # with `drops` > 0: cut the connection after this many body bytes
    drops: int = 0  # how many GETs are cut
    stall_after: int = 0  # with `stalls` > 0: send nothing more after this many body bytes
    stalls: int = 0  # how many GETs stall, until `release`
    resume: bool = False  # a released stall sends the rest (else its connection is cut)
    requested: asyncio.Event = field(default_factory=asyncio.Event)  # a GET came in
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # a GET stalled
    last_piece_at: float | None = None  # when the last piece of a body was sent (monotonic)
    # As a reverse proxy with gzip on: every body (manifests' too) compressed for a client
    # that accepts gzip.
    compress: bool = False

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        self.data[digest] = data
        return digest

    async def answer(self, request: web.Request, digest: str) -> web.StreamResponse:
        """The GET or HEAD of `digest`."""
        data = self.data.get(digest)
        if request.method == "GET":
            self.requested.set()
            if self.first_byte_delay:
                await asyncio.sleep(self.first_byte_delay)
        if data is None:
            return oci_error(404, "BLOB_UNKNOWN", f"{digest} unknown")
        if request.method == "HEAD":
            return web.Response(body=data, content_type=OCTET_STREAM)
        wanted = request.headers.get("Range")
        start = int(wanted[6:-1]) if wanted and self.ranges else 0
        response = web.StreamResponse(status=206 if start else 200)
        response.content_type = OCTET_STREAM
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not self.chunked:
            response.content_length = len(data) - start
        if self.compress:
            response.enable_compression()
        await response.prepare(request)
        # A view, not a copy: tests measure the memory of the process this runs in.
        await self._send(request, response, memoryview(data)[start:])
        return response

    async def _send(
        self, request: web.Request, response: web.StreamResponse, body: memoryview
    ) -> None:
        drop = self.drop_after if self.drops > 0 else None
        stall = self.stall_after if self.stalls > 0 else None
        self.drops -= drop is not None
        self.stalls -= stall is not None
        for offset in range(0, len(body), self.piece):
            piece = body[offset : offset + self.piece]
            if drop is not None and offset + len(piece) > drop:
                await response.write(piece[: drop - offset])
                await asyncio.sleep(0.1)  # the client reads what came, then the cut
                cut(request)
                return
            if stall is not None and offset + len(piece) > stall:
                await response.write(piece[: stall - offset])
                self.stalled.set()
                await held(self.release)
                if not self.resume:
                    cut(request)  # as a stalled connection goes in the end
                    return
                piece, stall = piece[stall - offset :], None
            if offset + self.piece >= len(body):
                self.last_piece_at = time.monotonic()
            await response.write(piece)
            if self.pause:
                await asyncio.sleep(self.pause)
        if self.extra:
            await response.write(self.extra)
        await response.write_eof()


@dataclass
class Manifests:
    """Manifests by repository and reference (a tag, or the digest), and the tags they make."""

    bodies: dict[tuple[str, str], bytes] = field(default_factory=dict)
    media_type: str | None = OCI_MANIFEST  # the Content-Type sent; None: none at all
    maintenance: bool = False  # manifests and tags/list answered 200 with an HTML page
    chunked: bool = False  # no Content-Length
    page: int = 0  # > 0: tags/list in pages of this many, linked by a cursor of its own
    link_loops: bool = False  # every page links back to the first

    def put(self, name: str, tag: str, body: bytes) -> str:
        """Serve `body` under `tag` and under its digest; returns the digest."""
        digest = sha256(body)
        self.bodies[(name, tag)] = self.bodies[(name, digest)] = body
        return digest

    def tags(self, name: str) -> list[str]:
        """In the order they were first stored."""
        return [ref for (repo, ref) in self.bodies if repo == name and ":" not in ref]

    def answer(
        self, request: web.Request, name: str, reference: str, headers: dict[str, str]
    ) -> web.Response:
        body = self.bodies.get((name, reference))
        if body is None:
            return oci_error(404, "MANIFEST_UNKNOWN", f"{name}:{reference} unknown")
        if self.maintenance:
            return maintenance_page()
        headers = {**headers, "Docker-Content-Digest": sha256(body)}
        if self.media_type is None:
            request[UNTYPED] = True
        else:
            headers["Content-Type"] = self.media_type
        response = web.Response(body=body, headers=headers)
        if self.chunked:
            response.enable_chunked_encoding()
        return response

    def listing(self, request: web.Request, name: str) -> web.Response:
        """tags/list in the stored order; `n` counts from there, `last` is ignored."""
        if self.maintenance:
            return maintenance_page()
        tags = self.tags(name)
        if not tags:
            return oci_error(404, "NAME_UNKNOWN", f"{name} unknown")
        if "n" in request.query:
            tags = tags[: int(request.query["n"])]
        headers = {}
        if self.page:
            page = int(request.query.get("page", "0"))
            more = len(tags) > (page + 1) * self.page
            tags = tags[page * self.page : (page + 1) * self.page]
            if more:
                after = 0 if self.link_loops else page + 1
                headers["Link"] = f'<{request.path}?page={after}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)


def maintenance_page() -> web.Response:
    return web.Response(
        text="<html><body><h1>Down for maintenance</h1></body></html>", content_type="text/html"
    )


@dataclass
class Auth:
    """What the registry wants: nothing (`scheme` None), Bearer tokens from its own /token
    realm, or Basic `credentials` on every request.

    `realm_host` is the host the challenge names: 127.0.0.1 (the registry's own) or
    localhost (the same server, but another site as far as the mirror can tell).
    """

    scheme: Literal["bearer", "basic"] | None = None
    credentials: tuple[str, str] | None = None  # bearer: what the token service wants, if any
    realm_host: str = "127.0.0.1"
    token_status: int = 200
    token_delay: float = 0.05
    expires_in: int | None = 300
    refuse_next: int = 0  # refuse this many more requests whatever they carry
    tokens: dict[str, str] = field(default_factory=dict)  # token -> scope granted
    token_expiry: dict[str, float] = field(default_factory=dict)  # token -> loop time

    def revoke(self) -> None:
        """Forget every token issued, as an upstream rotating its signing key would."""
        self.tokens.clear()

    def challenge(self, port: int, scope: str) -> web.Response:
        realm = f"http://{self.realm_host}:{port}"
        if self.scheme == "basic":
            challenge = f'Basic realm="{realm}/",service="ecr"'
        else:
            challenge = f'Bearer realm="{realm}/token",service="fake",scope="{scope}"'
        response = oci_error(401, "UNAUTHORIZED", "authentication required")
        response.headers["WWW-Authenticate"] = challenge
        return response

    def allows(self, authorization: str, scope: str | None) -> bool:
        """Whether `authorization` is good for `scope` (None: any scope)."""
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return False
        if self.scheme == "basic":
            return self.credentials is not None and authorization == basic(*self.credentials)
        kind, _, token = authorization.partition(" ")
        granted = self.tokens.get(token) if kind == "Bearer" else None
        expired = self.token_expiry.get(token, math.inf) <= asyncio.get_running_loop().time()
        return granted is not None and not expired and scope in (None, granted)

    async def issue(self, request: web.Request, token: str) -> web.Response:
        """The token service's answer: `token`, granted for the scope asked."""
        await asyncio.sleep(self.token_delay)
        if self.token_status != 200:
            return web.json_response({"details": "access denied"}, status=self.token_status)
        wanted = basic(*self.credentials) if self.credentials else None
        if wanted is not None and request.headers.get("Authorization") != wanted:
            return web.json_response({"details": "incorrect username or password"}, status=401)
        self.tokens[token] = request.query.get("scope", "")
        body: dict[str, object] = {"token": token, "issued_at": "2026-01-01T00:00:00Z"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
            self.token_expiry[token] = asyncio.get_running_loop().time() + self.expires_in
        return web.json_response(body)


@dataclass
class Quota:
    """Docker Hub's pull quota: a manifest GET spends a pull, a HEAD does not; both say what
    is left; a GET with none left is refused (429)."""

    remaining: int | None = None  # None: no quota, and no headers
    limit: int = 100
    window: int = 21600

    def spend(self, method: str) -> tuple[bool, dict[str, str]]:
        """Whether the request may go on, and the headers to send either way."""
        if self.remaining is None:
            return True, {}
        allowed = method != "GET" or self.remaining > 0
        if method == "GET" and allowed:
            self.remaining -= 1
        return allowed, {
            "ratelimit-limit": f"{self.limit};w={self.window}",
            "ratelimit-remaining": f"{self.remaining};w={self.window}",
            "docker-ratelimit-source": "127.0.0.1",
        }


# --- the registry ----------------------------------------------------------------------


class FakeUpstream:
    """The registry: manifests, blobs and tags/list under /v2/, a token service at /token, a
    same-origin blob location at /data/<digest> that wants a token too, and manifest hops at
    /hop/<left>."""

    def __init__(self) -> None:
        self.release = asyncio.Event()  # ends every hang and stall
        self.blobs = Blobs(self.release)
        self.manifests = Manifests()
        self.auth = Auth()
        self.quota = Quota()
        self.blob_redirect: str | None = None  # blob GETs go to <this>/<digest>: a URL or path
        self.manifest_redirects = 0  # same-origin hops before a manifest GET is answered
        self.mode: Mode = "ok"
        self.fail_status = 503
        self.fail_headers: dict[str, str] = {}
        self.seen: list[Seen] = []
        self.port = 0
        self.app = web.Application(
            middlewares=[recorder(self.seen), self._misbehave, self._compressing]
        )
        self.app.router.add_get("/token", self._token)
        self.app.router.add_get("/v2/{name:.+}/manifests/{reference}", self._manifest)
        self.app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        self.app.router.add_get("/v2/{name:.+}/tags/list", self._tags)
        self.app.router.add_get("/hop/{left:\\d+}", self._hop)
        self.app.router.add_get("/data/{digest}", self._data)
        self.app.on_response_prepare.append(_untyped)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @web.middleware
    async def _compressing(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if self.blobs.compress and not response.prepared:
            response.enable_compression()
        return response

    def fail(
        self, status: int, headers: dict[str, str] | None = None, every_other: bool = False
    ) -> None:
        """Answer `status` to every /v2/ request (or every other one) from now on."""
        self.mode = "alternate" if every_other else "status"
        self.fail_status, self.fail_headers = status, headers or {}

    def requests(
        self, method: str, fragment: str = "/v2/", status: int | None = None
    ) -> list[Seen]:
        """Requests seen with `method` and `fragment` in the path (and `status`, if given)."""
        return [
            s
            for s in self.seen
            if s.method == method and fragment in s.path and status in (None, s.status)
        ]

    def count(self, method: str, fragment: str = "/v2/", status: int | None = None) -> int:
        return len(self.requests(method, fragment, status))

    @property
    def token_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.path == "/token"]

    # --- the server ----------------------------------------------------------------------

    @web.middleware
    async def _misbehave(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v2/"):
            return await handler(request)
        failing = self.mode == "status" or (self.mode == "alternate" and len(self.seen) % 2 == 0)
        if failing:
            response = oci_error(self.fail_status, "FAKE", f"fake {self.fail_status}")
            response.headers.update(self.fail_headers)
            return response
        if self.mode == "drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # nothing can be answered on a closed connection
        if self.mode == "hang":
            await held(self.release)
        return await handler(request)

    def _guard(self, request: web.Request, scope: str | None) -> web.Response | None:
        """None when the request may go on, else the 401 to answer."""
        authorization = request.headers.get("Authorization", "")
        if self.auth.scheme is None or (
            self.mode != "reject" and self.auth.allows(authorization, scope)
        ):
            return None
        return self.auth.challenge(self.port, scope or "repository:unknown:pull")

    async def _token(self, request: web.Request) -> web.Response:
        return await self.auth.issue(request, f"token-{len(self.token_requests)}")

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        name, reference = request.match_info["name"], request.match_info["reference"]
        refused = self._guard(request, f"repository:{name}:pull")
        if refused is not None:
            return refused
        if self.manifest_redirects:
            query = urlencode({"name": name, "reference": reference})
            raise web.HTTPTemporaryRedirect(f"/hop/{self.manifest_redirects - 1}?{query}")
        return await self._answer_manifest(request, name, reference)

    async def _hop(self, request: web.Request) -> web.StreamResponse:
        """Same-origin redirects that still want the token: the last hop answers."""
        name, reference = request.query["name"], request.query["reference"]
        refused = self._guard(request, f"repository:{name}:pull")
        if refused is not None:
            return refused
        left = int(request.match_info["left"])
        if left > 0:
            raise web.HTTPTemporaryRedirect(f"/hop/{left - 1}?{request.query_string}")
        return await self._answer_manifest(request, name, reference)

    async def _answer_manifest(
        self, request: web.Request, name: str, reference: str
    ) -> web.StreamResponse:
        allowed, headers = self.quota.spend(request.method)
        if not allowed:
            refused = oci_error(429, "TOOMANYREQUESTS", "You have reached your pull rate limit.")
            refused.headers.update(headers)
            return refused
        return self.manifests.answer(request, name, reference, headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        name, digest = request.match_info["name"], request.match_info["digest"]
        refused = self._guard(request, f"repository:{name}:pull")
        if refused is not None:
            return refused
        if self.blob_redirect is not None and digest in self.blobs.data:
            raise web.HTTPTemporaryRedirect(f"{self.blob_redirect}/{digest}?sig=fake")
        return await self.blobs.answer(request, digest)

    async def _data(self, request: web.Request) -> web.StreamResponse:
        refused = self._guard(request, None)
        if refused is not None:
            return refused
        return await self.blobs.answer(request, request.match_info["digest"])

    async def _tags(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        refused = self._guard(request, f"repository:{name}:pull")
        if refused is not None:
            return refused
        return self.manifests.listing(request, name)


async def _untyped(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp gives every body a Content-Type by now; some registries send none."""
    if request.get(UNTYPED):
        response.headers.popall("Content-Type", None)


class CDN:
    """A blob host on another origin, as Hub's CDN or S3: it serves `blobs` as the registry
    would (pace and faults included), and answers 400 to any request carrying
    `Authorization`."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs
        self.release = blobs.release
        self.seen: list[Seen] = []
        self.port = 0
        self.app = web.Application(middlewares=[recorder(self.seen)])
        self.app.router.add_get("/blobs/{digest}", self._blob)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers:
            return web.Response(
                status=400,
                text="<Error><Code>InvalidArgument</Code>"
                "<Message>Only one auth mechanism allowed</Message></Error>",
                content_type="application/xml",
            )
        return await self.blobs.answer(request, request.match_info["digest"])


class Served(Protocol):
    app: web.Application
    port: int
    release: asyncio.Event


S = TypeVar("S", bound=Served)


class Serve(Protocol):
    """The `serve` fixture: starts a fake on a free loopback port and returns it."""

    async def __call__(self, fake: S) -> S: ...


# --- bytes aiohttp's server will not send ----------------------------------------------

TARGET = re.compile(r"/v2/(?P<name>.+)/(?P<kind>blobs|manifests)/(?P<reference>[^/?]+)")


class RawServer:
    """`upstream`'s blobs and manifests (no auth, no faults) behind a hand-written HTTP/1.1
    server that sends `extra` after every answer: in the answer's write, or `extra_delay`
    seconds later while the connection idles. It keeps each connection until the client
    closes it, and records requests in `upstream.seen`."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.extra = b""
        self.extra_delay = 0.0
        self.extra_sent = asyncio.Event()  # `extra` went out
        self.connections = 0  # how many the clients opened
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def answer(self, method: str, target: str) -> tuple[int, bytes]:
        """The status and the whole answer (head and body) to `method` on `target`."""
        found = TARGET.fullmatch(URL(target).path)
        body, headers = None, {"Content-Type": OCTET_STREAM}
        if found is not None and found["kind"] == "blobs":
            body = self.upstream.blobs.data.get(found["reference"])
        elif found is not None:
            body = self.upstream.manifests.bodies.get((found["name"], found["reference"]))
            headers = {"Content-Type": OCI_MANIFEST}
        status = 404 if body is None else 200
        if body is None:
            body, headers = b'{"errors":[{"code":"NOT_FOUND","message":"unknown"}]}', {}
        elif found is not None and found["kind"] == "manifests":
            headers["Docker-Content-Digest"] = sha256(body)
        headers["Content-Length"] = str(len(body))
        head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return status, (head + "\r\n").encode() + (body if method == "GET" else b"")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers requests in turn until the client closes the connection."""
        self.connections += 1
        try:
            for _ in range(1000):
                async with asyncio.timeout(30):
                    head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode().split("\r\n")
                method, target, _ = line.split(" ", 2)
                status, answer = self.answer(method, target)
                headers = CIMultiDict(
                    (name, value) for name, _, value in (f.partition(": ") for f in fields if f)
                )
                url = URL(target)
                self.upstream.seen.append(
                    Seen(method, url.path, MultiDict(url.query), headers, status)
                )
                writer.write(answer if self.extra_delay else answer + self.extra)
                await writer.drain()
                if self.extra_delay:
                    await asyncio.sleep(self.extra_delay)
                    writer.write(self.extra)
                    await writer.drain()
                self.extra_sent.set()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
