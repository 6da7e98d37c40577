"""The `mirror` command: `serve`, `check-config`, and the admin commands `du` and `gc`.

The admin commands work on the storage directory while the server runs: they go through
the SQLite index (and its locking), and never touch downloads in progress.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime

from aiohttp import web

from mirror import logs
from mirror.app import INDEX_FILE, make_app
from mirror.config import Config, load_config, with_overrides
from mirror.errors import ConfigError
from mirror.eviction import Evictor, InUse
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index

log = logging.getLogger("mirror")

SHUTDOWN_TIMEOUT = 30.0  # SIGTERM: responses under way get this long to finish


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            print(f"{args.file}: OK ({len(config.upstreams)} upstream(s))")
            return 0
        overrides = {"storage": args.storage, "max_size": args.max_size}
        if args.command == "serve":
            overrides |= {"listen": args.listen, "upstream": args.upstream}
        config = with_overrides(load_config(args.config), **overrides)
        if args.command == "serve":
            return serve(config)
        return asyncio.run(ADMIN[args.command](config))
    except ConfigError as error:
        print(f"mirror: config error: {error}", file=sys.stderr)
        return 2


def serve(config: Config) -> int:
    logs.configure(config.log)
    log.info(
        "mirror listening on %s, cache in %s (max %d bytes)",
        config.listen,
        config.storage.path,
        config.storage.max_size,
    )
    for upstream in config.upstreams:
        log.info(
            "upstream %s: %s, auth %s, for %s%s%s",
            upstream.name,
            upstream.url,
            upstream.auth.type,
            ", ".join(upstream.hosts),
            f" and /v2/{upstream.prefix}/..." if upstream.prefix else "",
            " (default)" if upstream.default else "",
        )
    web.run_app(
        make_app(config),
        host=config.listen.host,
        port=config.listen.port,
        print=None,
        access_log=logging.getLogger(logs.ACCESS),
        access_log_class=logs.AccessLogger,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    return 0


async def disk_usage(config: Config) -> int:
    """`mirror du`: the budget, bytes used, blob count, the oldest last use."""
    async with _storage(config) as (evictor, index):
        usage = await index.usage()
        used = await evictor.used()
    storage = config.storage
    print(f"storage     {storage.path}")
    print(
        f"budget      {_size(storage.max_size)}; eviction from "
        f"{storage.high_watermark:.0%} down to {storage.low_watermark:.0%}"
        + (f", and after {_age(storage.max_age)} unused" if storage.max_age else "")
    )
    print(f"used        {_size(used)} ({used / storage.max_size:.1%} of the budget)")
    print(f"blobs       {usage.blobs} ({_size(usage.bytes)})")
    oldest = "-" if usage.oldest_access is None else _when(usage.oldest_access)
    print(f"oldest use  {oldest}")
    return 0


async def collect_garbage(config: Config) -> int:
    """`mirror gc`: one eviction pass now, down to the low watermark, and max_age."""
    async with _storage(config) as (evictor, _):
        evicted = await evictor.run_pass(force=True)
    print(
        f"evicted {evicted.blobs} blobs ({_size(evicted.bytes)}); "
        f"{_size(evicted.used)} of {_size(config.storage.max_size)} used"
    )
    return 0


ADMIN: dict[str, Callable[[Config], Coroutine[object, object, int]]] = {
    "du": disk_usage,
    "gc": collect_garbage,
}


@contextlib.asynccontextmanager
async def _storage(config: Config) -> AsyncIterator[tuple[Evictor, Index]]:
    """The index and an evictor, for a storage directory a server may be using now."""
    path = config.storage.path / INDEX_FILE
    if not path.exists():
        raise ConfigError("storage.path", f"no cache index at {path}")
    index = Index(path)
    await index.open()
    try:
        # No BlobStore.open(): its temp files may be a running server's downloads.
        yield Evictor(config, BlobStore(config.storage.path), index, InUse()), index
    finally:
        await index.close()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    return f"{days}d" if days else f"{rest // 3600}h{rest % 3600 // 60:02d}m"


def _when(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{moment} ({_age(max(time.time() - timestamp, 0))} ago)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through registry mirror")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the mirror")
    _storage_flags(serve_cmd)
    serve_cmd.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve_cmd.add_argument("--upstream", help="upstream registry URL, replacing the default")
    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    _storage_flags(commands.add_parser("du", help="show the cache's disk use and budget"))
    _storage_flags(commands.add_parser("gc", help="run one eviction pass now"))
    return parser


def _storage_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help="YAML config file (default: embedded defaults)")
    command.add_argument("--storage", help="cache directory (default ./data)")
    command.add_argument("--max-size", help="cache size budget, e.g. 50GiB")


if __name__ == "__main__":
    sys.exit(main())
