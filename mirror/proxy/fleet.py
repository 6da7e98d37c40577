"""Where a blob that no replica of the fleet has kept yet comes from (fleet mode).

A source like the others (sources.py), asked again at each start and at each resumption
after a cut, so that it follows the fleet as it changes:

1. the shared bucket, if a replica finished the blob meanwhile;
2. the upstream, if this replica takes the blob's lease: it then fetches for the whole
   fleet, and the lease ends when the verified blob is in the bucket (the tier completes
   it with the blob's row);
3. the replica holding the lease, streaming its download as it arrives (a peer request);
4. when the holder does not answer (it died), the lease is asked for again once it has
   expired unrenewed: this replica takes it over, from the byte it has reached; when the
   holder answers without the blob, again after a short wait.

Without the database (degraded), or after MAX_ROUNDS, the replica fetches alone: bytes
are verified whatever their source, so falling back costs the fleet a fetch, never a
wrong byte.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from mirror.errors import PeerRefused, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from mirror.metrics import Metrics
from mirror.proxy.sources import Body, Counted, SharedSource, Source
from mirror.reference import Digest
from mirror.shared.tier import Tier, blob_key

log = logging.getLogger(__name__)

MAX_ROUNDS = 5  # of bucket, lease and peer, before fetching alone
ROUND_WAIT = 1.0  # seconds waited for a holder's lease to end before asking again
MAX_WAIT = 120.0  # seconds waited, at most, for the lease of a holder that does not answer


class FleetSource:
    def __init__(
        self,
        tier: Tier,
        upstream: Source,
        peer: Callable[[str], Source],
        access: str,
        metrics: Metrics,
    ) -> None:
        """`peer(url)`: a source reading from the replica advertised at `url`."""
        self.tier = tier
        self.upstream = upstream
        self.peer = peer
        self.access = access
        self.metrics = metrics
        self.name = upstream.name  # one download per upstream and digest, as without a fleet
        self.retries = upstream.retries
        self.patience = upstream.patience
        self.shared = True  # until this replica fetches from the upstream: then it keeps it
        self.followed = False  # a holder, in an earlier round: taking the lease takes it over

    @asynccontextmanager
    async def body(self, digest: Digest, offset: int) -> AsyncIterator[Body]:
        async with AsyncExitStack() as stack:
            yield await self._open(stack, digest, offset)

    async def _open(self, stack: AsyncExitStack, digest: Digest, offset: int) -> Body:
        """The body from the first place that has it; errors of opening are handled here,
        those of reading (a cut) go to the download, which asks again from its offset."""
        key = blob_key(digest)
        for _ in range(MAX_ROUNDS):
            kept = await self.tier.find(digest, self.access)
            if kept is not None:
                return await self._from_bucket(stack, kept.size, digest, offset)
            lease = await self.tier.lease(key)
            if lease is None:
                break
            if lease.ours:
                # The holder before may have finished between the lookup and the lease.
                kept = await self.tier.find(digest, self.access)
                if kept is None:
                    if self.followed:
                        self.metrics.leases.labels("taken_over").inc()
                    break
                await self.tier.release(key)
                return await self._from_bucket(stack, kept.size, digest, offset)
            self.followed = True
            try:
                body = await stack.enter_async_context(self.peer(lease.holder).body(digest, offset))
                return Counted(body, self.metrics.peer_bytes)
            except PeerRefused as exc:  # the secrets differ: no round can mend that
                log.info("%s: fetching alone: %s", digest, exc.message)
                break
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                # Gone, most likely: its lease ends unrenewed, and is taken over then.
                log.info("%s: holder %s does not answer: %s", digest, lease.holder, exc)
                until_expiry = max(lease.expires_at - time.time(), 0.0)
                await self.tier.wait_released(key, min(until_expiry, MAX_WAIT) + ROUND_WAIT)
                continue
            except UpstreamError as exc:  # alive, but without the blob: not for long
                log.info("%s: holder %s cannot send it: %s", digest, lease.holder, exc)
            await self.tier.wait_released(key, ROUND_WAIT)
        self.shared = False
        return await stack.enter_async_context(self.upstream.body(digest, offset))

    async def _from_bucket(
        self, stack: AsyncExitStack, size: int, digest: Digest, offset: int
    ) -> Body:
        bucket = SharedSource(self.tier, size, self.upstream, self.metrics.shared_bytes)
        body = await stack.enter_async_context(bucket.body(digest, offset))
        self.shared = bucket.shared
        return body
