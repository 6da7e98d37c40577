"""An upstream's pull quota, as Docker Hub's headers state it.

Hub sends `ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600` and
`docker-ratelimit-source` on manifest answers, HEADs included; only a manifest GET
spends a pull. Once `remaining` is at the configured reserve, or Hub answered 429, no
counted GET is made until the window has passed, or until a HEAD (which costs nothing)
shows the quota is back. Any registry that sends these headers is treated the same.

Replicas of a fleet behind one address share one quota: each publishes what it saw, and
adopts what another saw later before it spends a pull (`QuotaShare`), so the reserve holds
for the fleet, not for each replica.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 60.0  # when a 429 says nothing of when to come back
PROBE_INTERVAL = 60.0  # how often a blocked upstream is asked (by HEAD) if quota is back
_VALUE = re.compile(r"\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")


class SeenQuota(Protocol):
    """An upstream's quota as a replica saw it, in Unix time."""

    @property
    def remaining(self) -> int | None: ...
    @property
    def limit(self) -> int | None: ...
    @property
    def window(self) -> int | None: ...
    @property
    def blocked_until(self) -> float | None: ...
    @property
    def observed_at(self) -> float: ...


class QuotaShare(Protocol):
    """Where the replicas of a fleet keep the last quota any of them saw."""

    async def set_quota(
        self,
        upstream: str,
        remaining: int | None,
        limit: int | None,
        window: int | None,
        blocked_until: float | None,
    ) -> None: ...
    async def quota(self, upstream: str) -> SeenQuota | None: ...


class RateLimit:
    def __init__(self, upstream_name: str, reserve: int) -> None:
        self.upstream_name = upstream_name
        self.reserve = reserve
        self.limit: int | None = None
        self.remaining: int | None = None
        self.window: int | None = None
        self.source: str | None = None
        self.observed_at = -math.inf  # monotonic
        self.observed_wall = -math.inf  # the same moment in Unix time, to compare with peers'
        self._blocked_until = -math.inf  # monotonic

    @property
    def blocked(self) -> bool:
        return time.monotonic() < self._blocked_until

    @property
    def retry_after(self) -> int:
        """Seconds until a counted GET may be made again (for `Retry-After`)."""
        return max(1, math.ceil(self._blocked_until - time.monotonic()))

    @property
    def worth_probing(self) -> bool:
        """Blocked, and long enough since the last word from upstream to ask again."""
        return self.blocked and time.monotonic() - self.observed_at >= PROBE_INTERVAL

    def observe(self, headers: Mapping[str, str], status: int) -> None:
        """Take in the headers of a manifest answer (or of a 429 to anything)."""
        now = time.monotonic()
        limit = _parse(headers.get("ratelimit-limit"))
        remaining = _parse(headers.get("ratelimit-remaining"))
        self.source = headers.get("docker-ratelimit-source", self.source)
        if limit is not None:
            self.limit, self.window = limit[0], limit[1] or self.window
        if remaining is not None:
            self.window = remaining[1] or self.window
            self._record(remaining[0])
        if remaining is not None or limit is not None or status == 429:
            self.observed_at, self.observed_wall = now, time.time()
        if status == 429:
            retry = _seconds(headers.get("Retry-After"))
            self.remaining = 0 if remaining is None else self.remaining
            self._block(now, retry if retry is not None else self.window or DEFAULT_BLOCK)
        elif remaining is not None:
            if remaining[0] > self.reserve:
                self._unblock()
            else:
                self._block(now, self.window or DEFAULT_BLOCK)

    def blocked_until(self) -> float | None:
        """When counted pulls may be made again, in Unix time; None: they may now."""
        left = self._blocked_until - time.monotonic()
        return time.time() + left if left > 0 else None

    def adopt(self, seen: SeenQuota) -> None:
        """What another replica saw, if it saw it after this one."""
        if seen.observed_at <= self.observed_wall:
            return
        now, wall = time.monotonic(), time.time()
        self.limit = seen.limit if seen.limit is not None else self.limit
        self.window = seen.window or self.window
        if seen.remaining is not None:
            self._record(seen.remaining)
        self.observed_wall = seen.observed_at
        self.observed_at = now - max(wall - seen.observed_at, 0.0)
        if seen.blocked_until is not None and seen.blocked_until > wall:
            self._block(now, seen.blocked_until - wall)
        elif seen.remaining is not None and seen.remaining > self.reserve:
            self._unblock()

    def _record(self, remaining: int) -> None:
        previous, self.remaining = self.remaining, remaining
        if previous is None:
            log.info(
                "upstream %s: pull quota %d of %s per %ss left (source %s)",
                self.upstream_name,
                remaining,
                self.limit,
                self.window,
                self.source,
            )
        elif self.limit and _decile(remaining, self.limit) < _decile(previous, self.limit):
            log.info(
                "upstream %s: pull quota down to %d of %d",
                self.upstream_name,
                remaining,
                self.limit,
            )

    def _block(self, now: float, seconds: float) -> None:
        if not self.blocked:
            log.warning(
                "upstream %s: pull quota exhausted (%s left, reserve %d): serving from cache "
                "only, no counted pulls for up to %ds",
                self.upstream_name,
                self.remaining,
                self.reserve,
                seconds,
            )
        self._blocked_until = now + seconds

    def _unblock(self) -> None:
        if self.blocked:
            log.info("upstream %s: pull quota back (%s left)", self.upstream_name, self.remaining)
        self._blocked_until = -math.inf


def _parse(value: str | None) -> tuple[int, int | None] | None:
    """`76;w=21600` → (76, 21600); None when absent or unreadable."""
    match = _VALUE.match(value) if value else None
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def _seconds(value: str | None) -> float | None:
    """A `Retry-After` in seconds (the HTTP-date form is rare from registries)."""
    return float(value) if value and value.strip().isdigit() else None


def _decile(remaining: int, limit: int) -> int:
    return remaining * 10 // limit
