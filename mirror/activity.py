"""What the mirror has served, for the status page: totals since start and over the last
hour, the repositories pulled most, and the blobs evicted lately.

Totals come from the Prometheus counters, which every process of a `workers` setup adds
to; the last hour is their difference with a sample taken about an hour ago (one a
minute is kept). Repositories and evictions are what this process saw.

Everything here is bounded whatever clients send, as repository names come from them: at
most TRACKED_REPOSITORIES names are counted (past that, all but the most used are
forgotten), WINDOW_MINUTES + 1 samples, RECENT_EVICTIONS evictions.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

from mirror.metrics import Metrics

TRACKED_REPOSITORIES = 1000
WINDOW_MINUTES = 60
RECENT_EVICTIONS = 20


@dataclass(frozen=True)
class Served:
    """Manifest and blob requests by what the cache did, and the body bytes sent."""

    hits: int = 0
    stale: int = 0  # served from cache while the upstream failed
    misses: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0

    @property
    def hit_ratio(self) -> float | None:
        """Share of the requests answered from the cache; None before the first."""
        answered = self.hits + self.stale + self.misses
        return (self.hits + self.stale) / answered if answered else None

    def __sub__(self, earlier: Served) -> Served:
        return Served(
            self.hits - earlier.hits,
            self.stale - earlier.stale,
            self.misses - earlier.misses,
            self.bytes_from_cache - earlier.bytes_from_cache,
            self.bytes_from_upstream - earlier.bytes_from_upstream,
        )


@dataclass(frozen=True)
class Counted:
    """What the metrics hold now, summed over every process."""

    served: Served
    fetches_in_flight: int


def counted(metrics: Metrics) -> Counted:
    """Read from the exposition, the one view that sums the processes' shared values."""
    results: dict[str, int] = {}
    sources: dict[str, int] = {}
    in_flight = 0
    text = metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mirror_cache_requests_total":
                result = sample.labels["result"]
                results[result] = results.get(result, 0) + int(sample.value)
            elif sample.name == "mirror_served_bytes_total":
                sources[sample.labels["source"]] = int(sample.value)
            elif sample.name == "mirror_fetches_in_flight":
                in_flight = int(sample.value)
    served = Served(
        hits=results.get("hit", 0),
        stale=results.get("stale", 0),
        misses=results.get("miss", 0),
        bytes_from_cache=sources.get("cache", 0),
        bytes_from_upstream=sources.get("upstream", 0),
    )
    return Counted(served, in_flight)


@dataclass(slots=True)
class RepositoryUse:
    """One repository's manifest GETs (pulls, as Docker Hub counts them) and body bytes."""

    upstream: str
    name: str  # as clients ask for it, prefix included
    pulls: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Eviction:
    at: float  # Unix time
    digest: str
    size: int
    reason: str  # "size" (the budget) or "age" (max_age)


class Activity:
    """Held by the primary process (the one that fetches and evicts)."""

    def __init__(self) -> None:
        self.started = time.time()
        self._began = time.monotonic()
        self._repositories: dict[tuple[str, str], RepositoryUse] = {}
        self._samples: deque[tuple[float, Served]] = deque(maxlen=WINDOW_MINUTES + 1)
        self._evictions: deque[Eviction] = deque(maxlen=RECENT_EVICTIONS)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._began

    def served(self, upstream: str, name: str, size: int, pull: bool) -> None:
        """A manifest or blob answered: on every request, so no more than a lookup."""
        use = self._repositories.get((upstream, name))
        if use is None:
            if len(self._repositories) >= TRACKED_REPOSITORIES:
                self._forget_least_used()
            use = self._repositories[upstream, name] = RepositoryUse(upstream, name)
        use.pulls += pull
        use.bytes += size

    def _forget_least_used(self) -> None:
        """Down to a quarter of the table by pulls and a quarter by bytes, so that this
        runs once per TRACKED_REPOSITORIES / 2 new names at most."""
        keep = TRACKED_REPOSITORIES // 4
        uses = self._repositories.values()
        kept = heapq.nlargest(keep, uses, key=_by_pulls) + heapq.nlargest(keep, uses, key=_by_bytes)
        self._repositories = {(use.upstream, use.name): use for use in kept}

    def top(self, count: int, by: Literal["pulls", "bytes"]) -> list[RepositoryUse]:
        """The `count` repositories with the most `pulls` or `bytes`."""
        return heapq.nlargest(
            count, self._repositories.values(), key=_by_pulls if by == "pulls" else _by_bytes
        )

    def evicted(self, digest: str, size: int, reason: str) -> None:
        self._evictions.append(Eviction(time.time(), digest, size, reason))

    def evictions(self) -> list[Eviction]:
        """The latest first."""
        return list(reversed(self._evictions))

    def sample(self, served: Served, now: float) -> None:
        """The totals at monotonic time `now`; taken once a minute."""
        self._samples.append((now, served))

    def last_hour(self, served: Served, now: float) -> Served:
        """What `served` (the totals at `now`) added since the oldest sample of the last
        hour; since start while the process is younger (its first sample, at start)."""
        for at, earlier in self._samples:
            if at >= now - WINDOW_MINUTES * 60:
                return served - earlier
        return served - self._samples[-1][1] if self._samples else served


def _by_pulls(use: RepositoryUse) -> tuple[int, int]:
    return use.pulls, use.bytes


def _by_bytes(use: RepositoryUse) -> tuple[int, int]:
    return use.bytes, use.pulls
