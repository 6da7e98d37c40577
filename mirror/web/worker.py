"""A worker process's routes (`workers` > 1): cache hits answered here, the same way the
primary answers them, and every other request handed, with its connection, to the
primary (handoff.py), which downloads, keeps the budget and evicts."""

from __future__ import annotations

from aiohttp import web

from mirror.reference import Digest, parse_accept, parse_digest, parse_manifest_reference
from mirror.web.handoff import Sender
from mirror.web.registry import BLOBS, MANIFESTS, echo_namespace, not_supported, route_of
from mirror.web.responses import blob_response, manifest_response, unchanged

SENDER = web.AppKey("sender", Sender)  # the channel to the primary


def add_routes(app: web.Application) -> None:
    name = "/v2/{name:[^?#]+?}"
    app.router.add_get(name + "/manifests/{reference}", cached_manifest, name="manifest")
    app.router.add_get(name + "/blobs/{digest}", cached_blob, name="blob")
    app.router.add_route("*", "/{tail:.*}", hand_off, name="hand_off")
    app.on_response_prepare.append(echo_namespace)


async def hand_off(request: web.Request) -> web.StreamResponse:
    """To the primary: the request, and the connection with it."""
    if request.method not in ("GET", "HEAD"):
        return await not_supported(request)
    await request.release()  # a body nobody reads, so the head is all there is to send
    return await request.app[SENDER].hand_off(request)


async def cached_manifest(request: web.Request) -> web.StreamResponse:
    route = await route_of(request)
    reference = parse_manifest_reference(request.match_info["reference"])
    parse_accept(request.headers.getall("Accept", ()))
    if isinstance(reference, Digest):
        found = await request.app[MANIFESTS].cached(route.upstream.access, reference)
        if found is not None:
            return manifest_response(request, found)
    return await hand_off(request)


async def cached_blob(request: web.Request) -> web.StreamResponse:
    route = await route_of(request)
    digest = parse_digest(request.match_info["digest"])
    cached = request.app[BLOBS].local(route.upstream.access, digest)
    if cached is None:
        return await hand_off(request)
    with cached:
        return await blob_response(
            request, cached, digest, client_has_it=unchanged(request, digest)
        )
