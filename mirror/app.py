"""The aiohttp applications, built the same way in production and in tests: the mirror
(the primary process) and, with `workers` > 1, a worker's (cache hits only)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import ClientSession, web

from mirror.access import Gate, read_htpasswd
from mirror.activity import Activity
from mirror.config import Config, Timeouts
from mirror.eviction import Evictor, pinned_images
from mirror.metrics import Metrics
from mirror.proxy.blobs import BlobProxy
from mirror.proxy.health import Health
from mirror.proxy.manifests import ManifestProxy
from mirror.proxy.pins import Pins
from mirror.proxy.sources import PeerSource, Source
from mirror.routing import Router
from mirror.shared.tier import tier_of
from mirror.storage.blobs import BlobStore
from mirror.storage.budget import Budget
from mirror.storage.cache import Cache
from mirror.storage.index import INDEX_FILE, Index
from mirror.storage.lock import storage_locked
from mirror.storage.reconcile import reconcile
from mirror.upstream.client import Upstream, upstream_session
from mirror.web import ops, peer, registry, status, worker
from mirror.web.handoff import Sender
from mirror.web.middleware import (
    ACTIVITY,
    ANSWERS,
    METRICS,
    Answers,
    answer,
    api_version_header,
)

CONFIG = web.AppKey("config", Config)
EVICTOR = web.AppKey("evictor", Evictor)  # for a pass on demand


def make_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    app = _base_app(config, metrics)
    app.cleanup_ctx.append(_one_server_per_storage)
    app.cleanup_ctx.append(_storage_and_upstream)
    registry.add_routes(app)
    peer.add_routes(app, config.shared)
    ops.add_routes(app)
    if config.status_page:
        status.add_routes(app, config.workers)
    return app


def make_worker_app(config: Config, handoff: str) -> web.Application:
    """A worker's: hits from the cache, and everything else handed to the primary over the
    Unix socket at `handoff`. It neither downloads nor evicts."""
    app = _base_app(config, None)
    app[worker.SENDER] = Sender(handoff)
    app.cleanup_ctx.append(_worker_storage)
    worker.add_routes(app)
    return app


def _base_app(config: Config, metrics: Metrics | None) -> web.Application:
    app = web.Application(middlewares=[answer])
    app[CONFIG] = config
    app[METRICS] = metrics or Metrics()
    app[ACTIVITY] = Activity()
    app[ANSWERS] = Answers()
    htpasswd = config.auth.htpasswd
    app[registry.GATE] = Gate(
        read_htpasswd(htpasswd) if htpasswd else None,
        anyone_may_pull=any(u.access == "public" for u in config.upstreams),
    )
    app.on_response_prepare.append(api_version_header)
    return app


async def _one_server_per_storage(app: web.Application) -> AsyncIterator[None]:
    """Before anything touches the storage directory: it is this server's, or no start."""
    with storage_locked(app[CONFIG].storage.path):
        yield


async def _storage_and_upstream(app: web.Application) -> AsyncIterator[None]:
    config, metrics = app[CONFIG], app[METRICS]
    store = BlobStore(config.storage.path)
    store.open()
    index = Index(config.storage.path / INDEX_FILE)
    await index.open()
    session = upstream_session()
    budget = Budget(config.storage, index, metrics)
    evictor = Evictor(
        budget, index, store, pinned_images(config), config.storage.max_age, metrics, app[ACTIVITY]
    )
    cache = Cache(store, index)
    tier = tier_of(config.shared, metrics, evictor.pinned)
    upstreams = {u.name: Upstream(u, session, metrics, tier) for u in config.upstreams}
    blobs = BlobProxy(cache, budget, upstreams, metrics, tier, _peers(config, session))
    manifests = ManifestProxy(cache, index, budget, upstreams, metrics, tier)
    router = Router(config.upstreams)
    background: list[asyncio.Task[None]] = []
    try:
        await reconcile(store, index)
        await tier.start()
        background.append(asyncio.create_task(evictor.run()))
        app[registry.ROUTER] = router
        app[registry.BLOBS] = blobs
        app[registry.MANIFESTS] = manifests
        app[ops.HEALTH] = Health(budget, store, upstreams, tier)
        app[EVICTOR] = evictor
        if config.pins:  # kept fresh by the primary alone: a worker never fetches
            pins = Pins(config.pins, router, upstreams, manifests, blobs, index, metrics)
            background.append(asyncio.create_task(pins.run()))
        yield
    finally:
        for task in reversed(background):  # the pins first: they start downloads
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await blobs.close()
        await tier.close()
        for upstream_client in upstreams.values():
            await upstream_client.close()
        await session.close()
        await index.close()


def _peers(config: Config, session: ClientSession) -> Callable[[str], Source] | None:
    """How this replica reads a blob from the one fetching it for the fleet; None (fetch
    alone) without a fleet or without its secret."""
    secret = config.shared.fleet_secret() if config.shared is not None else None
    if secret is None:
        return None
    return lambda url: PeerSource(session, url, secret, Timeouts())


async def _worker_storage(app: web.Application) -> AsyncIterator[None]:
    """The cache as the primary keeps it, read (and its uses recorded) but never changed;
    a worker sends nothing upstream."""
    config, metrics = app[CONFIG], app[METRICS]
    store = BlobStore(config.storage.path)  # not opened: that clears the primary's temp files
    # Blobs the primary fetches through an authenticated upstream are marked private
    # while this runs; without one, the marks can only go, and those read at start do.
    private = any(u.access == "authenticated" for u in config.upstreams)
    index = Index(config.storage.path / INDEX_FILE, private_elsewhere=private)
    await index.open()
    sender = app[worker.SENDER]
    try:
        await sender.connect()
        cache = Cache(store, index)
        budget = Budget(config.storage, index, metrics)  # never reserved from: nothing stored
        app[registry.ROUTER] = Router(config.upstreams)
        app[registry.BLOBS] = BlobProxy(cache, budget, {}, metrics)
        app[registry.MANIFESTS] = ManifestProxy(cache, index, budget, {}, metrics)
        yield
    finally:
        sender.close()
        await index.close()
