"""The `mirror` command: `serve`, `check-config`, and the admin commands (admin.py).

Each reads its configuration from, by precedence, its flags, the MIRROR_* environment
variables, the config file, the embedded default. The admin commands work on the storage
directory while the server runs: they go through the SQLite index (and its locking), and
never touch downloads in progress.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mirror import admin, logs
from mirror.app import make_app
from mirror.config import CONFIG_VARIABLE, Config, environment_names, load_config, with_overrides
from mirror.errors import ConfigError
from mirror.metrics import share_between_processes
from mirror.web.handoff import Receiver
from mirror.web.listener import (
    SHUTDOWN_TIMEOUT,
    cannot_listen,
    connection_cap,
    raise_open_files_limit,
    run_until_stopped,
    serving,
)
from mirror.workers import Workers

log = logging.getLogger("mirror")

WORKER_MARGIN = 2.0  # seconds of SHUTDOWN_TIMEOUT left after workers that did not stop are killed


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.file)
        overrides = {"storage": args.storage, "max_size": args.max_size}
        if args.command == "serve":
            overrides |= {"listen": args.listen, "upstream": args.upstream, "workers": args.workers}
        config = with_overrides(load_config(args.config, os.environ), **overrides)
        if args.command == "serve":
            return serve(config)
        return asyncio.run(admin.COMMANDS[args.command](config, args))
    except ConfigError as error:
        print(f"mirror: config error: {error}", file=sys.stderr)
        return 2


def check_config(path: str | None) -> int:
    """One line: where the configuration came from and how many upstreams it has."""
    config = load_config(path, os.environ)
    source = path or os.environ.get(CONFIG_VARIABLE) or "embedded default"
    variables = sorted(environment_names() & os.environ.keys() - {CONFIG_VARIABLE})
    if variables:
        source += f" with {', '.join(variables)}"
    print(f"{source}: OK ({len(config.upstreams)} upstream(s))")
    return 0


def serve(config: Config) -> int:
    logs.configure(config.log)
    log.info(
        "mirror listening on %s://%s, cache in %s (max %d bytes)",
        "https" if config.tls else "http",
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
            ", ".join(upstream.hosts) or "every registry host no other upstream lists (a mirror)",
            f" and /v2/{upstream.prefix}/..." if upstream.prefix else "",
            " (default)" if upstream.default else "",
        )
    _raise_open_files_limit(config)
    if config.workers == 1:
        run_until_stopped(_serve(config, None))
        return 0
    with tempfile.TemporaryDirectory(prefix="mirror-") as shared:
        metrics_dir = Path(shared, "metrics")
        metrics_dir.mkdir()
        share_between_processes(str(metrics_dir))
        run_until_stopped(_serve(config, str(Path(shared, "handoff.sock"))))
    return 0


def _raise_open_files_limit(config: Config) -> None:
    """Raises the open-files limit (worker processes inherit it) and says how many client
    connections it allows."""
    before, open_files = raise_open_files_limit()
    cap = connection_cap(config, open_files)
    if before != open_files:
        log.info("open files limit raised from %d to %d (the hard limit)", before, open_files)
    if cap < config.limits.max_connections:
        log.warning(
            "client connections: at most %d per process, not limits.max_connections (%d): "
            "the open files limit is %d; raise it (LimitNOFILE= in a systemd unit)",
            cap,
            config.limits.max_connections,
            open_files,
        )
    else:
        log.info("client connections: at most %d per process (limits.max_connections)", cap)


async def _serve(config: Config, handoff: str | None) -> None:
    """The primary process, with its workers when `handoff` is the socket to take their
    connections on."""
    app = make_app(config)
    if handoff is None:
        async with serving(app, config):
            await asyncio.Event().wait()  # until SIGTERM or SIGINT
        return
    await _check_port_free(config)
    workers = Workers(config, handoff)
    try:
        async with serving(app, config) as connection:
            receiver = Receiver(handoff, connection)
            receiver.start()
            try:
                await workers.run()
            finally:
                # Told now, the workers finish their answers while this process does.
                workers.terminate()
                receiver.close()
    finally:
        await workers.join(SHUTDOWN_TIMEOUT - WORKER_MARGIN)


async def _check_port_free(config: Config) -> None:
    """With SO_REUSEPORT a second mirror on the same port would not fail to bind, but take
    half the connections: so first bind as a lone server would, and fail as it would."""
    loop = asyncio.get_running_loop()
    host, port = config.listen.host, config.listen.port
    try:
        probe = await loop.create_server(asyncio.Protocol, host, port, start_serving=False)
    except OSError as exc:
        raise cannot_listen(config, exc) from None
    probe.close()
    await probe.wait_closed()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through registry mirror")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the mirror")
    _storage_flags(serve_cmd)
    serve_cmd.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve_cmd.add_argument("--upstream", help="upstream registry URL, replacing the default")
    serve_cmd.add_argument("--workers", help="processes serving the port (default 1)")
    check = commands.add_parser(
        "check-config", help="validate a config file, with the MIRROR_* environment over it"
    )
    check.add_argument("file", nargs="?", help=f"default: ${CONFIG_VARIABLE}, else none")
    _admin_flags(commands.add_parser("du", help="show the cache's disk use and budget"))
    _admin_flags(commands.add_parser("gc", help="run one eviction pass now"))
    ls = commands.add_parser("ls", help="list cached images: tags, size, last use")
    ls.add_argument("repository", nargs="?", help="only this repository")
    _admin_flags(ls)
    verify = commands.add_parser("verify", help="re-hash every blob, remove corrupt ones")
    verify.add_argument(
        "--sample", type=_count, metavar="N", help="of the shared tier, hash N objects at random"
    )
    _admin_flags(verify)
    rm = commands.add_parser("rm", help="remove an image from the cache")
    rm.add_argument("image", help="e.g. docker.io/library/alpine:3.20")
    _admin_flags(rm)
    warm = commands.add_parser("warm", help="pull images into the cache of a running mirror")
    warm.add_argument("images", nargs="+", help="e.g. docker.io/library/alpine:3.20")
    warm.add_argument("--mirror", default="http://127.0.0.1:5000", help="the mirror's URL")
    _admin_flags(warm, json_help="one JSON object per line on stdout: per image, and a summary")
    return parser


def _admin_flags(
    command: argparse.ArgumentParser, json_help: str = "one JSON document on stdout"
) -> None:
    _storage_flags(command)
    command.add_argument("--json", action="store_true", help=json_help)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a number of objects: {text!r}")
    return int(text)


def _storage_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config", help=f"YAML config file (default: ${CONFIG_VARIABLE}, else embedded defaults)"
    )
    command.add_argument("--storage", help="cache directory (default ./data)")
    command.add_argument("--max-size", help="cache size budget, e.g. 50GiB")


if __name__ == "__main__":
    sys.exit(main())
