"""Logging for `mirror serve`: text by default, one JSON object per line with
`log.format: json`, and one access line per request.

Nothing here ever formats a header: credentials and tokens travel only in headers, so
they cannot reach a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

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


def _json_time(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _json_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# method, path, query, target (as the client sent it), status, bytes, duration, cache, upstream
Access = tuple[str, str, str, str, int, int, float, str, str]
BATCH_LINES = 256  # access lines gathered at most before they are written


class Output(logging.StreamHandler[TextIO]):
    """The one stream of log lines. Access lines, one per request, are gathered over a
    turn of the event loop and written together: on a cache hit a LogRecord, its
    formatting and a write of its own cost a good part of the answer. Every other record
    is written at once, after the access lines gathered before it, so lines keep their
    order."""

    def __init__(self, stream: TextIO, json_lines: bool) -> None:
        super().__init__(stream)
        self.json_lines = json_lines
        self.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
        self._pending: list[Access] = []

    def access(self, line: Access) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(line)
        if len(self._pending) >= BATCH_LINES:
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            self.flush()
        super().emit(record)

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            text = self._json(lines) if self.json_lines else self._text(lines)
            self.acquire()
            try:
                self.stream.write(text)
            finally:
                self.release()
        super().flush()

    @staticmethod
    def _text(lines: list[Access]) -> str:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        prefix = f"{stamp},{int(now % 1 * 1000):03d} INFO {ACCESS} "
        return "".join(f"{prefix}{_message(line)}\n" for line in lines)

    @staticmethod
    def _json(lines: list[Access]) -> str:
        at = _json_time(time.time())
        return "".join(
            json.dumps(
                {
                    "time": at,
                    "level": "info",
                    "logger": ACCESS,
                    "message": _message(line),
                    "method": line[0],
                    "path": line[1],
                    "query": line[2],  # containerd's ns= among others
                    "status": line[4],
                    "bytes": line[5],
                    "duration": round(line[6], 6),
                    "cache": line[7],
                    "upstream": line[8],
                }
            )
            + "\n"
            for line in lines
        )


def _message(line: Access) -> str:
    method, _, _, target, status, size, duration, cache, upstream = line
    return f"{method} {target} {status} {size} {duration:.3f}s cache={cache} upstream={upstream}"


def configure(config: LogConfig) -> None:
    # Per record, logging would look up the caller's frame, thread and process, which no
    # format here prints. The logging HOWTO ("Optimization") names these switches.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [Output(sys.stderr, config.format == "json")]
    root.setLevel(config.level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # ours replaces it


class AccessLogger(AbstractAccessLogger):
    """`GET /v2/library/alpine/blobs/sha256:… 200 3452 0.012s cache=hit upstream=hub`,
    handed to the Output that `configure` installed."""

    __slots__ = ("output",)

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        outputs = [h for h in logging.getLogger().handlers if isinstance(h, Output)]
        if not outputs:
            raise RuntimeError("logs.configure() comes before serving")
        self.output = outputs[0]

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if HANDED_OFF in request or MALFORMED in request:
            return
        method = request.method
        self.output.access(
            (
                method,
                request.path,
                request.query_string,
                request.raw_path,
                response.status,
                # The body's declared length: sendfile bypasses aiohttp's own byte count.
                0 if method == "HEAD" else response.content_length or 0,
                time,
                request.get(CACHE_RESULT, "-"),
                request.get(UPSTREAM_NAME, "-"),
            )
        )
