"""Worker processes: with `workers` > 1, `mirror serve` is the primary process and keeps
`workers - 1` more running beside it, each on the same port (web/handoff.py says who
answers what).

Each worker is a fresh interpreter (`python -m mirror.workers`, its arguments pickled on
its stdin), not a fork: the primary has threads and a running loop by then. It is started
again when it exits while the primary runs. A worker stops when the primary does: on its
SIGTERM, or when the hand-off socket closes (the primary died).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import subprocess
import sys
import time

from prometheus_client.multiprocess import mark_process_dead

from mirror import logs
from mirror.app import make_worker_app
from mirror.config import Config
from mirror.web.listener import run_until_stopped, serving
from mirror.web.worker import SENDER

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # seconds before a worker that exited is started again


class Workers:
    def __init__(self, config: Config, handoff: str) -> None:
        self.config = config
        self.handoff = handoff
        self._processes: dict[int, subprocess.Popen[bytes]] = {}  # by number, 1..workers-1
        self._terminated_at: float | None = None

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
                process.returncode,
                RESTART_DELAY,
            )
            await asyncio.sleep(RESTART_DELAY)
            self._start(number)

    def terminate(self) -> None:
        """SIGTERM to each: they finish the answers under way, then exit."""
        self._terminated_at = time.monotonic()
        for process in self._processes.values():
            process.terminate()

    async def join(self, grace: float) -> None:
        """Until each has exited; SIGKILL to those still running `grace` seconds after
        `terminate`."""
        deadline = (self._terminated_at or time.monotonic()) + grace
        await asyncio.to_thread(self._join_all, deadline)

    def _join_all(self, deadline: float) -> None:
        for process in self._processes.values():
            try:
                process.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self._reaped(process)

    def _start(self, number: int) -> None:
        process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE)
        assert process.stdin is not None
        with process.stdin:
            process.stdin.write(pickle.dumps((self.config, self.handoff, number)))
        self._processes[number] = process

    async def _any_exit(self) -> tuple[int, subprocess.Popen[bytes]]:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()
        pidfds = {number: os.pidfd_open(p.pid) for number, p in self._processes.items()}
        try:
            for number, pidfd in pidfds.items():
                loop.add_reader(pidfd, _settle, exited, number)
            number = await exited
        finally:
            for pidfd in pidfds.values():
                loop.remove_reader(pidfd)
                os.close(pidfd)
        process = self._processes[number]
        process.wait()
        self._reaped(process)
        return number, process

    def _reaped(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):  # its live gauges no longer count
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


if __name__ == "__main__":
    run_worker(*pickle.load(sys.stdin.buffer))
