"""The aiohttp application, built the same way in production and in tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from mirror.access import Gate, read_htpasswd
from mirror.config import Config
from mirror.eviction import Evictor, InUse
from mirror.metrics import Metrics
from mirror.proxy.blobs import BlobProxy
from mirror.proxy.manifests import ManifestProxy
from mirror.storage.blobs import BlobStore
from mirror.storage.index import INDEX_FILE, Index
from mirror.storage.reconcile import reconcile
from mirror.upstream.client import Upstream
from mirror.upstream.routing import Router
from mirror.web import ops, registry
from mirror.web.middleware import METRICS, api_version_header, observe, registry_errors

CONFIG = web.AppKey("config", Config)


def make_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[observe, registry_errors])
    app[CONFIG] = config
    app[METRICS] = metrics or Metrics()
    htpasswd = config.auth.htpasswd
    app[registry.GATE] = Gate(
        read_htpasswd(htpasswd) if htpasswd else None,
        anyone_may_pull=any(u.access == "public" for u in config.upstreams),
    )
    app.on_response_prepare.append(api_version_header)
    app.cleanup_ctx.append(_storage_and_upstream)
    registry.add_routes(app)
    ops.add_routes(app)
    return app


async def _storage_and_upstream(app: web.Application) -> AsyncIterator[None]:
    config, metrics = app[CONFIG], app[METRICS]
    store = BlobStore(config.storage.path)
    store.open()
    index = Index(config.storage.path / INDEX_FILE)
    await index.open()
    session = aiohttp.ClientSession(auto_decompress=False)
    evictor = Evictor(config, store, index, InUse(), metrics)
    blobs = BlobProxy(store, index, evictor, metrics)
    upstreams: dict[str, Upstream] = {}
    evicting: asyncio.Task[None] | None = None
    try:
        await reconcile(store, index)
        evicting = asyncio.create_task(evictor.run())
        for upstream in config.upstreams:
            upstreams[upstream.name] = Upstream(upstream, session, metrics)
        app[registry.ROUTER] = Router(config.upstreams)
        app[registry.UPSTREAMS] = upstreams
        app[registry.BLOBS] = blobs
        app[registry.MANIFESTS] = ManifestProxy(store, index, evictor, metrics)
        app[ops.EVICTOR] = evictor
        yield
    finally:
        if evicting is not None:
            evicting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await evicting
        await blobs.close()
        for upstream_client in upstreams.values():
            await upstream_client.close()
        await session.close()
        await index.close()
