"""One server per storage directory: a running server holds an exclusive `flock` on
`<storage>/lock`, which names its pid.

A second server on the same directory would clear the first one's temp files at start
(its downloads in progress) and keep a budget blind to the first one's reservations, so
it must stop before it touches anything there. The lock goes with the process, however
it ends. The admin commands do not take it: they work beside the server, through the
index. Worker processes do not either: they never change the cache, and the primary
holds the lock for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from mirror.errors import ConfigError

LOCK_FILE = "lock"


@contextlib.contextmanager
def storage_locked(root: Path) -> Iterator[None]:
    """The directory `root` is this process's until the block ends; else ConfigError
    naming storage.path (and the holder's pid)."""
    fd = _open(root)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                "storage.path",
                f"{root} is in use by another mirror serve{_holder(fd)}",
            ) from None
        # Written only once held, so a refused server leaves the holder's pid in place.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open(root: Path) -> int:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError("storage.path", f"cannot use {root}: {exc.strerror}") from None


def _holder(fd: int) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f" (pid {pid})" if pid.isdigit() else ""
