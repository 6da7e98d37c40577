"""The bare aiohttp reference of benchmarks/run.py: one manifest's bytes from memory.

One process, one route, no middleware, no access log: the handler answers the bytes of
the file it was given with the headers the mirror sends for a manifest by digest
(Content-Type, Docker-Content-Digest, ETag, Docker-Distribution-Api-Version), on the
same asyncio event loop the mirror uses. What it serves per second is the ceiling for a
Python answer on this machine. Only 127.0.0.1 is listened on.

    python benchmarks/bench_bare.py --port P --path /v2/NAME/manifests/DIGEST \
        --body FILE --media-type TYPE --digest DIGEST --ready /.bench-ready
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from aiohttp import web

HOST = "127.0.0.1"


def make_app(path: str, body: bytes, media_type: str, digest: str, ready: str) -> web.Application:
    headers = {
        "Content-Type": media_type,
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Docker-Distribution-Api-Version": "registry/2.0",
    }

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    async def probe(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get(path, manifest)
    app.router.add_get(ready, probe)
    return app


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    try:
        await web.TCPSite(runner, HOST, port).start()
        await stopped.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True, help="the one path answered")
    parser.add_argument("--body", type=Path, required=True, help="file with the bytes")
    parser.add_argument("--media-type", required=True)
    parser.add_argument("--digest", required=True)
    parser.add_argument("--ready", required=True, help="a path answering 200, for probes")
    args = parser.parse_args(argv)
    app = make_app(args.path, args.body.read_bytes(), args.media_type, args.digest, args.ready)
    asyncio.run(serve(app, args.port))


if __name__ == "__main__":
    main()
