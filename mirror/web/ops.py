"""Endpoints for operators: `/metrics` (Prometheus), `/healthz`, `/readyz`."""

from __future__ import annotations

import os
import tempfile

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mirror.budget import Budget
from mirror.storage.blobs import BlobStore
from mirror.web.middleware import METRICS
from mirror.web.registry import UPSTREAMS

BUDGET = web.AppKey("budget", Budget)
STORE = web.AppKey("store", BlobStore)  # probed for writes by /readyz
SHUTTING_DOWN = web.AppKey("shutting_down", list[bool])  # a box: set once, on shutdown


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app[SHUTTING_DOWN] = []
    app.on_shutdown.append(_shutting_down)


async def metrics(request: web.Request) -> web.Response:
    """The registry's metrics, with the gauges of state held elsewhere set just now."""
    registry = request.app[METRICS]
    use = await request.app[BUDGET].use()
    registry.cache_size.set(use.used)
    registry.cache_max.set(use.max_size)
    registry.cache_blobs.set(use.blobs)
    for name, upstream in request.app[UPSTREAMS].items():
        quota = upstream.ratelimit
        if quota.remaining is not None:
            registry.ratelimit_remaining.labels(name).set(quota.remaining)
        if quota.limit is not None:
            registry.ratelimit_limit.labels(name).set(quota.limit)
    return web.Response(body=registry.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """The process answers: nothing more is checked (that is /readyz)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to serve pulls: the index answers, storage takes writes, not shutting down."""
    problems = []
    if request.app[SHUTTING_DOWN]:
        problems.append("shutting down")
    try:
        await request.app[BUDGET].use()
    except Exception as exc:  # any failure of the index means not ready, whatever it is
        problems.append(f"index: {exc}")
    try:
        _probe_write(request.app[STORE].tmp)
    except OSError as exc:
        problems.append(f"storage not writable: {exc.strerror}")
    status = 503 if problems else 200
    return web.json_response({"ready": not problems, "problems": problems}, status=status)


def _probe_write(directory: os.PathLike[str]) -> None:
    with tempfile.TemporaryFile(dir=directory) as probe:
        probe.write(b"ready?")


async def _shutting_down(app: web.Application) -> None:
    app[SHUTTING_DOWN].append(True)
