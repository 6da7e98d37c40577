"""Worker processes: with `workers` > 1, `mirror serve` is the primary process and keeps
`workers - 1` more running beside it, each on the same port (web/handoff.py says who
answers what).

Workers are started with `spawn` (a fresh interpreter: the primary has threads and a
running loop by then) and started again when one exits while the primary runs. A worker
stops when the primary does: on its SIGTERM, or when the hand-off socket closes (the
primary died).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import time
from multiprocessing.process import BaseProcess

from prometheus_client.multiprocess import mark_process_dead

from mirror import logs
from mirror.app import make_worker_app
from mirror.config import Config
from mirror.web.listener import run_until_stopped, serving
from mirror.web.registry import SENDER

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # seconds before a worker that exited is started again


class Workers:
    def __init__(self, config: Config, handoff: str) -> None:
        self.config = config
        self.handoff = handoff
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, BaseProcess] = {}  # by worker number, 1..workers-1

    async def run(self) -> None:
        """Start the workers, and each again when it exits; until cancelled."""
        for number in range(1, self.config.workers):
            self._start(number)
        while True:
            number, process = await self._any_exit()
            log.warning(
                "worker %d (pid %s) exited with code %s: starting it again in %.0fs",
                number,
                process.pid,
                process.exitcode,
                RESTART_DELAY,
            )
            await asyncio.sleep(RESTART_DELAY)
            self._start(number)

    async def stop(self, grace: float) -> None:
        """SIGTERM to each (they finish the answers under way), SIGKILL after `grace`."""
        for process in self._processes.values():
            process.terminate()
        await asyncio.to_thread(self._join_all, grace)

    def _join_all(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for process in self._processes.values():
            process.join(max(deadline - time.monotonic(), 0))
            if process.exitcode is None:
                process.kill()
                process.join()
            self._reaped(process)

    def _start(self, number: int) -> None:
        process = self._context.Process(
            target=run_worker,
            args=(self.config, self.handoff, number),
            name=f"mirror-worker-{number}",
            daemon=True,
        )
        process.start()
        self._processes[number] = process

    async def _any_exit(self) -> tuple[int, BaseProcess]:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()
        for number, process in self._processes.items():
            loop.add_reader(process.sentinel, _settle, exited, number)
        try:
            number = await exited
        finally:
            for process in self._processes.values():
                loop.remove_reader(process.sentinel)
        process = self._processes[number]
        process.join()
        self._reaped(process)
        return number, process

    def _reaped(self, process: BaseProcess) -> None:
        # Its live gauges no longer count.
        if process.pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            with contextlib.suppress(OSError):
                mark_process_dead(process.pid)  # type: ignore[no-untyped-call]


def run_worker(config: Config, handoff: str, number: int) -> None:
    """A worker process, from start to exit."""
    logs.configure(config.log)
    run_until_stopped(_serve_hits(config, handoff, number))


async def _serve_hits(config: Config, handoff: str, number: int) -> None:
    app = make_worker_app(config, handoff)
    async with serving(app, config):
        log.info("worker %d (pid %d) serving cache hits", number, os.getpid())
        await app[SENDER].closed()
    log.info("worker %d stops: the primary process is gone", number)


def _settle(future: asyncio.Future[int], number: int) -> None:
    if not future.done():
        future.set_result(number)
