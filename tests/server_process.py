"""A server run as a subprocess on a loopback port, for tests: started, waited for, stopped.

Subclasses say how to start it (`_command`, `_env`, `_prepare`) and when it is ready
(`_ready`). Output goes to one log file, appended to across restarts, so request counts
and diagnostics cover a whole test; `log_tail` shows the current run's.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self


class ServerError(RuntimeError):
    """The server would not start, or is not the one this test started."""


class ServerProcess:
    name = "server"
    error: type[ServerError] = ServerError  # what start() raises

    def __init__(self, workdir: Path, log_path: Path, port: int, startup_timeout: float) -> None:
        self.workdir = workdir
        self.log_path = log_path
        self.port = port
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None  # of the last successful start
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None
        self._run_log_offset = 0  # where this run's output starts (for error tails)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int:
        """The running server's process id (what prlimit or kill act on)."""
        if self._proc is None:
            raise self.error(f"{self.name} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- what subclasses say

    def _prepare(self) -> None:
        """Before each start: write config files, create directories."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether it answers yet; raises `error` when what answers is not ours."""
        raise NotImplementedError

    # ---- lifecycle

    def start(self) -> None:
        """Start it and wait until it is ready."""
        if self.running:
            raise self.error(f"{self.name} on {self.host} is already running")
        self.stop()  # reap a crashed previous run and close its log handle
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        began = time.monotonic()
        self._spawn()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The end of the current run's output, for error messages."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._run_log_offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def _spawn(self) -> None:
        self._log_file = self.log_path.open("ab")
        self._run_log_offset = self._log_file.tell()
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self._env(),
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self.error(
                    f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            if self._ready():
                return
            time.sleep(0.05)
        raise self.error(
            f"{self.name} not ready on {self.host} after {self.startup_timeout}s:\n"
            f"{self.log_tail()}"
        )
