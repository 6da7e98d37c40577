"""The mirror's Prometheus metrics, on a registry of their own (passed in, never global).

No label takes unbounded values: no repository, tag or digest ever becomes a label.
Gauges that mirror state held elsewhere (cache size, Hub quota) are set when scraped.

With several worker processes, values live in files that every process writes and the
scrape sums (prometheus_client's multiprocess mode): see `share_between_processes`.
"""

from __future__ import annotations

import os
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# The methods a request is counted by; any other a client makes up counts as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def share_between_processes(directory: str) -> None:
    """Before the first `Metrics`: keep values in files under `directory`, shared with the
    processes started after this (they inherit the variable)."""
    os.environ[MULTIPROC_DIR] = directory
    # prometheus_client reads the variable when imported, which this process did already.
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "mirror_http_requests_total", "Requests answered.", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "mirror_http_request_duration_seconds", "Time to answer a request.", ["route"],
            registry=r,
        )  # fmt: skip
        self.cache_requests = Counter(
            "mirror_cache_requests_total",
            "Manifests and blobs asked for, by what the cache could do.",
            ["kind", "result"],
            registry=r,
        )
        self.served_bytes = Counter(
            "mirror_served_bytes_total", "Body bytes sent to clients.", ["source"], registry=r
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests_total", "Requests sent upstream, by answer.",
            ["upstream", "method", "status"], registry=r,
        )  # fmt: skip
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes_total", "Body bytes received from upstreams.", ["upstream"],
            registry=r,
        )  # fmt: skip
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining", "Pulls left, per the upstream's headers.",
            ["upstream"], registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit", "Pulls per window, per the upstream's headers.",
            ["upstream"], registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.fetches_in_flight = Gauge(
            "mirror_fetches_in_flight", "Blob downloads under way.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.fetch_joins = Counter(
            "mirror_fetch_joins_total", "Requests that joined a download under way.", registry=r
        )
        self.upstream_resumes = Counter(
            "mirror_upstream_resumes_total",
            "Blob downloads resumed (or restarted) after the upstream's body broke off.",
            ["upstream"], registry=r,
        )  # fmt: skip
        self.connections_refused = Counter(
            "mirror_connections_refused_total",
            "Client connections refused with 503 past limits.max_connections.",
            registry=r,
        )
        self.disk_full = Counter(
            "mirror_disk_full_total",
            "Blob downloads that met a full disk (ENOSPC) and were served without caching.",
            registry=r,
        )
        self.digest_mismatches = Counter(
            "mirror_digest_mismatches_total", "Upstream bytes that failed verification.",
            ["upstream"], registry=r,
        )  # fmt: skip
        self.cache_size = Gauge(
            "mirror_cache_size_bytes", "Bytes counted against the budget.", registry=r,
            multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.cache_max = Gauge(
            "mirror_cache_max_bytes", "The budget.", registry=r, multiprocess_mode="mostrecent"
        )
        self.cache_blobs = Gauge(
            "mirror_cache_blobs", "Blobs cached.", registry=r, multiprocess_mode="mostrecent"
        )
        self.evictions = Counter(
            "mirror_evictions_total", "Blobs evicted, by why.", ["reason"], registry=r
        )
        self.evicted_bytes = Counter("mirror_evicted_bytes_total", "Bytes evicted.", registry=r)
        self.uncached_passthrough = Counter(
            "mirror_uncached_passthrough_total",
            "Blobs and manifests served without caching: no room in the budget.",
            registry=r,
        )
        self.pin_refreshes = Counter(
            "mirror_pin_refreshes_total",
            "Background revalidations of pinned images, by result: unchanged, moved (to a"
            " digest not seen before, or fetched for the first time), failed.",
            ["result"],
            registry=r,
        )
        self.pin_prefetched_bytes = Counter(
            "mirror_pin_prefetched_bytes_total",
            "Bytes of pinned images' manifests and blobs fetched before any client asked.",
            registry=r,
        )
        self.shared_lookups = Counter(
            "mirror_shared_lookups_total",
            "Lookups in the shared tier (fleet mode) after a miss here, by result: hit, miss.",
            ["result"],
            registry=r,
        )
        self.shared_bytes = Counter(
            "mirror_shared_read_bytes_total", "Bytes read from the shared bucket.", registry=r
        )
        self.shared_uploads = Counter(
            "mirror_shared_uploads_total",
            "Blobs and manifests this replica uploaded to the shared bucket.",
            registry=r,
        )
        self.shared_uploaded_bytes = Counter(
            "mirror_shared_uploaded_bytes_total", "Bytes uploaded to the shared bucket.", registry=r
        )
        self.shared_degraded = Gauge(
            "mirror_shared_degraded",
            "1 while a part of the shared tier (database, bucket) does not answer: this replica"
            " serves alone.",
            ["part"],
            registry=r,
            multiprocess_mode="max",
        )
        self.shared_evictions = Counter(
            "mirror_shared_evictions_total",
            "Objects this replica deleted from the shared bucket, leading its eviction.",
            registry=r,
        )
        self.shared_evicted_bytes = Counter(
            "mirror_shared_evicted_bytes_total",
            "Bytes of the objects this replica deleted from the shared bucket.",
            registry=r,
        )
        self.shared_leader = Gauge(
            "mirror_shared_leader",
            "1 while this replica leads the shared tier's eviction.",
            registry=r,
            multiprocess_mode="max",
        )
        self.shared_size = Gauge(
            "mirror_shared_size_bytes",
            "Bytes counted against the shared budget, as the leader last counted them.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.shared_max = Gauge(
            "mirror_shared_max_bytes",
            "The shared budget, as the leader last set it.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.peer_requests = Counter(
            "mirror_peer_requests_total",
            "Requests of other replicas (fleet mode) for a blob this one has or is downloading,"
            " by result: served, refused (no or wrong fleet secret), absent (neither here).",
            ["result"],
            registry=r,
        )
        self.leases = Counter(
            "mirror_fleet_leases_total",
            "Leases of upstream work (fleet mode) this replica asked for, by outcome: taken"
            " (it works for the fleet), followed (another replica holds it), taken_over (taken"
            " after following a holder that could no longer send).",
            ["outcome"],
            registry=r,
        )
        self.peer_bytes = Counter(
            "mirror_peer_bytes_total",
            "Bytes this replica received from the replica fetching a blob for the fleet.",
            registry=r,
        )
        # Series with fixed label values exist from the start, so a dashboard shows 0 and
        # rate() has a beginning, rather than no data.
        for kind in ("manifest", "blob"):
            for result in ("hit", "miss", "stale", "shared"):
                self.cache_requests.labels(kind, result)
        for source in ("cache", "upstream", "shared"):
            self.served_bytes.labels(source)
        for reason in ("size", "age"):
            self.evictions.labels(reason)
        for result in ("unchanged", "moved", "failed"):
            self.pin_refreshes.labels(result)
        for result in ("served", "refused", "absent"):
            self.peer_requests.labels(result)
        for outcome in ("taken", "followed", "taken_over"):
            self.leases.labels(outcome)

        # prometheus_client's labels() checks and converts its arguments and takes a lock on
        # every call: per cached answer, that was several times the cost of the counting.
        self._answered = lru_cache(maxsize=1024)(self._answered_series)
        self._cache_result = lru_cache(maxsize=None)(self.cache_requests.labels)
        self._served_from = lru_cache(maxsize=None)(self.served_bytes.labels)

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """A request answered, by route (a fixed name, never the path)."""
        count, duration = self._answered(route, method if method in METHODS else "other", status)
        count.inc()
        duration.observe(seconds)

    def _answered_series(self, route: str, method: str, status: int) -> tuple[Counter, Histogram]:
        count = self.http_requests.labels(route, method, str(status))
        return count, self.http_duration.labels(route)

    def cache_result(self, kind: str, result: str) -> None:
        """A manifest or blob asked for (`kind`), and what the cache could do."""
        self._cache_result(kind, result).inc()

    def served(self, source: str, size: int) -> None:
        """Body bytes sent, by where they came from."""
        self._served_from(source).inc(size)

    def exposition(self) -> bytes:
        """The text format, of every process when they share values."""
        if MULTIPROC_DIR not in os.environ:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        MultiProcessCollector(every_process)  # type: ignore[no-untyped-call]
        return generate_latest(every_process)

    def add_upstream(self, name: str) -> None:
        """The series of a configured upstream, at 0 until it is used."""
        self.upstream_bytes.labels(name)
        self.upstream_resumes.labels(name)
        self.digest_mismatches.labels(name)
