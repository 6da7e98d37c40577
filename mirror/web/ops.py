"""Endpoints for operators: `/metrics` (Prometheus), `/healthz`, `/readyz`."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mirror.proxy.health import Health
from mirror.web.middleware import METRICS

HEALTH = web.AppKey("health", Health)
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
    health = request.app[HEALTH]
    use = await health.use()
    registry.cache_size.set(use.used)
    registry.cache_max.set(use.max_size)
    registry.cache_blobs.set(use.blobs)
    for upstream in health.upstream_health():
        if upstream.quota_remaining is not None:
            registry.ratelimit_remaining.labels(upstream.name).set(upstream.quota_remaining)
        if upstream.quota_limit is not None:
            registry.ratelimit_limit.labels(upstream.name).set(upstream.quota_limit)
    return web.Response(body=registry.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """The process answers: nothing more is checked (that is /readyz)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to serve pulls: the index answers, storage takes writes, not shutting down.
    A replica without its shared tier is ready all the same, and says it is degraded."""
    health = request.app[HEALTH]
    problems = ["shutting down"] if request.app[SHUTTING_DOWN] else []
    problems += await health.problems()
    body: dict[str, object] = {"ready": not problems, "problems": problems}
    if degraded := health.degraded():
        body["degraded"] = degraded
    return web.json_response(body, status=503 if problems else 200)


async def _shutting_down(app: web.Application) -> None:
    app[SHUTTING_DOWN].append(True)
