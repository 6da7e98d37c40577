"""The `mirror` command: `serve` and `check-config`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from mirror.app import make_app
from mirror.config import Config, load_config, with_overrides
from mirror.errors import ConfigError

log = logging.getLogger("mirror")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            print(f"{args.file}: OK ({len(config.upstreams)} upstream(s))")
            return 0
        config = with_overrides(
            load_config(args.config),
            listen=args.listen,
            storage=args.storage,
            upstream=args.upstream,
            max_size=args.max_size,
        )
        return serve(config)
    except ConfigError as error:
        print(f"mirror: config error: {error}", file=sys.stderr)
        return 2


def serve(config: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
    web.run_app(make_app(config), host=config.listen.host, port=config.listen.port, print=None)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through registry mirror")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the mirror")
    serve_cmd.add_argument("--config", help="YAML config file (default: embedded defaults)")
    serve_cmd.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve_cmd.add_argument("--storage", help="cache directory (default ./data)")
    serve_cmd.add_argument("--upstream", help="upstream registry URL, replacing the default")
    serve_cmd.add_argument("--max-size", help="cache size budget, e.g. 50GiB")
    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    return parser


if __name__ == "__main__":
    sys.exit(main())
