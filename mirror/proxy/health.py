"""What operators see of the pull-through cache: its disk use against the budget, whether
it can serve pulls, and how each upstream is doing. `/metrics`, `/readyz` and the status
page render these (web/ops.py, web/status.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from mirror.shared.tier import Tier, Unshared
from mirror.storage.blobs import BlobStore
from mirror.storage.budget import Budget, Use
from mirror.upstream.client import Upstream


@dataclass(frozen=True)
class UpstreamHealth:
    name: str
    url: str
    failing: bool
    last_error: str | None
    last_error_at: float | None  # Unix time
    quota_remaining: int | None  # pulls left, when the upstream says (Docker Hub does)
    quota_limit: int | None


class Health:
    def __init__(
        self,
        budget: Budget,
        store: BlobStore,
        upstreams: Mapping[str, Upstream],
        tier: Tier | None = None,
    ) -> None:
        self.budget = budget
        self.store = store
        self.upstreams = upstreams
        self.tier = tier or Unshared()

    async def use(self) -> Use:
        return await self.budget.use()

    async def problems(self) -> list[str]:
        """Why pulls cannot be served now (none: ready): the index must answer and the
        storage take writes."""
        problems = []
        try:
            await self.budget.use()
        except Exception as exc:  # any failure of the index means not ready, whatever it is
            problems.append(f"index: {exc}")
        try:
            with tempfile.TemporaryFile(dir=self.store.tmp) as probe:
                probe.write(b"ready?")
        except OSError as exc:
            problems.append(f"storage not writable: {exc.strerror}")
        return problems

    def degraded(self) -> list[str]:
        """What this replica does without, serving all the same (the shared tier)."""
        return self.tier.degraded()

    def upstream_health(self) -> list[UpstreamHealth]:
        return [_health(upstream) for upstream in self.upstreams.values()]


def _health(upstream: Upstream) -> UpstreamHealth:
    at, error = upstream.last_error or (None, None)
    return UpstreamHealth(
        name=upstream.name,
        url=str(upstream.url),
        failing=upstream.failing,
        last_error=error,
        last_error_at=at,
        quota_remaining=upstream.ratelimit.remaining,
        quota_limit=upstream.ratelimit.limit,
    )
