"""The clients of benchmarks/run.py: a hashing GET, N concurrent GETs, wrk, peak memory,
CPU time.

`get_blob` speaks HTTP/1.1 over a plain socket (no HTTP library in the way): it times the
first body byte and the last, hashes every byte and checks the digest. The concurrent
variant runs it in threads (socket reads and hashing release the GIL). `run_wrk` runs
`wrk --latency` and parses its report. `PeakRss` reads the peak resident memory of some
processes over a phase; `cpu_seconds` their user+system CPU time so far, and
`hash_cpu_seconds` what hashlib's SHA-256 costs one core for a file's bytes (the reference
of the servers' CPU figures). Only loopback URLs are ever given to these.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

CHUNK = 1 << 20
MAX_HEAD = 64 * 1024


class GetError(RuntimeError):
    """A GET that failed, or whose bytes were not those asked for."""


@dataclass(frozen=True)
class Get:
    """One whole GET: seconds from sending the request to the first and the last body byte."""

    seconds: float
    first_byte: float
    size: int

    @property
    def mbps(self) -> float:
        return self.size / self.seconds / 1e6


def get_blob(
    url: str, digest: str, headers: dict[str, str] | None = None, timeout: float = 300.0
) -> Get:
    """GET `url` on a fresh connection, hash the body and check it against `digest`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"GET {parts.path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: mirror-bench"]
    lines += [f"{k}: {v}" for k, v in (headers or {"Accept": "*/*"}).items()]
    request = ("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=min(timeout, 60.0)) as sock:
        began = time.perf_counter()
        sock.sendall(request)
        got = _read_body(sock, began, began + timeout)
    if got[2] != digest:
        raise GetError(f"GET {url}: body hashes to {got[2]}, not {digest}")
    return Get(got[0], got[1], got[3])


def _read_body(sock: socket.socket, began: float, deadline: float) -> tuple[float, float, str, int]:
    """(total seconds, first-byte seconds, sha256 digest, length) of the answer's body."""
    head, rest = _read_head(sock, deadline)
    length = _content_length(head)
    first = time.perf_counter() - began if rest else None
    hasher = hashlib.sha256(rest)
    received = len(rest)
    buffer = memoryview(bytearray(CHUNK))
    while received < length:
        if time.perf_counter() > deadline:
            raise GetError(f"timed out after {received} of {length} bytes")
        n = sock.recv_into(buffer, min(CHUNK, length - received))
        if n == 0:
            raise GetError(f"connection closed after {received} of {length} bytes")
        if first is None:
            first = time.perf_counter() - began
        hasher.update(buffer[:n])
        received += n
    total = time.perf_counter() - began
    return total, first if first is not None else total, "sha256:" + hasher.hexdigest(), length


def _read_head(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD or time.perf_counter() > deadline:
            raise GetError("no complete response head")
        chunk = sock.recv(65536)
        if not chunk:
            raise GetError(f"connection closed before the response head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _content_length(head: bytes) -> int:
    status_line, *fields = head.decode("latin-1").split("\r\n")
    status = status_line.split(" ", 2)
    if len(status) < 2 or status[1] != "200":
        raise GetError(f"answer {status_line!r}")
    for field in fields:
        name, _, value = field.partition(":")
        if name.strip().lower() == "content-length":
            return int(value.strip())
    raise GetError("answer without Content-Length")


@dataclass(frozen=True)
class Crowd:
    """Several clients GETting one URL at once: wall seconds until the last was done."""

    wall: float
    gets: list[Get]


def get_concurrently(url: str, digest: str, clients: int, timeout: float = 300.0) -> Crowd:
    """`clients` threads GET `url` at the same moment; each checks its digest."""
    barrier = threading.Barrier(clients + 1, timeout=30)
    outcomes: list[Get | BaseException | None] = [None] * clients

    def client(n: int) -> None:
        try:
            barrier.wait()
            outcomes[n] = get_blob(url, digest, timeout=timeout)
        except BaseException as error:  # reported by the caller, not lost in the thread
            outcomes[n] = error

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join(max(0.0, began + timeout - time.perf_counter()))
    wall = time.perf_counter() - began
    return Crowd(wall, [_outcome(n, outcome) for n, outcome in enumerate(outcomes)])


def _outcome(n: int, outcome: Get | BaseException | None) -> Get:
    if isinstance(outcome, Get):
        return outcome
    raise GetError(f"client {n}: {outcome or 'did not finish in time'}")


# --------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class Wrk:
    """What `wrk --latency` reported."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers plus socket errors


_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def run_wrk(
    wrk: str,
    url: str,
    seconds: int,
    connections: int,
    threads: int,
    headers: dict[str, str] | None = None,
) -> Wrk:
    """`wrk -tT -cC -dSs --latency URL`, bounded by a subprocess timeout."""
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    command += ["--timeout", "10s"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    done = subprocess.run(
        [*command, url], capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def parse_wrk(text: str) -> Wrk:
    """Parse wrk 4's report (`--latency`): req/s, the 50% and 99% latencies, errors."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ", text, re.MULTILINE)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's report:\n{text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    errors = int(non_2xx[1]) if non_2xx else 0
    errors += sum(int(n) for n in sockets.groups()) if sockets else 0
    return Wrk(
        float(rps[1]), _percentile(text, "50"), _percentile(text, "99"), int(total[1]), errors
    )


def _percentile(text: str, percent: str) -> float:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {percent}% latency in wrk's report:\n{text}")
    return float(match[1]) * _TIME_UNITS[match[2]]


# --------------------------------------------------------------------------- memory


class PeakRss:
    """The peak resident memory (bytes, summed over `pids`) between enter and exit.

    Each process's high-water mark (VmHWM) is reset on entry by writing 5 to
    /proc/PID/clear_refs and read on exit; VmRSS is also sampled every 20 ms, which is
    what counts when the reset is not allowed. Processes that are gone count as 0.
    """

    def __init__(self, pids: list[int], every: float = 0.02, max_seconds: float = 900.0) -> None:
        self.pids = pids
        self.peak = 0
        self.reset = False
        self._every = every
        self._max_seconds = max_seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        self.reset = all(_reset_hwm(pid) for pid in self.pids) and bool(self.pids)
        self.peak = _sum_field(self.pids, "VmRSS")
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        if self.reset:
            self.peak = max(self.peak, _sum_field(self.pids, "VmHWM"))

    def _sample(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        while not self._done.wait(self._every) and time.monotonic() < deadline:
            self.peak = max(self.peak, _sum_field(self.pids, "VmRSS"))


def _reset_hwm(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _sum_field(pids: list[int], name: str) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            match = re.search(rf"^{name}:\s+(\d+) kB", status, re.MULTILINE)
            total += int(match[1]) * 1024 if match else 0
    return total


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (nginx's workers, its cache manager...)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    children.append(int(entry.name))
    return children


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of a process so far, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds of `pids` so far (from /proc/PID/stat; a process that
    is gone counts 0). Clock ticks: 10 ms resolution where CLK_TCK is 100."""
    return sum(cpu_ticks(pid) for pid in pids) / os.sysconf("SC_CLK_TCK")


def hash_cpu_seconds(path: Path, digest: str) -> float:
    """CPU seconds (`time.process_time`, this thread alone busy: one core) that
    `hashlib.sha256` spends on the bytes of `path`, read in CHUNK pieces; only the
    hashing is timed, not the reads. The digest is checked."""
    hasher = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))
    spent = 0.0
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            began = time.process_time()
            hasher.update(buffer[:n])
            spent += time.process_time() - began
    if "sha256:" + hasher.hexdigest() != digest:
        raise GetError(f"{path} hashes to sha256:{hasher.hexdigest()}, not {digest}")
    return spent
