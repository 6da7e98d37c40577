"""Around every handler: the one place errors become responses (OCI error JSON with the
error's status and headers), and the request metrics."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.errors import NotFound, RegistryError, Unsupported
from mirror.logs import HANDED_OFF
from mirror.metrics import Metrics

log = logging.getLogger(__name__)

METRICS = web.AppKey("metrics", Metrics)

API_VERSION = ("Docker-Distribution-Api-Version", "registry/2.0")


def error_response(error: RegistryError) -> web.Response:
    entry: dict[str, object] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        entry["detail"] = error.detail
    return web.json_response({"errors": [entry]}, status=error.status, headers=error.headers())


@web.middleware
async def registry_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as error:
        return error_response(error)
    except web.HTTPNotFound:
        return error_response(NotFound(f"no such endpoint: {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error_response(Unsupported(f"{request.method} is not supported by a mirror"))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(RegistryError("internal error in the mirror"))


async def api_version_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors included, names the API version, as distribution does."""
    response.headers.setdefault(*API_VERSION)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by route: a fixed name, never the path."""
    began = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if HANDED_OFF not in request:  # the primary counts it
            _count(request, status, began)


def _count(request: web.Request, status: int, began: float) -> None:
    route = request.match_info.route.name or "other"
    metrics = request.app[METRICS]
    metrics.http_requests.labels(route, request.method, str(status)).inc()
    metrics.http_duration.labels(route).observe(time.monotonic() - began)
