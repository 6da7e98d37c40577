"""Pull-through for manifests, tags/list and referrers.

Manifests are stored as blobs (their exact bytes) with their media type in the index.
The media type belongs to the content: the manifest's own `mediaType` when it declares
one, else the first type recorded for its digest. An upstream answer that is not a
manifest is an upstream error, never stored. By digest manifests are immutable: local
first. By tag they are fresh for the upstream's `tag_ttl`, then revalidated with a HEAD
(which Docker Hub does not count as a pull); when the upstream cannot answer, a cached
copy is served stale.

Tags are listed by the mirror itself: the upstream's whole list, sorted, paged with `n`
and `last` here, whatever the upstream does with them.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Generic, TypeVar

from yarl import URL

from mirror.errors import STALE_SERVABLE, ManifestUnknown, UpstreamError
from mirror.metrics import Metrics
from mirror.reference import (
    MANIFEST_TYPES,
    OCI_INDEX,
    Digest,
    accepts,
    digest_of,
    parse_digest,
)
from mirror.routing import Route
from mirror.shared.database import SharedTag
from mirror.shared.tier import Tier, Unshared, blob_key
from mirror.storage.blobs import DigestMismatch
from mirror.storage.budget import Budget
from mirror.storage.cache import Cache
from mirror.storage.index import Index
from mirror.upstream.client import MAX_LISTING_SIZE, Upstream, UpstreamListing

log = logging.getLogger(__name__)

LISTING_CACHE_ENTRIES = 1024
LISTING_CACHE_BYTES = 32 * 1024 * 1024  # each of the listing caches, in memory
MEMORY_BYTES = 16 * 1024 * 1024  # cached manifests also kept in memory, most recent first
WAIT_FOR_HOLDER = 10.0  # seconds another replica's manifest work is waited for, at most
MAX_TAG_PAGES = 100  # of an upstream that pages its tags/list; more is an upstream error
_LINK = re.compile(r"\s*<([^>]*)>")
T = TypeVar("T")


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: Digest
    result: str = "miss"  # what the cache could do: hit, miss (fetched), stale


@dataclass(frozen=True)
class TagPage:
    """Tags of a repository in lexical order, and whether more follow them."""

    tags: tuple[str, ...]
    more: bool


class _Listings(Generic[T]):
    """Upstream listings kept for the upstream's `tag_ttl`, then asked again; the last one
    kept is served (stale) when the upstream fails. At most LISTING_CACHE_ENTRIES of them
    in LISTING_CACHE_BYTES (as `size` counts them), the least recently stored dropped
    first; one larger than that is served, not kept."""

    def __init__(self, size: Callable[[T], int]) -> None:
        self._kept: OrderedDict[Hashable, tuple[float, T, int]] = OrderedDict()
        self._size = size
        self._bytes = 0

    async def get(self, key: Hashable, ttl: float, fetch: Callable[[], Awaitable[T]]) -> T:
        kept = self._kept.get(key)
        if kept is not None and time.time() - kept[0] < ttl:
            return kept[1]
        try:
            value = await fetch()
        except STALE_SERVABLE:
            if kept is None:
                raise
            return kept[1]
        self._keep(key, value)
        return value

    def _keep(self, key: Hashable, value: T) -> None:
        old = self._kept.pop(key, None)
        self._bytes -= old[2] if old else 0
        size = self._size(value)
        if size > LISTING_CACHE_BYTES:
            return
        self._kept[key] = (time.time(), value, size)
        self._bytes += size
        while self._bytes > LISTING_CACHE_BYTES or len(self._kept) > LISTING_CACHE_ENTRIES:
            _, (_, _, dropped) = self._kept.popitem(last=False)
            self._bytes -= dropped


class ManifestProxy:
    def __init__(
        self,
        cache: Cache,
        index: Index,
        budget: Budget,
        upstreams: Mapping[str, Upstream],
        metrics: Metrics | None = None,
        tier: Tier | None = None,
    ) -> None:
        """`cache` keeps the manifests' bytes; `index` the tags that point at them;
        `upstreams` are the clients by upstream name, for misses (none in a worker);
        `tier` what other replicas have kept, asked before the upstream."""
        self.cache = cache
        self.index = index
        self.budget = budget
        self.upstreams = upstreams
        self.tier = tier or Unshared()
        self.metrics = metrics or Metrics()
        self._listings: _Listings[UpstreamListing] = _Listings(lambda kept: len(kept.body))
        self._tag_lists: _Listings[tuple[str, ...]] = _Listings(_tags_size)
        # Hits without a query or a read: manifests are small, and asked for on every pull.
        self._recent: OrderedDict[Digest, Manifest] = OrderedDict()
        self._recent_bytes = 0
        # Upstream work under way, shared by every request that needs it: by (upstream,
        # digest), or by (upstream, repository, tag, accept).
        self._fetches: dict[Hashable, asyncio.Task[Manifest]] = {}

    async def by_digest(self, route: Route, digest: Digest, accept: tuple[str, ...]) -> Manifest:
        upstream = self.upstreams[route.upstream.name]
        return await self._by_digest(upstream, route.repository, digest, accept)

    async def _by_digest(
        self, upstream: Upstream, repository: str, digest: Digest, accept: tuple[str, ...]
    ) -> Manifest:
        """Local first; on a miss one upstream GET per digest at a time, shared by all askers.

        It asks for every manifest type whatever this client accepts, since a digest names
        one content (distribution refuses an OCI manifest to an Accept without its type).
        """
        cached = await self.cached(upstream.config.access, digest)
        if cached is not None:
            return cached
        wanted = tuple(dict.fromkeys(accept + MANIFEST_TYPES))
        return await self._once(
            (upstream.name, digest),
            lambda: self._fetch_digest(upstream, repository, digest, wanted),
        )

    async def _once(
        self, key: Hashable, work: Callable[[], Coroutine[object, object, Manifest]]
    ) -> Manifest:
        """The result of `work`, started only if no request started it already.

        The work is a task of its own: a client that goes away does not cancel it.
        """
        task = self._fetches.get(key)
        if task is None:
            task = asyncio.create_task(work())
            self._fetches[key] = task
            task.add_done_callback(lambda done: self._fetched(key, done))
        return await asyncio.shield(task)

    async def _fetch_digest(
        self, upstream: Upstream, repository: str, digest: Digest, accept: tuple[str, ...]
    ) -> Manifest:
        # A request that found nothing may get here just after another's fetch stored it.
        async def kept() -> Manifest | None:
            cached = await self.cached(upstream.config.access, digest)
            return cached if cached is not None else await self._shared(upstream, digest)

        async def fetch() -> Manifest:
            remote = await upstream.get_manifest(repository, str(digest), accept)
            assert remote.body is not None
            try:
                return await self._store(upstream, remote.body, remote.media_type, digest)
            except DigestMismatch:
                self.metrics.digest_mismatches.labels(upstream.name).inc()
                raise

        # The row of the manifest kept in the shared tier ends the lease.
        return await self._for_fleet(blob_key(digest), kept, fetch, row=True)

    async def _for_fleet(
        self,
        key: str,
        done: Callable[[], Awaitable[Manifest | None]],
        work: Callable[[], Awaitable[Manifest]],
        row: bool = False,
    ) -> Manifest:
        """`work`, done once for the fleet: by this replica when it takes the lease of
        `key` (or fetches alone); else what the holder's work left (`done`), once its
        lease ends, or this replica's own work when it left nothing in time. The lease
        ends with the work, or (`row`) with the row the work has the shared tier write."""
        found = await done()
        if found is not None:
            return found
        lease = await self.tier.lease(key)
        if lease is not None and not lease.ours:
            await self.tier.wait_released(key, WAIT_FOR_HOLDER)
        ours = lease is not None and lease.ours
        if lease is not None:
            # Done by the holder while this replica waited, or just before it took the
            # lease (the holder's lease ends the moment its work is done).
            found = await done()
            if found is not None:
                if ours:
                    await self.tier.release(key)
                return found
        try:
            manifest = await work()
        except BaseException:
            if ours:
                await self.tier.release(key)
            raise
        if ours and not row:
            await self.tier.release(key)
        return manifest

    def _fetched(self, key: Hashable, done: asyncio.Task[Manifest]) -> None:
        if self._fetches.get(key) is done:
            del self._fetches[key]
        if not done.cancelled():
            done.exception()  # retrieved: every asker may have gone away

    async def by_tag(self, route: Route, tag: str, accept: tuple[str, ...]) -> Manifest:
        upstream = self.upstreams[route.upstream.name]
        return await self._by_tag(upstream, route.repository, tag, accept)

    async def _by_tag(
        self, upstream: Upstream, repository: str, tag: str, accept: tuple[str, ...]
    ) -> Manifest:
        """Fresh from cache within `tag_ttl`; else revalidated with a HEAD, which Docker Hub
        does not count, so a counted GET is made only for a digest not cached yet."""
        cached, fresh = await self._tagged(upstream, repository, tag)
        if cached is not None and not accepts(accept, cached.media_type):
            # This client wants another form of the tag than the one we keep: ask upstream,
            # without replacing what the tag row says for everyone else.
            return await self._fetch_tag(upstream, repository, tag, accept, record=False)
        if cached is not None and fresh:
            return cached  # a hit, as `cached` says
        if cached is None and not upstream.counts_pulls:
            # No pull quota to save: one GET by tag is quicker than a HEAD, then a GET.
            work = partial(self._fetch_tag, upstream, repository, tag, accept)
        else:
            work = partial(self._revalidate, upstream, repository, tag, accept, cached)

        async def fresh_now() -> Manifest | None:
            # Another request's fetch (or another replica's) may have stored the tag since
            # it was read above.
            now, fresh = await self._tagged(upstream, repository, tag)
            return now if now is not None and fresh and accepts(accept, now.media_type) else None

        async def unless_fresh_now() -> Manifest:
            key = f"tag:{upstream.name}/{repository}:{tag}"
            return await self._for_fleet(key, fresh_now, work)

        try:
            return await self._once((upstream.name, repository, tag, accept), unless_fresh_now)
        except STALE_SERVABLE as exc:
            if cached is None:
                raise
            # The outage itself is logged once, by the upstream client.
            log.debug("serving %s:%s stale from cache: %s", repository, tag, exc.message)
            return replace(cached, result="stale")

    async def _tagged(
        self, upstream: Upstream, repository: str, tag: str
    ) -> tuple[Manifest | None, bool]:
        """The cached manifest the tag points to, and whether it is within tag_ttl: as
        this replica saw it, or as another replica saw it later (the shared tier)."""
        row = await self.index.tag(upstream.name, repository, tag)
        if row is None or not self._fresh(upstream, row.checked_at):
            shared = await self.tier.tag(upstream.name, repository, tag)
            if shared is not None and (row is None or shared.checked_at > row.checked_at):
                adopted = await self._shared_tag(upstream, repository, tag, shared)
                if adopted is not None:
                    return adopted, self._fresh(upstream, shared.checked_at)
        if row is None:
            return None, False
        fresh = self._fresh(upstream, row.checked_at)
        return await self.cached(upstream.config.access, parse_digest(row.digest)), fresh

    async def _shared_tag(
        self, upstream: Upstream, repository: str, tag: str, shared: SharedTag
    ) -> Manifest | None:
        """A tag another replica checked more recently, adopted here with its check's
        time (so that it goes stale when it would have there); None if its manifest is
        neither here nor in the shared tier."""
        digest = parse_digest(shared.digest)
        manifest = await self.cached(upstream.config.access, digest)
        if manifest is None:
            manifest = await self._shared(upstream, digest)
        if manifest is not None:
            await self.index.set_tag(
                upstream.name, repository, tag, digest, manifest.media_type, shared.checked_at
            )
        return manifest

    def _fresh(self, upstream: Upstream, checked_at: float) -> bool:
        return time.time() - checked_at < upstream.config.tag_ttl

    async def _shared(self, upstream: Upstream, digest: Digest) -> Manifest | None:
        """The manifest as the shared tier keeps it, verified, kept here too; None when
        the tier does not have it (or has bytes that are not the digest's: deleted)."""
        found = await self.tier.manifest(digest, upstream.config.access)
        if found is None:
            return None
        body, media_type = found
        try:
            manifest = await self._store(upstream, body, media_type or "", digest, shared=True)
        except DigestMismatch:
            await self.tier.discard(digest, "its bytes do not match the digest")
            return None
        return replace(manifest, result="shared")

    async def _listing(
        self, upstream: Upstream, repository: str, path: str, query: Mapping[str, str]
    ) -> UpstreamListing:
        """An upstream listing (referrers), kept briefly and served stale when it fails."""
        key = (upstream.name, path + "?" + "&".join(f"{k}={v}" for k, v in sorted(query.items())))
        fetch = partial(upstream.listing, repository, path, query)
        return await self._listings.get(key, upstream.config.tag_ttl, fetch)

    async def tags(self, route: Route, n: int | None, last: str | None) -> TagPage:
        """The tags after `last` (lexically; `last` need not be one), at most `n` of them.

        Paged here, from the upstream's whole list, since upstreams differ in what they do
        with `n` and `last` (ignore them, or sort otherwise); the list is kept briefly and
        served stale when the upstream fails, as other listings are.
        """
        upstream, repository = self.upstreams[route.upstream.name], route.repository
        every = await self._tag_lists.get(
            (upstream.name, repository),
            upstream.config.tag_ttl,
            partial(self._every_tag, upstream, repository),
        )
        rest = every if last is None else every[bisect.bisect_right(every, last) :]
        if n is None:
            return TagPage(rest, more=False)
        return TagPage(rest[:n], more=0 < n < len(rest))

    async def _every_tag(self, upstream: Upstream, repository: str) -> tuple[str, ...]:
        """The upstream's tags, sorted, following its own pages (its `Link`) if it pages."""
        path = f"/v2/{repository}/tags/list"
        found: set[str] = set()
        query: dict[str, str] = {}
        received = 0
        for _ in range(MAX_TAG_PAGES):
            page = await upstream.listing(repository, path, query)
            received += len(page.body)
            if received > MAX_LISTING_SIZE:
                raise UpstreamError(f"upstream {upstream.name} listed tags over 4 MiB")
            before = len(found)
            found.update(_tag_names(upstream.name, page.body))
            next_page = _next_page(page.link)
            if next_page is None:
                return tuple(sorted(found))
            if len(found) == before:  # a link back to a page seen already: it would loop
                raise UpstreamError(f"upstream {upstream.name} linked to more tags but sent none")
            query = next_page
        raise UpstreamError(
            f"upstream {upstream.name} listed tags in more than {MAX_TAG_PAGES} pages"
        )

    async def referrers(self, route: Route, digest: Digest, artifact_type: str | None) -> bytes:
        """The referrers index of `digest`, filtered by `artifact_type` when given.

        From the referrers API when the upstream has it; else from the fallback tag
        `<alg>-<hex>`; else an empty index. When the upstream fails, a fallback index kept
        from earlier is served stale (as `by_tag` does); with none, the failure is raised.
        """
        upstream, repository = self.upstreams[route.upstream.name], route.repository
        path = f"/v2/{repository}/referrers/{digest}"
        fallback_tag = f"{digest.algorithm}-{digest.hex}"
        try:
            listing = await self._listing(upstream, repository, path, {})
            found = _descriptors(listing.body)
        except ManifestUnknown:
            found = await self._fallback_referrers(upstream, repository, fallback_tag)
        except STALE_SERVABLE as failure:
            try:
                found = await self._fallback_referrers(upstream, repository, fallback_tag)
            except STALE_SERVABLE:
                raise failure from None
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return json.dumps(body).encode()

    async def _fallback_referrers(
        self, upstream: Upstream, repository: str, tag: str
    ) -> list[dict[str, Any]]:
        try:
            tagged = await self._by_tag(upstream, repository, tag, (OCI_INDEX,))
        except ManifestUnknown:
            return []
        return _descriptors(tagged.body)

    async def _revalidate(
        self,
        upstream: Upstream,
        repository: str,
        tag: str,
        accept: tuple[str, ...],
        cached: Manifest | None,
    ) -> Manifest:
        """What the tag points to now, by HEAD; the manifest fetched by digest if new."""
        head = await upstream.head_manifest(repository, tag, accept or MANIFEST_TYPES)
        if cached is not None and head.digest == cached.digest:
            await self._record(upstream, repository, tag, cached)
            return cached  # still a hit: only a HEAD went upstream
        if head.digest is None:
            return await self._fetch_tag(upstream, repository, tag, accept)
        manifest = await self._by_digest(upstream, repository, head.digest, accept)
        await self._record(upstream, repository, tag, manifest)
        return manifest

    async def _fetch_tag(
        self,
        upstream: Upstream,
        repository: str,
        tag: str,
        accept: tuple[str, ...],
        record: bool = True,
    ) -> Manifest:
        remote = await upstream.get_manifest(repository, tag, accept or MANIFEST_TYPES)
        assert remote.body is not None
        digest = remote.digest or digest_of(remote.body)
        manifest = await self._store(upstream, remote.body, remote.media_type, digest)
        if record:
            await self._record(upstream, repository, tag, manifest)
        return manifest

    async def _record(
        self, upstream: Upstream, repository: str, tag: str, manifest: Manifest
    ) -> None:
        """What the tag points to, as the upstream said just now: for this replica and,
        through the shared tier, for every other."""
        args = (upstream.name, repository, tag, manifest.digest, manifest.media_type)
        await self.index.set_tag(*args)
        await self.tier.set_tag(*args)

    async def _store(
        self,
        upstream: Upstream,
        body: bytes,
        sent_type: str,
        digest: Digest,
        shared: bool = False,
    ) -> Manifest:
        """Verify and keep the exact bytes; the index row marks the blob as a manifest.
        Kept in the shared tier too, unless they come from there (`shared`).

        Its type is its own `mediaType`, else the first one recorded for the digest, else
        the one sent now: another upstream or repository serving the same bytes under
        another type changes nothing for anyone.
        """
        actual = digest_of(body, digest.algorithm)
        if actual != digest:
            raise DigestMismatch(f"upstream manifest hashes to {actual}, not {digest}; not cached")
        sent_type = sent_type.lower()
        own_type = _own_media_type(upstream.name, body, sent_type)
        media_type = own_type or await self._recorded_type(digest) or sent_type
        private = upstream.config.access == "authenticated"
        if not shared:
            await self.tier.keep_bytes(digest, body, media_type, private)
        if not await self.budget.reserve(len(body)):
            self.budget.passed_through(digest, len(body))
            return Manifest(body, media_type, digest)
        try:
            kept = await self.cache.commit_bytes(digest, body, media_type, private=private)
        finally:
            self.budget.release(len(body))
        if kept is not None:  # verified, so served even when not kept (a full disk, say)
            media_type = own_type or kept  # another fetch's type may have been first
            self._remember(Manifest(body, media_type, digest, "hit"))
        return Manifest(body, media_type, digest)

    async def _recorded_type(self, digest: Digest) -> str | None:
        row = await self.index.blob(digest)
        return None if row is None else row.media_type

    async def cached(self, access: str, digest: Digest) -> Manifest | None:
        """The cached manifest; None on a miss, or when it is private and `access` public."""
        manifest = self._recent.get(digest)
        if manifest is not None and self.cache.seen(digest, access):  # not evicted
            self._recent.move_to_end(digest)
            self.tier.used(digest)
            return manifest
        found = await self.cache.manifest(digest, access)
        if found is None:
            return None
        self.tier.used(digest)
        body, recorded = found
        # Its own type over the row's, which a version before types belonged to the content
        # may have taken from the last upstream to serve it.
        manifest = Manifest(body, _declared_type(body) or recorded, digest, "hit")
        self._remember(manifest)
        return manifest

    def _remember(self, manifest: Manifest) -> None:
        old = self._recent.pop(manifest.digest, None)
        self._recent_bytes -= len(old.body) if old else 0
        self._recent[manifest.digest] = manifest
        self._recent_bytes += len(manifest.body)
        while self._recent_bytes > MEMORY_BYTES:
            _, dropped = self._recent.popitem(last=False)
            self._recent_bytes -= len(dropped.body)


def _descriptors(index: bytes) -> list[dict[str, Any]]:
    """The `manifests` of an OCI index; anything unreadable counts as none."""
    try:
        manifests = json.loads(index).get("manifests")
    except (ValueError, AttributeError):
        return []
    if not isinstance(manifests, list):
        return []
    return [m for m in manifests if isinstance(m, dict)]


def _own_media_type(upstream: str, body: bytes, sent_type: str) -> str | None:
    """The `mediaType` the manifest declares, if any; an UpstreamError unless the answer is
    a manifest: a JSON object of schema version 2 whose type (its own, else the one sent)
    is a manifest type, and sent as one if sent with a type at all (some upstreams send
    none: the body's own type suffices then). An HTML page answered with a 200 (a registry
    in maintenance) is no manifest, nor is anything typed otherwise."""
    fields = _json_object(body)
    if fields is None or fields.get("schemaVersion") != 2:
        raise UpstreamError(
            f"upstream {upstream} answered a manifest request with no manifest"
            f" ({sent_type or 'no Content-Type'}, {len(body)} bytes)"
        )
    if sent_type and sent_type not in MANIFEST_TYPES:
        raise UpstreamError(f"upstream {upstream} sent a manifest as {sent_type}")
    declared = fields.get("mediaType")
    if declared is None:
        if not sent_type:
            raise UpstreamError(f"upstream {upstream} sent a manifest without a media type")
        return None
    if not isinstance(declared, str) or declared not in MANIFEST_TYPES:
        raise UpstreamError(f"upstream {upstream} sent a manifest of type {declared!r}")
    return declared


def _declared_type(body: bytes) -> str | None:
    """The manifest type a cached manifest declares itself, if it does."""
    fields = _json_object(body)
    declared = fields.get("mediaType") if fields is not None else None
    return declared if isinstance(declared, str) and declared in MANIFEST_TYPES else None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return None
    return value if isinstance(value, dict) else None


def _tag_names(upstream: str, body: bytes) -> list[str]:
    """The tags of one upstream tags/list answer (`"tags": null` is none)."""
    listing = _json_object(body)
    tags = None if listing is None else listing.get("tags") or []
    if not isinstance(tags, list):
        raise UpstreamError(f"upstream {upstream} answered tags/list with no tag list")
    return [tag for tag in tags if isinstance(tag, str)]


def _tags_size(tags: tuple[str, ...]) -> int:
    """The memory a tag list takes: a short tag's object is several times its characters."""
    return sys.getsizeof(tags) + sum(sys.getsizeof(tag) for tag in tags)


def _next_page(link: str | None) -> dict[str, str] | None:
    """The query of the upstream's next page of tags, from its `Link: <url>; rel="next"`.
    Only the query is taken, and asked on the upstream's own path: its link can point the
    mirror at nothing else."""
    match = _LINK.match(link or "")
    if match is None:
        return None
    try:
        query = dict(URL(match.group(1)).query)
    except ValueError:
        return None
    return query or None
