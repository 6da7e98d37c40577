"""The status page: `/` for people (HTML rendered here, refreshing itself, nothing fetched
from elsewhere, so it works on an offline network) and `/status.json` for programs, both
from one `Status`.

Every value shown is escaped: repository names come from clients, error messages from
upstreams. With `auth.htpasswd` set, both need a login, as authenticated upstreams do.
With `workers` > 1 they are the primary process's answers (workers hand them over).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from html import escape
from importlib import metadata

from aiohttp import web

from mirror.activity import Activity, Eviction, RepositoryUse, Served, counted
from mirror.metrics import Metrics
from mirror.proxy.health import UpstreamHealth
from mirror.web.middleware import ACTIVITY, METRICS
from mirror.web.ops import HEALTH
from mirror.web.registry import GATE

REFRESH_SECONDS = 10
SAMPLE_INTERVAL = 60.0  # seconds between samples of the totals, for the last hour
TOP = 10  # repositories listed, by pulls and by bytes
PROCESSES = web.AppKey("processes", int)

# The page needs nothing but its own inline style.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def add_routes(app: web.Application, processes: int = 1) -> None:
    app[PROCESSES] = processes
    app.router.add_get("/", page, name="status")
    app.router.add_get("/status.json", status_json, name="status_json")
    app.cleanup_ctx.append(_sampling)


@dataclass(frozen=True)
class Status:
    version: str
    started: float  # Unix time
    uptime: float  # seconds
    processes: int
    cache_used: int
    cache_max: int
    cache_blobs: int
    since_start: Served
    last_hour: Served
    fetches_in_flight: int
    upstreams: list[UpstreamHealth]
    by_pulls: list[RepositoryUse]
    by_bytes: list[RepositoryUse]
    evictions: list[Eviction]


async def page(request: web.Request) -> web.Response:
    await _login_if_required(request)
    body = render(await current(request.app))
    return web.Response(text=body, content_type="text/html", headers=SECURITY_HEADERS)


async def status_json(request: web.Request) -> web.Response:
    await _login_if_required(request)
    return web.json_response(as_json(await current(request.app)), headers=SECURITY_HEADERS)


async def _login_if_required(request: web.Request) -> None:
    gate = request.app[GATE]
    if gate.enabled:
        await gate.require(request.headers.get("Authorization"), request.remote or "")


async def current(app: web.Application) -> Status:
    health, activity = app[HEALTH], app[ACTIVITY]
    use = await health.use()
    now = counted(app[METRICS])
    return Status(
        version=_version(),
        started=activity.started,
        uptime=activity.uptime,
        processes=app[PROCESSES],
        cache_used=use.used,
        cache_max=use.max_size,
        cache_blobs=use.blobs,
        since_start=now.served,
        last_hour=activity.last_hour(now.served, time.monotonic()),
        fetches_in_flight=now.fetches_in_flight,
        upstreams=health.upstream_health(),
        by_pulls=activity.top(TOP, "pulls"),
        by_bytes=activity.top(TOP, "bytes"),
        evictions=activity.evictions(),
    )


@cache
def _version() -> str:
    try:
        return metadata.version("mirror")
    except metadata.PackageNotFoundError:
        return "unknown"


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    """Samples of the totals, the first at start: the last hour is measured from them."""
    task = asyncio.create_task(_sample(app[METRICS], app[ACTIVITY]))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sample(metrics: Metrics, activity: Activity) -> None:
    while True:
        activity.sample(counted(metrics).served, time.monotonic())
        await asyncio.sleep(SAMPLE_INTERVAL)


# --- JSON -------------------------------------------------------------------------------


def as_json(status: Status) -> dict[str, object]:
    return {
        "version": status.version,
        "started": _iso(status.started),
        "uptime_seconds": round(status.uptime, 3),
        "processes": status.processes,
        "cache": {
            "used_bytes": status.cache_used,
            "max_bytes": status.cache_max,
            "blobs": status.cache_blobs,
        },
        "since_start": _served_json(status.since_start),
        "last_hour": _served_json(status.last_hour),
        "fetches_in_flight": status.fetches_in_flight,
        "upstreams": [
            {
                "name": u.name,
                "url": u.url,
                "healthy": not u.failing,
                "last_error": u.last_error,
                "last_error_at": _iso(u.last_error_at) if u.last_error_at else None,
                "quota_remaining": u.quota_remaining,
                "quota_limit": u.quota_limit,
            }
            for u in status.upstreams
        ],
        "repositories": {
            "by_pulls": [dataclasses.asdict(use) for use in status.by_pulls],
            "by_bytes": [dataclasses.asdict(use) for use in status.by_bytes],
        },
        "evictions": [
            {"at": _iso(e.at), "digest": e.digest, "bytes": e.size, "reason": e.reason}
            for e in status.evictions
        ],
    }


def _served_json(served: Served) -> dict[str, object]:
    return {
        "hits": served.hits,
        "stale": served.stale,
        "misses": served.misses,
        "hit_ratio": served.hit_ratio,
        "bytes_from_cache": served.bytes_from_cache,
        "bytes_from_upstream": served.bytes_from_upstream,
        # What the cache kept off the uplink: every byte it served.
        "bytes_saved": served.bytes_from_cache,
    }


def _iso(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).isoformat(timespec="seconds")


# --- HTML -------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:1em 1.6em;color:#1d2430;
background:#f6f7f9}
h1{font-size:1.4em;margin:0}h2{font-size:1em;margin:0 0 .4em;color:#3b4a5e}
header p{margin:.2em 0 1em;color:#56657a}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(34em,1fr));gap:1.2em 2em}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{text-align:left;padding:.25em .7em;border-bottom:1px solid #e2e6ec;vertical-align:top}
thead th{background:#eef1f5;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{height:1.2em;background:#e2e6ec;border-radius:3px;overflow:hidden}
.bar div{height:100%;background:#3a7bd5}
.ok{color:#1d7a36;font-weight:600}.failing{color:#b42318;font-weight:600}
.digest{font-family:ui-monospace,monospace;font-size:.85em;word-break:break-all}
footer{margin-top:1.5em;color:#56657a;font-size:.9em}
"""


def render(status: Status) -> str:
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>mirror status</title><style>{STYLE}</style></head><body>",
            _header(status),
            "<main>",
            _cache(status),
            _traffic(status),
            _upstreams(status.upstreams),
            _repositories("by-pulls", "Most pulled repositories", status.by_pulls),
            _repositories("by-bytes", "Repositories by bytes served", status.by_bytes),
            _evictions(status.evictions),
            "</main>",
            _footer(status),
            "</body></html>",
        ]
    )


def _header(status: Status) -> str:
    return (
        "<header><h1>mirror</h1>"
        f"<p>version <span id=version>{_e(status.version)}</span>"
        f" · up <span id=uptime>{_duration(status.uptime)}</span>"
        f" (since {_when(status.started)})"
        f" · refreshes every {REFRESH_SECONDS} s · <a href=status.json>status.json</a></p>"
        "</header>"
    )


def _cache(status: Status) -> str:
    share = min(status.cache_used / status.cache_max, 1.0) if status.cache_max else 1.0
    return (
        "<section><h2>Cache</h2>"
        f'<div class=bar role=meter aria-valuenow="{share:.4f}" aria-valuemin=0 aria-valuemax=1>'
        f'<div style="width:{share:.2%}"></div></div>'
        f"<p id=cache-use>{_size(status.cache_used)} of {_size(status.cache_max)}"
        f" ({share:.1%}) · {status.cache_blobs} blobs</p></section>"
    )


def _traffic(status: Status) -> str:
    start, hour = status.since_start, status.last_hour
    rows = [
        ("hit ratio", "hit-ratio", _ratio(start.hit_ratio), _ratio(hour.hit_ratio)),
        ("hits", "hits", str(start.hits), str(hour.hits)),
        ("stale (upstream failing)", "stale", str(start.stale), str(hour.stale)),
        ("misses", "misses", str(start.misses), str(hour.misses)),
        (
            "served from cache",
            "from-cache",
            _size(start.bytes_from_cache),
            _size(hour.bytes_from_cache),
        ),
        (
            "served from upstream",
            "from-upstream",
            _size(start.bytes_from_upstream),
            _size(hour.bytes_from_upstream),
        ),
        ("bandwidth saved", "saved", _size(start.bytes_from_cache), _size(hour.bytes_from_cache)),
    ]
    body = "".join(
        f"<tr><th>{_e(label)}</th><td class=n id={key}-since-start>{_e(since)}</td>"
        f"<td class=n id={key}-last-hour>{_e(last)}</td></tr>"
        for label, key, since, last in rows
    )
    return (
        "<section><h2>Traffic</h2><table><thead><tr><th>manifests and blobs</th>"
        f"<th>since start</th><th>last hour</th></tr></thead><tbody>{body}</tbody></table>"
        f"<p>Fetches in flight: <span id=fetches-in-flight>{status.fetches_in_flight}</span>"
        "</p></section>"
    )


def _upstreams(upstreams: list[UpstreamHealth]) -> str:
    rows = []
    for u in upstreams:
        health = (
            '<span class="failing">failing</span>' if u.failing else '<span class="ok">ok</span>'
        )
        error = f"{_when(u.last_error_at)}: {_e(u.last_error)}" if u.last_error_at else "none"
        quota = (
            f"{u.quota_remaining} of {u.quota_limit}"
            if u.quota_remaining is not None and u.quota_limit is not None
            else "not reported"
        )
        rows.append(
            f"<tr><td>{_e(u.name)}</td><td>{_e(u.url)}</td><td>{health}</td>"
            f"<td>{error}</td><td class=n>{_e(quota)}</td></tr>"
        )
    return (
        "<section><h2>Upstreams</h2><table id=upstreams><thead><tr><th>name</th><th>url</th>"
        "<th>health</th><th>last error</th><th>pull quota left</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _repositories(key: str, title: str, uses: list[RepositoryUse]) -> str:
    rows = "".join(
        f"<tr><td>{_e(use.name)}</td><td>{_e(use.upstream)}</td>"
        f"<td class=n>{use.pulls}</td><td class=n>{_size(use.bytes)}</td></tr>"
        for use in uses
    )
    if not uses:
        rows = "<tr><td colspan=4>none yet</td></tr>"
    return (
        f"<section><h2>{_e(title)}</h2><table id={key}><thead><tr><th>repository</th>"
        "<th>upstream</th><th>pulls</th><th>bytes</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _evictions(evictions: list[Eviction]) -> str:
    rows = "".join(
        f"<tr><td>{_when(e.at)}</td><td class=digest>{_e(e.digest)}</td>"
        f"<td class=n>{_size(e.size)}</td><td>{_e(e.reason)}</td></tr>"
        for e in evictions
    )
    if not evictions:
        rows = "<tr><td colspan=4>none since start</td></tr>"
    return (
        "<section><h2>Recent evictions</h2><table id=evictions><thead><tr><th>when</th>"
        "<th>digest</th><th>size</th><th>why</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _footer(status: Status) -> str:
    if status.processes == 1:
        return ""
    return (
        f"<footer>{status.processes} processes: the totals and fetches count them all;"
        " repositories and evictions are the primary's, which cache hits answered by"
        " the other processes do not reach.</footer>"
    )


def _e(text: str | None) -> str:
    return escape(text or "", quote=True)


def _ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.1%}"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _when(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
