"""Pinned images kept fresh in the background, ready before any client asks.

Each pin is revalidated once at start and then every `tag_ttl` of its upstream (every
MIN_INTERVAL at most), one pin at a time, through the proxies' own paths: the tag through
`ManifestProxy.by_tag`, so the tag row, the HEAD that Docker Hub does not count and stale
serving stay its rules; child manifests through `by_digest`; blobs through
`BlobProxy.prefetch`, the shared download that a client asking meanwhile joins, under the
same budget. Whenever something of the image is not cached (the tag moved, or a blob went
missing), every manifest of every platform and all their configs and layers are fetched,
so that a pull is served from cache, also while the upstream is down. A pin by digest
never moves: its content is fetched once, then only checked.

A pin that cannot be refreshed (the upstream down, the tag gone, no room in the budget)
is logged once, until it refreshes again; the task never ends on an error. Its waits are
the proxies': bounded by the upstream's timeouts, as a download makes progress or fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mirror.errors import DigestInvalid, RegistryError, UpstreamError
from mirror.metrics import Metrics
from mirror.proxy.blobs import BlobProxy
from mirror.proxy.manifests import Manifest, ManifestProxy
from mirror.reference import MANIFEST_TYPES, Digest, ImageReference, parse_digest
from mirror.routing import Route, Router
from mirror.storage.index import Index
from mirror.upstream.client import Upstream

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0  # seconds between two rounds of one pin, whatever its upstream's tag_ttl
MAX_MANIFESTS = 1024  # in one pinned image (an index and its children); more: upstream error

Result = Literal["unchanged", "moved", "failed"]


@dataclass
class Prefetched:
    """What one round fetched ahead of any client, and the blobs it could not keep."""

    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    no_room: list[Digest] = field(default_factory=list)

    def __str__(self) -> str:
        return f"prefetched {self.manifests} manifests and {self.blobs} blobs ({self.bytes} bytes)"


class Pins:
    def __init__(
        self,
        pins: Iterable[ImageReference],
        router: Router,
        upstreams: Mapping[str, Upstream],
        manifests: ManifestProxy,
        blobs: BlobProxy,
        index: Index,
        metrics: Metrics,
    ) -> None:
        self.pins = tuple(dict.fromkeys(pins))
        self.router = router
        self.upstreams = upstreams
        self.manifests = manifests
        self.blobs = blobs
        self.index = index
        self.metrics = metrics
        # The digest each pin was at when last refreshed; at its first round, what the
        # cache's tag row says, so that a move while the mirror was stopped is one too.
        self._known: dict[ImageReference, Digest | None] = {}
        self._failing: set[ImageReference] = set()

    async def run(self) -> None:
        """The background task: each pin when due, one at a time, until cancelled."""
        due = dict.fromkeys(self.pins, 0.0)  # monotonic times; 0: at start
        while due:
            pin = min(due, key=due.__getitem__)
            await asyncio.sleep(max(due[pin] - time.monotonic(), 0.0))
            await self.refresh(pin)
            due[pin] = time.monotonic() + self._interval(pin)

    def _interval(self, pin: ImageReference) -> float:
        upstream = self.router.route(pin.repository, pin.host).upstream
        return max(upstream.tag_ttl, MIN_INTERVAL)

    async def refresh(self, pin: ImageReference) -> Result:
        """One round for `pin`: revalidated, and what is missing of its content fetched."""
        try:
            result = await self._refresh(pin)
        except RegistryError as exc:
            result = self._failed(pin, exc.message)
        except Exception as exc:  # the index or the disk failed, or a bug: try next round
            result = self._failed(pin, f"{type(exc).__name__}: {exc}", traceback=True)
        self.metrics.pin_refreshes.labels(result).inc()
        return result

    async def _refresh(self, pin: ImageReference) -> Result:
        route = self.router.route(pin.repository, pin.host)
        if pin not in self._known:
            self._known[pin] = await self._recorded(route, pin)
        before = self._known[pin]
        manifest = await self._current(route, pin)
        prefetched = await self._fetch_missing(route, manifest)
        if prefetched.no_room:
            return self._failed(
                pin,
                f"no room in the cache budget for {len(prefetched.no_room)} of its blobs"
                f" ({prefetched.no_room[0]}, ...); {prefetched}",
            )
        self._known[pin] = manifest.digest
        self._recovered(pin)
        if before is None:
            log.info(
                "pin %s is at %s (nothing cached before); %s", pin, manifest.digest, prefetched
            )
        elif before != manifest.digest:
            log.info("pin %s moved from %s to %s; %s", pin, before, manifest.digest, prefetched)
        elif prefetched.blobs or prefetched.manifests:
            log.info("pin %s at %s had content missing: %s", pin, manifest.digest, prefetched)
        return "unchanged" if before == manifest.digest else "moved"

    async def _recorded(self, route: Route, pin: ImageReference) -> Digest | None:
        """What the cache says the pin points to, however old."""
        if isinstance(pin.reference, Digest):
            return pin.reference
        row = await self.index.tag(route.upstream.name, route.repository, pin.reference)
        return None if row is None else parse_digest(row.digest)

    async def _current(self, route: Route, pin: ImageReference) -> Manifest:
        """The pin's manifest now: by tag revalidated with the upstream, as for a client."""
        if isinstance(pin.reference, Digest):
            return await self.manifests.by_digest(route, pin.reference, MANIFEST_TYPES)
        manifest = await self.manifests.by_tag(route, pin.reference, MANIFEST_TYPES)
        if manifest.result == "stale":  # the upstream failed; its clients get the cached copy
            upstream = self.upstreams[route.upstream.name]
            why = upstream.last_error[1] if upstream.last_error else "the upstream failed"
            raise UpstreamError(f"{why}; its cached content stays")
        return manifest

    async def _fetch_missing(self, route: Route, root: Manifest) -> Prefetched:
        """Every manifest and blob of the image (all platforms), fetched where not cached."""
        prefetched = Prefetched()
        todo, seen, blobs = [root], {root.digest}, dict[Digest, None]()
        while todo:
            manifest = todo.pop()
            if manifest.result == "miss":
                prefetched.manifests += 1
                self._count(prefetched, len(manifest.body))
            children, layers = _references(manifest.body)
            blobs.update(dict.fromkeys(layers))
            for child in children:
                if child in seen:
                    continue
                if len(seen) >= MAX_MANIFESTS:
                    raise UpstreamError(f"the image names more than {MAX_MANIFESTS} manifests")
                seen.add(child)
                todo.append(await self.manifests.by_digest(route, child, MANIFEST_TYPES))
        for digest in blobs:
            size = await self.blobs.prefetch(route, digest)
            if size is None:
                prefetched.no_room.append(digest)
            elif size:
                prefetched.blobs += 1
                self._count(prefetched, size)
        return prefetched

    def _count(self, prefetched: Prefetched, size: int) -> None:
        prefetched.bytes += size
        self.metrics.pin_prefetched_bytes.inc(size)

    def _failed(self, pin: ImageReference, reason: str, traceback: bool = False) -> Result:
        if pin not in self._failing:
            self._failing.add(pin)
            log.warning(
                "pin %s could not be refreshed: %s (logged once, until it refreshes again)",
                pin,
                reason,
                exc_info=traceback,
            )
        return "failed"

    def _recovered(self, pin: ImageReference) -> None:
        if pin in self._failing:
            self._failing.discard(pin)
            log.info("pin %s refreshes again", pin)


def _references(body: bytes) -> tuple[list[Digest], list[Digest]]:
    """The child manifests an index names, and the config and layers a manifest names.

    Digests of algorithms the mirror never stores (allowed in manifests) are skipped: no
    one can fetch them through it (the evictor's walk of the pins logs each once)."""
    try:
        fields = json.loads(body)
    except ValueError:
        return [], []
    if not isinstance(fields, dict):
        return [], []
    blobs = [fields.get("config"), *_entries(fields.get("layers"))]
    return _digests(_entries(fields.get("manifests"))), _digests(blobs)


def _entries(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _digests(entries: Iterable[object]) -> list[Digest]:
    found = []
    for entry in entries:
        text = entry.get("digest") if isinstance(entry, dict) else None
        if not isinstance(text, str):
            continue
        try:
            found.append(parse_digest(text))
        except DigestInvalid:
            log.debug("skipped %r: no digest the mirror can fetch", text[:200])
    return found
