"""Logging for `mirror serve`: text by default, one JSON object per line with
`log.format: json`, and one access line per request.

Nothing here ever formats a header: credentials and tokens travel only in headers, so
they cannot reach a log line.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mirror.config import LogConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
ACCESS = "mirror.access"
# What a handler learned, for the access line.
CACHE_RESULT = web.RequestKey("cache_result", str)
UPSTREAM_NAME = web.RequestKey("upstream_name", str)
HANDED_OFF = web.RequestKey("handed_off", bool)  # a worker's: the primary answers and logs it
# Bytes that were not an HTTP request (a TLS probe, an oversized header): no access line,
# the connection logs them once per episode.
MALFORMED = web.RequestKey("malformed", bool)
EPISODE_QUIET = 60.0  # seconds without an event that end an episode of it


class Episodes:
    """Events that can repeat without end (clients' malformed requests, TLS probes, slow
    clients), logged once per episode: when the first happens, and then only once
    `quiet` seconds have passed without another; that line says how many went unlogged.

    Kinds are a fixed set of names, never a client's address: memory stays bounded.
    """

    def __init__(self, logger: logging.Logger, quiet: float = EPISODE_QUIET) -> None:
        self.logger = logger
        self.quiet = quiet
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        self._last[kind] = now
        if last is not None and now - last < self.quiet:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        unlogged = self._unlogged.pop(kind, 0)
        message += " (logged once until %.0fs pass without another"
        args += (self.quiet,)
        if unlogged:
            message += "; %d more in the previous episode"
            args += (unlogged,)
        self.logger.log(level, message + ")", *args)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(config: LogConfig) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if config.format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    # Per record, logging would look up the caller's frame, thread and process, which no
    # format here prints: an access line per request makes that a cost on every hit. The
    # logging HOWTO ("Optimization") names these switches.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # ours replaces it


class AccessLogger(AbstractAccessLogger):
    """`GET /v2/library/alpine/blobs/sha256:… 200 3452 0.012s cache=hit upstream=hub`."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if HANDED_OFF in request or MALFORMED in request:
            return
        fields = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,  # containerd's ns= among others
            "status": response.status,
            # The body's declared length: sendfile bypasses aiohttp's own byte count.
            "bytes": 0 if request.method == "HEAD" else response.content_length or 0,
            "duration": round(time, 6),
            "cache": request.get(CACHE_RESULT, "-"),
            "upstream": request.get(UPSTREAM_NAME, "-"),
        }
        self.logger.info(
            "%s %s %d %d %.3fs cache=%s upstream=%s",
            fields["method"],
            request.path_qs,
            fields["status"],
            fields["bytes"],
            time,
            fields["cache"],
            fields["upstream"],
            extra={"fields": fields},
        )
