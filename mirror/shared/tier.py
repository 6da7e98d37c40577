"""Fleet mode's shared tier as the proxies see it: what any replica with the same `shared:`
block has kept (verified bytes in the bucket, their rows and the tags in PostgreSQL), and
the keeping of what this replica verified.

A mode, so two objects behind one interface: `Unshared` (one replica, the embedded
default: nothing is ever shared) and `SharedTier`.

Rows are written only after their object is complete in the bucket, so a row never names a
missing object (eviction marks a row before deleting its object). Blobs are uploaded in
the background from the verified file of the local cache, a few at a time; manifests
before their request ends (replicas waiting for a tag's lease look for them). A replica
killed mid-upload leaves a multipart upload nobody sees, never an object.

Degraded, never down: when the database or the bucket fails, the replica goes on alone
(its own cache, the upstream) and says so on /readyz. Requests no longer call a part that
failed (they would each wait for its timeout): a background probe tries it every
RETRY_AFTER, and sharing resumes once it answers. The failure is logged once, and the
recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from mirror.config import SharedConfig
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.shared.bucket import Bucket, BucketError, ObjectMissing
from mirror.shared.database import (
    DatabaseUnavailable,
    Lease,
    SharedIndex,
    SharedQuota,
    SharedTag,
)
from mirror.shared.eviction import SharedEvictor

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0  # seconds a failed part is left alone
TOUCH_INTERVAL = 10.0  # seconds between two writes of the last accesses
UPLOADS = 4  # at once, per replica
MAX_MANIFEST = 4 * 1024 * 1024  # bytes a manifest read from the bucket may have

T = TypeVar("T")
_PROBE = parse_digest("sha256:" + "0" * 64)  # a key nobody has: a HEAD of it costs nothing


def blob_key(digest: Digest) -> str:
    """The lease of a blob's fetch from the upstream."""
    return f"blob:{digest}"


async def _nothing_pinned() -> set[str]:
    return set()


class TierUnavailable(Exception):
    """The shared tier cannot answer now: the replica goes on alone."""


@dataclass(frozen=True)
class Kept:
    """A blob or manifest the shared tier holds, as a given route may see it."""

    size: int
    media_type: str | None


class Stream(Protocol):
    """An object's bytes from the bucket, from `start` on."""

    start: int
    length: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...
    def close(self) -> None: ...


class Tier(Protocol):
    redirect: bool  # shared hits answered with a presigned URL of the bucket

    async def find(self, digest: Digest, access: str) -> Kept | None: ...
    async def read(self, digest: Digest, start: int) -> Stream: ...
    async def manifest(self, digest: Digest, access: str) -> tuple[bytes, str | None] | None: ...
    async def presigned(self, digest: Digest) -> str: ...
    def used(self, digest: Digest) -> None: ...
    def keep_file(
        self, digest: Digest, path: Path, size: int, media_type: str, private: bool
    ) -> None: ...
    async def keep_bytes(
        self, digest: Digest, body: bytes, media_type: str, private: bool
    ) -> None: ...
    async def discard(self, digest: Digest, why: str) -> None: ...
    async def tag(self, upstream: str, repository: str, tag: str) -> SharedTag | None: ...
    async def set_tag(
        self, upstream: str, repository: str, tag: str, digest: Digest, media_type: str | None
    ) -> None: ...
    async def lease(self, key: str) -> Lease | None: ...
    async def set_quota(
        self,
        upstream: str,
        remaining: int | None,
        limit: int | None,
        window: int | None,
        blocked_until: float | None,
    ) -> None: ...
    async def quota(self, upstream: str) -> SharedQuota | None: ...
    async def wait_released(self, key: str, seconds: float) -> bool: ...
    async def release(self, key: str) -> None: ...
    def degraded(self) -> list[str]: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


class Unshared:
    """One replica: the shared tier holds nothing and keeps nothing."""

    redirect = False

    async def find(self, digest: Digest, access: str) -> Kept | None:
        return None

    async def read(self, digest: Digest, start: int) -> Stream:
        raise TierUnavailable("no shared tier")

    async def manifest(self, digest: Digest, access: str) -> tuple[bytes, str | None] | None:
        return None

    async def presigned(self, digest: Digest) -> str:
        raise TierUnavailable("no shared tier")

    def used(self, digest: Digest) -> None:
        pass

    def keep_file(
        self, digest: Digest, path: Path, size: int, media_type: str, private: bool
    ) -> None:
        pass

    async def keep_bytes(self, digest: Digest, body: bytes, media_type: str, private: bool) -> None:
        pass

    async def discard(self, digest: Digest, why: str) -> None:
        pass

    async def tag(self, upstream: str, repository: str, tag: str) -> SharedTag | None:
        return None

    async def set_tag(
        self, upstream: str, repository: str, tag: str, digest: Digest, media_type: str | None
    ) -> None:
        pass

    async def lease(self, key: str) -> Lease | None:
        return None

    async def set_quota(
        self,
        upstream: str,
        remaining: int | None,
        limit: int | None,
        window: int | None,
        blocked_until: float | None,
    ) -> None:
        pass

    async def quota(self, upstream: str) -> SharedQuota | None:
        return None

    async def wait_released(self, key: str, seconds: float) -> bool:
        return False

    async def release(self, key: str) -> None:
        pass

    def degraded(self) -> list[str]:
        return []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class _Part:
    """One engine of the tier (the database, the bucket) and whether it answers, as far as
    this replica knows. A part that failed is not called by requests (they would each wait
    for its timeout) until the background probe finds it answering again."""

    def __init__(
        self,
        name: str,
        failures: tuple[type[Exception], ...],
        probe: Callable[[], Awaitable[object]],
        metrics: Metrics,
        answers: tuple[type[Exception], ...] = (),
    ) -> None:
        """`failures` say the part cannot serve; `answers`, among them, are its answer
        about one thing (an object missing), passed on as they are."""
        self.name = name
        self.failures = failures
        self.answers = answers
        self.probe = probe
        self.metrics = metrics
        self.error: str | None = "not connected yet"  # None: it answers
        self.logged = False

    async def call(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work`'s answer; TierUnavailable when the part is down or fails now."""
        if self.error is not None:
            raise TierUnavailable(f"shared {self.name}: {self.error}")
        try:
            return await work()
        except self.answers:
            raise
        except self.failures as exc:
            self._failed(exc)
            raise TierUnavailable(f"shared {self.name}: {self.error}") from exc

    async def recover(self) -> None:
        if self.error is None:
            return
        try:
            await self.probe()
        except self.failures as exc:
            self._failed(exc)
            return
        if self.logged:
            log.warning("shared %s answers again: sharing resumes", self.name)
        self.error, self.logged = None, False
        self.metrics.shared_degraded.labels(self.name).set(0)

    def _failed(self, exc: Exception) -> None:
        self.error = str(exc) or type(exc).__name__
        self.metrics.shared_degraded.labels(self.name).set(1)
        if not self.logged:
            self.logged = True
            log.warning(
                "shared %s unreachable (%s): serving from this replica's cache and the"
                " upstream alone until it answers again",
                self.name,
                self.error,
            )

    def note(self) -> str | None:
        return None if self.error is None else f"shared {self.name} unreachable: {self.error}"


class SharedTier:
    def __init__(
        self,
        config: SharedConfig,
        metrics: Metrics | None = None,
        pinned: Callable[[], Awaitable[set[str]]] = _nothing_pinned,
    ) -> None:
        """`pinned`: the digests of pinned content, never evicted (by the replica that
        leads the shared eviction: each replica keeps the pins in its own cache)."""
        self.config = config
        self.redirect = config.redirect
        self.metrics = metrics or Metrics()
        self.bucket = Bucket(
            config.bucket,
            prefix=config.prefix,
            endpoint_url=config.endpoint_url,
            region=config.region,
        )
        self.index = SharedIndex(config.dsn())
        self.evictor = SharedEvictor(
            self.index,
            self.bucket,
            config.max_size,
            config.presign_ttl,
            pinned,
            self.metrics,
            interval=config.eviction_interval,
        )
        self._database = _Part(
            "database", (DatabaseUnavailable,), self._probe_database, self.metrics
        )
        # Any refusal of the bucket (unreachable, no bucket, no credentials) but a missing
        # object leaves the replica alone, as the database's does.
        self._bucket = _Part(
            "bucket", (BucketError,), self._probe_bucket, self.metrics, (ObjectMissing,)
        )
        self._opened: set[str] = set()
        self._uploads = asyncio.Semaphore(UPLOADS)
        self._uploading: set[Digest] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accessed: dict[str, float] = {}
        self._held: dict[str, tuple[Lease, asyncio.Task[None]]] = {}  # by key, heartbeating
        self.holder = config.advertise_url or ""
        self.lease_ttl = config.lease_ttl

    async def start(self) -> None:
        """Open what answers now; the rest is retried in the background."""
        await self._recover()
        self._spawn(self._background())
        self._spawn(self.evictor.run())

    async def close(self) -> None:
        for key in list(self._held):
            await self.release(key)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(TierUnavailable):
            await self._flush_touches()
        await self.index.close()
        await self.bucket.close()

    async def find(self, digest: Digest, access: str) -> Kept | None:
        if self._bucket.error is not None:  # what the rows say could not be read
            return None
        try:
            row = await self._database.call(lambda: self.index.blob(str(digest), access))
        except TierUnavailable:
            return None
        if row is None:
            self.metrics.shared_lookups.labels("miss").inc()
            return None
        self.metrics.shared_lookups.labels("hit").inc()
        self._accessed[row.digest] = time.time()
        return Kept(row.size, row.media_type)

    def used(self, digest: Digest) -> None:
        """Served from this replica's own cache: a use of the shared copy too, written with
        the next batch, so that what every replica serves itself does not age out of the
        shared tier (a row it does not hold is left alone)."""
        self._accessed[str(digest)] = time.time()

    async def read(self, digest: Digest, start: int) -> Stream:
        return await self._bucket.call(lambda: self.bucket.read(digest, start))

    async def manifest(self, digest: Digest, access: str) -> tuple[bytes, str | None] | None:
        """A manifest's bytes as the bucket has them (the caller verifies them)."""
        kept = await self.find(digest, access)
        if kept is None or kept.size > MAX_MANIFEST:
            return None
        try:
            body = await self._bucket.call(lambda: _read_all(self.read(digest, 0)))
        except (TierUnavailable, ObjectMissing) as exc:
            log.debug("shared manifest %s not read: %s", digest, exc)
            return None
        self.metrics.shared_bytes.inc(len(body))
        return body, kept.media_type

    async def presigned(self, digest: Digest) -> str:
        return await self._bucket.call(
            lambda: self.bucket.presigned_get(digest, self.config.presign_ttl)
        )

    def keep_file(
        self, digest: Digest, path: Path, size: int, media_type: str, private: bool
    ) -> None:
        """Uploaded in the background from the verified file at `path`, then recorded."""
        upload = partial(self.bucket.put_file, digest, path, media_type)
        self._keep(digest, upload, size, media_type, private)

    async def keep_bytes(self, digest: Digest, body: bytes, media_type: str, private: bool) -> None:
        """Uploaded and recorded before this returns: a manifest is small, and the replicas
        waiting for this one's work (a tag's lease) look for it in the shared tier."""
        if digest in self._uploading:
            return
        self._uploading.add(digest)
        upload = partial(self.bucket.put_bytes, digest, body, media_type)
        await self._upload(digest, upload, len(body), media_type, private)

    async def discard(self, digest: Digest, why: str) -> None:
        """Gone from the shared tier, row and object, so that the next request fetches
        it from the upstream: `why` (its bytes are not the digest's, say)."""
        log.warning("shared object %s deleted: %s", digest, why)
        with contextlib.suppress(TierUnavailable):
            await self._database.call(lambda: self.index.remove([str(digest)]))
        with contextlib.suppress(TierUnavailable):
            await self._bucket.call(lambda: self.bucket.delete(digest))

    async def tag(self, upstream: str, repository: str, tag: str) -> SharedTag | None:
        try:
            return await self._database.call(lambda: self.index.tag(upstream, repository, tag))
        except TierUnavailable:
            return None

    async def set_tag(
        self, upstream: str, repository: str, tag: str, digest: Digest, media_type: str | None
    ) -> None:
        now = time.time()
        with contextlib.suppress(TierUnavailable):
            await self._database.call(
                lambda: self.index.set_tag(upstream, repository, tag, str(digest), media_type, now)
            )

    async def lease(self, key: str) -> Lease | None:
        """`key`'s lease: this replica's (it then works for the fleet, and the lease is
        renewed until released), another's (its holder), or None: fetch alone."""
        if key in self._held:
            return self._held[key][0]
        try:
            lease = await self._database.call(
                lambda: self.index.take_lease(key, self.holder, self.lease_ttl)
            )
        except TierUnavailable:
            return None
        if lease.ours:
            self._held[key] = (lease, asyncio.create_task(self._heartbeat(lease)))
        self.metrics.leases.labels("taken" if lease.ours else "followed").inc()
        return lease

    async def set_quota(
        self,
        upstream: str,
        remaining: int | None,
        limit: int | None,
        window: int | None,
        blocked_until: float | None,
    ) -> None:
        """An upstream's pull quota as this replica just saw it, for the fleet."""
        with contextlib.suppress(TierUnavailable):
            await self._database.call(
                lambda: self.index.set_quota(upstream, remaining, limit, window, blocked_until)
            )

    async def quota(self, upstream: str) -> SharedQuota | None:
        """The quota as the replica that saw it last saw it; None: not known (or no
        database now)."""
        try:
            return await self._database.call(lambda: self.index.quota(upstream))
        except TierUnavailable:
            return None

    async def wait_released(self, key: str, seconds: float) -> bool:
        """Until the lease of `key` ends (True), or `seconds` pass."""
        try:
            return await self._database.call(lambda: self.index.wait_released(key, seconds))
        except TierUnavailable:
            await asyncio.sleep(seconds)
            return False

    async def release(self, key: str) -> None:
        """This replica's lease of `key` ended without the work done (or the work needs
        no row): another replica may take it at once."""
        held = self._drop(key)
        if held is not None:
            with contextlib.suppress(TierUnavailable):
                await self._database.call(lambda: self.index.release_lease(key, held.token))

    def _drop(self, key: str) -> Lease | None:
        held = self._held.pop(key, None)
        if held is None:
            return None
        held[1].cancel()
        return held[0]

    async def _heartbeat(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                renewed = await self._database.call(
                    lambda: self.index.renew_lease(lease.key, lease.token, self.lease_ttl)
                )
            except TierUnavailable:
                continue  # the lease may expire: another replica then fetches too
            if not renewed:
                log.warning("lease %s lost to another replica: its work is done twice", lease.key)
                self._held.pop(lease.key, None)
                return

    def degraded(self) -> list[str]:
        return [note for part in (self._database, self._bucket) if (note := part.note())]

    def _keep(
        self,
        digest: Digest,
        upload: Callable[[], Awaitable[bool]],
        size: int,
        media_type: str,
        private: bool,
    ) -> None:
        if digest in self._uploading:
            return
        self._uploading.add(digest)
        self._spawn(self._upload(digest, upload, size, media_type, private))

    async def _upload(
        self,
        digest: Digest,
        upload: Callable[[], Awaitable[bool]],
        size: int,
        media_type: str,
        private: bool,
    ) -> None:
        try:
            async with self._uploads:
                uploaded = await self._bucket.call(upload)
                await self._record(digest, size, media_type, private)
                if (
                    not uploaded
                    and await self._bucket.call(lambda: self.bucket.head(digest)) is None
                ):
                    # Evicted between the refused upload and the row: the row (unmarked
                    # now, so the eviction leaves it) needs its object again.
                    uploaded = await self._bucket.call(upload)
            if uploaded:  # counted once its row is there: then every replica sees it
                self.metrics.shared_uploads.inc()
                self.metrics.shared_uploaded_bytes.inc(size)
        except (TierUnavailable, FileNotFoundError) as exc:
            log.debug("%s not kept in the shared tier: %s", digest, exc)
        except Exception:
            log.exception("keeping %s in the shared tier failed", digest)
        finally:
            self._uploading.discard(digest)
            await self.release(blob_key(digest))  # not kept: another replica may try

    async def _record(self, digest: Digest, size: int, media_type: str, private: bool) -> None:
        """The blob's row, and the end of this replica's lease of it in the same
        transaction when it held one (waking the replicas waiting for it)."""
        lease = self._drop(blob_key(digest))
        if lease is None:
            await self._database.call(
                lambda: self.index.add_blob(str(digest), size, media_type, private)
            )
            return
        await self._database.call(
            lambda: self.index.complete_blob(
                lease.key, lease.token, str(digest), size, media_type, private
            )
        )

    async def _probe_database(self) -> None:
        if "database" not in self._opened:
            await self.index.open()
            self._opened.add("database")
        else:
            await self.index.tag("", "", "")

    async def _probe_bucket(self) -> None:
        if "bucket" not in self._opened:
            await self.bucket.open()
            self._opened.add("bucket")
        else:
            await self.bucket.head(_PROBE)

    async def _recover(self) -> None:
        await asyncio.gather(self._database.recover(), self._bucket.recover())

    async def _background(self) -> None:
        """Parts that failed probed, and the last accesses written in batches."""
        flushed = time.monotonic()
        while True:
            await asyncio.sleep(RETRY_AFTER)
            await self._recover()
            if time.monotonic() - flushed >= TOUCH_INTERVAL:
                flushed = time.monotonic()
                with contextlib.suppress(TierUnavailable):
                    await self._flush_touches()

    async def _flush_touches(self) -> None:
        accessed, self._accessed = self._accessed, {}
        if accessed:
            await self._database.call(lambda: self.index.touch(accessed))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _read_all(reading: Awaitable[Stream]) -> bytes:
    body = await reading
    try:
        return b"".join([chunk async for chunk in body.chunks()])
    finally:
        body.close()


def tier_of(
    config: SharedConfig | None, metrics: Metrics, pinned: Callable[[], Awaitable[set[str]]]
) -> Tier:
    return Unshared() if config is None else SharedTier(config, metrics, pinned)
