"""A fault-injection upstream registry (aiohttp on loopback): it holds blobs and one
manifest, and on command drops the connection after N bytes, stalls, answers 500 every
other time, sends more bytes than it declares, or waits before its first byte. It serves
manifests under any Content-Type (or none), or a maintenance page instead, and lists tags
in its own order and pages, misapplying `n` and ignoring `last`.

`serve_raw` puts the same registry behind a hand-written HTTP/1.1 server instead, for what
aiohttp's server will not send: bytes past an answer's declared end (a whole second
answer, say) on a kept-alive connection, in the same write or later while it idles.

Only for what a real docker-registry cannot be made to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web

CHUNK = 64 * 1024
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
UNTYPED = web.RequestKey("untyped", bool)  # a manifest answer sent without a Content-Type


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    status: int
    authorization: str | None = None  # raw server: the request's Authorization header


@dataclass
class FaultyUpstream:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)  # by tag and by digest
    seen: list[Seen] = field(default_factory=list)
    ranges: bool = True  # honour `Range: bytes=N-`
    drop_after: int = 0  # with `drops` > 0: cut the connection after this many body bytes
    drops: int = 0  # how many GETs of a blob are cut
    stall_after: int = 0  # with `stalls` > 0: stop sending after this many body bytes
    stalls: int = 0
    fail_every_other: bool = False  # 500 for every other request
    fail_always: bool = False
    # Sent after the blob, past its declared length (aiohttp's server cuts it to the declared
    # length: only a chunked answer carries it); the raw server sends it after every answer.
    extra: bytes = b""
    extra_delay: float = 0.0  # raw server: 0 sends `extra` in the answer's write, else later
    extra_sent: asyncio.Event = field(default_factory=asyncio.Event)  # raw server: it went
    connections: int = 0  # raw server: how many the clients opened
    chunked: bool = False  # no Content-Length
    first_byte_delay: float = 0.0
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends stalls
    requested: asyncio.Event = field(default_factory=asyncio.Event)  # a blob GET came in
    url: str = ""
    manifest_type: str | None = MANIFEST_TYPE  # Content-Type of manifests; None: none at all
    maintenance: bool = False  # manifests and tags/list answered 200 with an HTML page
    tags: list[str] = field(default_factory=list)  # tags/list, in this order, sorted or not
    tags_page: int = 0  # > 0: tags/list in pages of this many, linked by a cursor of its own
    tags_link_loops: bool = False  # every page links back to the first

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def add_manifest(self, tag: str, layer: str) -> str:
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": layer, "size": len(self.blobs[layer])},
                "layers": [],
            }
        ).encode()  # fmt: skip
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[tag] = self.manifests[digest] = body
        return digest

    def raw_answer(self, method: str, path: str) -> tuple[int, bytes]:
        """The status and the whole HTTP/1.1 answer (head and body) of the raw server."""
        kind, _, key = path.rpartition("/")
        body = self.manifests.get(key) if kind.endswith("/manifests") else None
        if kind.endswith("/blobs"):
            body = self.blobs.get(key)
        status = 500 if self._failing_now() else 200 if body is not None else 404
        headers = {"Content-Type": "application/octet-stream"}
        if status != 200 or body is None:
            body, headers = b'{"errors":[{"code":"X","message":"x"}]}', {}
        elif kind.endswith("/manifests"):
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            headers = {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": digest}
        headers["Content-Length"] = str(len(body))
        head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return status, (head + "\r\n").encode() + (body if method == "GET" else b"")

    async def serve_raw(self) -> asyncio.Server:
        """This registry on a loopback port of the raw server; sets `url`."""
        server = await asyncio.start_server(self._raw_connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return server

    async def _raw_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answers requests in turn, keeping the connection until the client closes it."""
        self.connections += 1
        try:
            for _ in range(1000):
                async with asyncio.timeout(30):
                    head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode().split("\r\n")
                method, path, _ = line.split(" ", 2)
                status, answer = self.raw_answer(method, path)
                names = {
                    name.lower(): value for name, _, value in (f.partition(": ") for f in fields)
                }
                self.seen.append(Seen(method, path, None, status, names.get("authorization")))
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

    def put_manifest(self, tag: str, body: bytes) -> str:
        """Serve `body` as it is under `tag` and under its digest; returns the digest."""
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[tag] = self.manifests[digest] = body
        return digest

    def gets(self, digest: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path.endswith(digest)]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self.blob)
        app.router.add_get("/v2/{name:.+}/manifests/{reference}", self.manifest)
        app.router.add_get("/v2/{name:.+}/tags/list", self.tag_list)
        app.on_response_prepare.append(_untyped)
        return app

    def _failing_now(self) -> bool:
        return self.fail_always or (self.fail_every_other and len(self.seen) % 2 == 1)

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        body = self.manifests.get(request.match_info["reference"])
        status = 500 if self._failing_now() else 200 if body is not None else 404
        self.seen.append(Seen(request.method, request.path, None, status))
        if status != 200 or body is None:
            return web.json_response({"errors": [{"code": "X", "message": "x"}]}, status=status)
        if self.maintenance:
            return _maintenance_page()
        headers = {"Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()}
        if self.manifest_type is None:
            request[UNTYPED] = True
        else:
            headers["Content-Type"] = self.manifest_type
        return web.Response(body=body, headers=headers)

    async def tag_list(self, request: web.Request) -> web.Response:
        """`self.tags` in their order; `n` counts from there, `last` is ignored."""
        status = 500 if self._failing_now() else 200
        self.seen.append(Seen(request.method, request.path_qs, None, status))
        if status != 200:
            return web.json_response({"errors": [{"code": "X", "message": "x"}]}, status=status)
        if self.maintenance:
            return _maintenance_page()
        listed = self.tags[: int(request.query["n"])] if "n" in request.query else self.tags
        headers = {}
        if self.tags_page:
            page = int(request.query.get("page", "0"))
            more = len(listed) > (page + 1) * self.tags_page
            listed = listed[page * self.tags_page : (page + 1) * self.tags_page]
            if more:
                after = 0 if self.tags_link_loops else page + 1
                headers["Link"] = f'<{request.path}?page={after}>; rel="next"'
        name = request.match_info["name"]
        return web.json_response({"name": name, "tags": listed}, headers=headers)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs.get(request.match_info["digest"])
        wanted = request.headers.get("Range")
        start = int(wanted[6:-1]) if wanted and self.ranges and data is not None else 0
        status = 500 if self._failing_now() else 404 if data is None else 206 if start else 200
        self.seen.append(Seen(request.method, request.path, wanted, status))
        self.requested.set()
        if self.first_byte_delay:
            await asyncio.sleep(self.first_byte_delay)
        if status >= 400 or data is None:
            return web.json_response({"errors": [{"code": "X", "message": "x"}]}, status=status)
        response = web.StreamResponse(status=status)
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not self.chunked:
            response.content_length = len(data) - start
        await response.prepare(request)
        await self._send(request, response, data[start:] + self.extra)
        return response

    async def _send(self, request: web.Request, response: web.StreamResponse, body: bytes) -> None:
        drop = self.drop_after if self.drops > 0 else None
        stall = self.stall_after if self.stalls > 0 else None
        self.drops -= drop is not None
        self.stalls -= stall is not None
        for offset in range(0, len(body), CHUNK):
            piece = body[offset : offset + CHUNK]
            if drop is not None and offset + len(piece) > drop:
                await response.write(piece[: drop - offset])
                await asyncio.sleep(0.1)  # the client reads what came, then the cut
                _cut(request)
                return
            if stall is not None and offset + len(piece) > stall:
                await response.write(piece[: stall - offset])
                await self.release.wait()
                _cut(request)  # released: the connection goes, as a stalled one would
                return
            await response.write(piece)
        await response.write_eof()


async def _untyped(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp gives every body a Content-Type by now; some registries send none."""
    if request.get(UNTYPED):
        response.headers.popall("Content-Type", None)


def _maintenance_page() -> web.Response:
    return web.Response(
        text="<html><body><h1>Down for maintenance</h1></body></html>", content_type="text/html"
    )


def _cut(request: web.Request) -> None:
    assert request.transport is not None
    request.transport.abort()  # as a broken connection looks
