"""Around every handler: the one place errors become responses (OCI error JSON with the
error's status and headers), the request metrics, and the answers under way (which a
shutdown waits for, then cuts)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.activity import Activity
from mirror.errors import NotFound, RegistryError, Unsupported
from mirror.logs import CACHE_RESULT, HANDED_OFF, UPSTREAM_NAME
from mirror.metrics import Metrics

log = logging.getLogger(__name__)

METRICS = web.AppKey("metrics", Metrics)
ACTIVITY = web.AppKey("activity", Activity)

CLIENT_LEFT = 499  # the status nginx logs for a client that left before its answer ended
CANCEL_WAIT = 2.0  # seconds cut answers get to unwind


class Answers:
    """The tasks answering requests now, each from its headers to its last byte."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self, grace: float) -> int:
        """Until all have ended, or `grace` seconds; then cancel the rest, and say how many."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        late = set(self._tasks)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=CANCEL_WAIT)
        return len(late)


ANSWERS = web.AppKey("answers", Answers)


class ClientLeft(web.StreamResponse):
    """What a handler's end looks like when its client left mid-answer: logged and counted
    as 499, never 500; nothing more is written to the connection."""

    def __init__(self) -> None:
        super().__init__(status=CLIENT_LEFT)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


API_VERSION = ("Docker-Distribution-Api-Version", "registry/2.0")


def error_response(error: RegistryError) -> web.Response:
    entry: dict[str, object] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        entry["detail"] = error.detail
    return web.json_response({"errors": [entry]}, status=error.status, headers=error.headers())


@web.middleware
async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Around every handler, in one layer (each costs a cached answer some microseconds):
    errors become OCI error responses; every request is counted and timed by route (a
    fixed name, never the path); what each manifest or blob answer served is recorded by
    repository (for the status page); and the answer is one under way until it ends."""
    began = time.monotonic()
    task = asyncio.current_task()
    if task is not None:  # aiohttp answers each request in a task of its own
        request.app[ANSWERS].add(task)
    status = 500
    try:
        response = await _answered(request, handler)
        status = response.status
        if CACHE_RESULT in request and status < 400:
            _served(request, response)
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if HANDED_OFF not in request:  # the primary counts it
            _count(request, status, began)


async def _answered(request: web.Request, handler: Handler) -> web.StreamResponse:
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
    except (ConnectionResetError, BrokenPipeError):
        # The client's connection: upstream failures arrive as RegistryErrors (the
        # upstream client wraps aiohttp's), and the hand-off's as Busy.
        return ClientLeft()
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(RegistryError("internal error in the mirror"))


async def api_version_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors included, names the API version, as distribution does."""
    response.headers.setdefault(*API_VERSION)


def _count(request: web.Request, status: int, began: float) -> None:
    route = request.match_info.route.name or "other"
    request.app[METRICS].answered(route, request.method, status, time.monotonic() - began)


def _served(request: web.Request, response: web.StreamResponse) -> None:
    """Pulls and bytes by repository, for the status page. The declared length, as the
    access line has it: sendfile bypasses aiohttp's own count."""
    size = 0 if request.method == "HEAD" else response.content_length or 0
    pull = request.method == "GET" and request.match_info.route.name == "manifest"
    repository = request.match_info["name"]
    request.app[ACTIVITY].served(request[UPSTREAM_NAME], repository, size, pull)
