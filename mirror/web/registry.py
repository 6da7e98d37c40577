"""The /v2/ routes of the OCI distribution API, read side.

Each handler parses and validates what the client sent (reference.py), asks the
pull-through proxy, and turns its answer into a response (responses.py). Push methods are
refused. A worker process has routes of its own (worker.py).
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from yarl import URL

from mirror.access import Gate
from mirror.errors import (
    LoginRequired,
    PaginationInvalid,
    Unsupported,
)
from mirror.logs import UPSTREAM_NAME
from mirror.proxy.blobs import BlobProxy
from mirror.proxy.manifests import ManifestProxy
from mirror.reference import (
    OCI_INDEX,
    Digest,
    parse_accept,
    parse_digest,
    parse_manifest_reference,
    validate_name,
)
from mirror.routing import Route, Router
from mirror.web.responses import blob_response, manifest_response, unchanged

log = logging.getLogger(__name__)

GATE = web.AppKey("gate", Gate)
BLOBS = web.AppKey("blobs", BlobProxy)
MANIFESTS = web.AppKey("manifests", ManifestProxy)
ROUTER = web.AppKey("router", Router)
NAMESPACE = web.RequestKey("namespace", str)  # the `ns` that chose the upstream

_DIGITS = re.compile(r"[0-9]+")  # ASCII only: `str.isdigit` takes "²", which int() refuses
_MAX_N_DIGITS = 9  # an `n` this long asks for more tags than any repository has


def add_routes(app: web.Application) -> None:
    name = "/v2/{name:[^?#]+?}"
    app.router.add_get("/v2/", ping, name="ping")
    app.router.add_get(name + "/manifests/{reference}", manifest, name="manifest")
    app.router.add_get(name + "/blobs/{digest}", blob, name="blob")
    app.router.add_get(name + "/tags/list", tags, name="tags")
    app.router.add_get(name + "/referrers/{digest}", referrers, name="referrers")
    app.router.add_route("*", "/v2/{tail:.*}", not_supported, name="unsupported")
    app.on_response_prepare.append(echo_namespace)


async def route_of(request: web.Request) -> Route:
    """The upstream this request is for, and the repository's name there; for an
    `authenticated` upstream, only with a login to the mirror."""
    name = validate_name(request.match_info["name"])
    route = request.app[ROUTER].route(name, request.query.get("ns"))
    if route.namespace is not None:
        request[NAMESPACE] = route.namespace
    request[UPSTREAM_NAME] = route.upstream.name
    if route.upstream.access == "authenticated":
        await _login(request)
    return route


async def _login(request: web.Request) -> None:
    await request.app[GATE].require(request.headers.get("Authorization"), request.remote or "")


async def echo_namespace(request: web.Request, response: web.StreamResponse) -> None:
    """As the distribution spec suggests for `ns`; only a namespace that routed is echoed."""
    if NAMESPACE in request:
        response.headers["OCI-Namespace"] = request[NAMESPACE]


async def ping(request: web.Request) -> web.Response:
    """With logins on, the Basic challenge goes out with a 200 as long as anonymous
    clients may pull something: podman and skopeo take a challenge from any answer to the
    ping and then send their credentials, while dockerd, without credentials for the
    mirror, would give up on a 401 and fetch from Docker Hub itself."""
    gate = request.app[GATE]
    if not gate.enabled:
        return web.json_response({})
    if not gate.anyone_may_pull or not gate.anonymous(request.headers.get("Authorization")):
        await _login(request)
    return web.json_response({}, headers=LoginRequired("").headers())


async def manifest(request: web.Request) -> web.Response:
    route = await route_of(request)
    reference = parse_manifest_reference(request.match_info["reference"])
    accept = parse_accept(request.headers.getall("Accept", ()))
    proxy = request.app[MANIFESTS]
    if isinstance(reference, Digest):
        found = await proxy.by_digest(route, reference, accept)
    else:
        found = await proxy.by_tag(route, reference, accept)
    return manifest_response(request, found)


async def blob(request: web.Request) -> web.StreamResponse:
    route = await route_of(request)
    digest = parse_digest(request.match_info["digest"])
    # A client that has the bytes needs to learn only that they exist: no download.
    client_has_it = unchanged(request, digest)
    body = request.method == "GET" and not client_has_it
    async with request.app[BLOBS].answer(route, digest, body=body) as found:
        return await blob_response(request, found, digest, client_has_it=client_has_it)


async def tags(request: web.Request) -> web.Response:
    """The repository's tags in lexical order, paged by `n` and `last` by the mirror."""
    route = await route_of(request)
    n = _page_size(request.query.get("n"))
    last = request.query.get("last")
    page = await request.app[MANIFESTS].tags(route, n, last)
    headers = {}
    if page.more and n is not None:
        headers["Link"] = _client_link(request, n, page.tags[-1])
    body = {"name": request.match_info["name"], "tags": list(page.tags)}
    return web.json_response(body, headers=headers)


def _page_size(text: str | None) -> int | None:
    if text is None:
        return None
    if not _DIGITS.fullmatch(text):
        raise PaginationInvalid(f"invalid n={text!r}: must be a non-negative number")
    return int(text.lstrip("0")[:_MAX_N_DIGITS] or "0")  # past any tag count: all of them


def _client_link(request: web.Request, n: int, last: str) -> str:
    """`Link: <…?n=&last=>; rel="next"` to the next page, on the path the client asked (its
    prefix, and its `ns`): following it reaches the same upstream through the mirror."""
    query = {"n": str(n), "last": last}
    if "ns" in request.query:
        query["ns"] = request.query["ns"]
    return f'<{URL.build(path=request.path, query=query)}>; rel="next"'


async def referrers(request: web.Request) -> web.Response:
    route = await route_of(request)
    digest = parse_digest(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    body = await request.app[MANIFESTS].referrers(route, digest, artifact_type)
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=body, headers=headers)


async def not_supported(request: web.Request) -> web.Response:
    if request.method in ("GET", "HEAD"):
        raise web.HTTPNotFound()
    raise Unsupported(f"{request.method} is not supported: this registry is a read-only mirror")
