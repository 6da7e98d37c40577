"""Where the mirror's CPU goes: py-spy stacks and syscall counts of `mirror serve` under load.

A real docker-registry on loopback (the upstream) is seeded with a 5 x 1 MiB image and a
big single-layer one; `mirror serve` (the console script of this checkout, embedded
defaults, an access line per request, one process) proxies it. Scenarios (--scenarios):

- `manifest`: wrk on the small image's manifest by digest, a cache hit (filled first);
- `blob`: wrk on its first 1 MiB layer, a cache hit;
- `cold`: one GET of the big blob from a freshly started mirror (empty cache), the body
  hashed and checked by the client; --cold-rounds times (a fresh mirror each), the stacks
  and counts added up;
- `bare`: the `manifest` load on run.py's bare aiohttp reference (bench_bare.py: the
  same bytes and headers from memory, no middleware, no access log), for comparison.

Each load runs twice. First counted, nothing pausing the mirror: `perf stat` counts its
system calls on the kernel's tracepoints, `perf record -e cpu-clock` samples it on-CPU
(kernel and libraries included; Python frames are one `_PyEval_EvalFrameDefault`), and
/proc/PID/stat gives its user+system CPU seconds: these give the CPU per request (or per
MiB) and the req/s. Then sampled: `py-spy record --native --format raw` (collapsed
stacks, NAME.txt under --out; an SVG flame graph beside it when inferno-flamegraph or
flamegraph.pl is installed). py-spy pauses the process for every sample (with --native,
long enough to cut req/s by a third or more) and interrupts the system calls its threads
are blocked in, which then restart: so nothing is counted while it samples. Samples of
threads blocked on a lock (aiosqlite's idle worker) are left out as idle; epoll_wait
samples are kept and shown (under wrk the loop seldom waits; in the cold GET it also
waits for the upstream).

The summary (stdout, and summary.md under --out; NAME.json keeps the counts, so
--summarize can redo it) shows, per scenario: CPU per request (or per MiB), system calls
per request (or per MiB; epoll_wait calls are event-loop iterations), perf's on-CPU top
symbols, py-spy's top frames by own and by cumulative samples, and each sample's owner:
the HTTP parser, our middleware, the access log, metrics, routing, stat calls, hashing...
Microseconds are shares of the counted CPU per unit.

Needs py-spy (pip install py-spy) and ptrace rights (root), docker-registry, wrk; perf
optional. Only 127.0.0.1 is used.

    python benchmarks/profile_mirror.py                          # all three, 10 s wrk, 256 MiB
    python benchmarks/profile_mirror.py --scenarios manifest --seconds 20 --rate 250
    python benchmarks/profile_mirror.py --summarize --out DIR     # again, from the files
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_clients import get_blob, run_wrk
from bench_servers import BareServer, BenchRegistry, MirrorServer
from run import MANIFEST_ACCEPT, isolate_from_proxies
from upstream_registry import PushedImage, push_image

MiB = 1 << 20
SCENARIOS = ("manifest", "blob", "cold", "bare")
TOP = 20
SYSCALLS = (
    "epoll_wait",
    "recvfrom",
    "sendto",
    "sendmsg",
    "sendfile64",
    "read",
    "write",
    "writev",
    "pread64",
    "pwrite64",
    "newfstatat",
    "statx",
    "openat",
    "close",
    "lseek",
    "futex",
    "fdatasync",
    "renameat2",
    "rename",
    "setsockopt",
    "getsockopt",
    "epoll_ctl",
    "getpid",
    "gettid",
    "getpeername",
    "getsockname",
    "fcntl",
    "ioctl",
    "clock_gettime",
    "brk",
    "mmap",
    "munmap",
    "madvise",
    "getrandom",
    "shutdown",
)

# Named parts of a stack: a sample counts for a part when any of its frames matches.
PARTS = [
    ("aiohttp HTTP parser (requests, upstream answers)", r"http_parser|parse_headers|feed_data"),
    ("aiohttp web_protocol (connection loop)", r"aiohttp/web_protocol\.py"),
    ("aiohttp response writing", r"aiohttp/(web_response|http_writer|web_fileresponse)\.py"),
    ("aiohttp routing (web_urldispatcher)", r"aiohttp/web_urldispatcher\.py"),
    ("mirror middleware (web/middleware.py)", r"mirror/web/middleware\.py"),
    ("access log (mirror/logs.py, logging)", r"mirror/logs\.py|/logging/__init__\.py"),
    ("metrics (prometheus_client)", r"prometheus_client/"),
    ("mirror routes (web/registry.py, routing.py)", r"mirror/web/registry\.py|mirror/routing\.py"),
    ("mirror responses (web/responses.py)", r"mirror/web/responses\.py"),
    ("mirror proxy (proxy/)", r"mirror/proxy/"),
    ("mirror storage (storage/)", r"mirror/storage/"),
    ("mirror reference parsing", r"mirror/reference\.py"),
    ("mirror upstream client (upstream/)", r"mirror/upstream/"),
    ("stat calls", r"\bstat\b|fstat|newfstatat|statx|posix_do_stat|_path_stat|os_stat"),
    ("SHA-256 (libcrypto)", r"sha256|SHA256"),
    ("sendfile", r"sendfile"),
    ("sqlite", r"sqlite"),
    ("event loop (asyncio)", r"asyncio/(base_events|selector_events)\.py|selectors\.py"),
    ("epoll_wait", r"epoll_wait|epoll_pwait"),
]

# Owners, for the exclusive breakdown: each sample goes to its innermost frame that
# matches one. A system call (a libc leaf) is named with the owner that made it.
SYSCALL_OWNERS = [
    ("socket send", r"^(send|sendto|sendmsg|writev|__send) \("),
    ("socket recv", r"^(recv|recvfrom|recvmsg|__recv) \("),
    ("sendfile", r"^sendfile64 \("),
    ("write", r"^(write|__write|pwrite64) \("),
    ("stat", r"^(fstatat64|fstat64|fstat|stat64|statx|__fxstat64|__xstat64) \("),
    ("open", r"^(open64|openat64|__open64) \("),
    ("close", r"^(close|__close) \("),
    ("fsync", r"^(fsync|fdatasync) \("),
    ("epoll_wait", r"^epoll_wait \("),
]
OWNERS = [
    ("SHA-256 (libcrypto)", r"libcrypto|SHA256|sha256_block"),
    ("access log (mirror/logs.py, logging)", r"mirror/logs\.py|/logging/__init__\.py"),
    ("metrics (prometheus_client)", r"prometheus_client/"),
    (
        "aiohttp HTTP parser (requests, upstream answers)",
        r"aiohttp/(_http_parser|http_parser)|_http_parser",
    ),
    ("aiohttp routing", r"aiohttp/web_urldispatcher\.py"),
    ("aiohttp response", r"aiohttp/(web_response|http_writer|web_fileresponse)\.py"),
    ("aiohttp request object", r"aiohttp/(web_request|helpers|http_)|multidict|yarl/"),
    ("aiohttp app, middleware chain", r"aiohttp/(web_app|web_middlewares)\.py"),
    ("aiohttp web_protocol", r"aiohttp/web_protocol\.py"),
    ("mirror middleware", r"mirror/web/middleware\.py"),
    ("mirror handlers, routing", r"mirror/web/registry\.py|mirror/routing\.py"),
    ("mirror responses", r"mirror/web/responses\.py"),
    ("mirror reference parsing", r"mirror/reference\.py"),
    ("mirror proxy", r"mirror/proxy/"),
    ("mirror storage", r"mirror/storage/"),
    ("mirror other", r"mirror/"),
    ("sqlite", r"sqlite"),
    ("event loop (asyncio, selectors)", r"asyncio/|selectors\.py|_asynciomodule|selectmodule"),
]


@dataclass
class Profile:
    """One scenario: its samples, syscall counts and CPU, over `units` requests or MiB."""

    name: str
    unit: str  # "request" or "MiB"
    units: float
    cpu: tuple[float, float]  # user, system seconds
    wall: float
    stacks: Counter[tuple[str, ...]] = field(default_factory=Counter)
    syscalls: dict[str, int] = field(default_factory=dict)
    oncpu: dict[str, int] = field(default_factory=dict)  # perf samples by "dso: symbol"
    notes: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu)

    def add(self, other: Profile) -> None:
        """Another round of the same scenario."""
        self.units += other.units
        self.cpu = (self.cpu[0] + other.cpu[0], self.cpu[1] + other.cpu[1])
        self.wall += other.wall
        self.stacks.update(other.stacks)
        for name, count in other.syscalls.items():
            self.syscalls[name] = self.syscalls.get(name, 0) + count
        for name, count in other.oncpu.items():
            self.oncpu[name] = self.oncpu.get(name, 0) + count
        self.notes += other.notes


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of `pid` so far (/proc/PID/stat utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_since(pid: int, before: tuple[float, float]) -> tuple[float, float]:
    now = cpu_split(pid)
    return now[0] - before[0], now[1] - before[1]


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- recorders


@contextlib.contextmanager
def py_spy(pid: int, out: Path, rate: int, native: bool) -> Iterator[None]:
    """`py-spy record` on `pid` (raw collapsed stacks to `out`) while the block runs."""
    command = ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    command += ["--output", str(out), *(["--native"] if native else [])]
    spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.5)  # attached, and its first samples taken
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy exited: {spy.stdout.read().decode() if spy.stdout else ''}")
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        output, _ = spy.communicate(timeout=120)
        if not out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {output.decode(errors='replace')}")


@contextlib.contextmanager
def perf_syscalls(pid: int, counts: dict[str, int]) -> Iterator[None]:
    """`perf stat` on the syscall tracepoints of `pid` while the block runs (skipped when
    perf is missing); fills `counts` (name: calls; `all` is every syscall)."""
    perf = shutil.which("perf")
    if perf is None:
        yield
        return
    events = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{s}" for s in SYSCALLS)]
    with tempfile.NamedTemporaryFile("r", suffix=".perf") as report:
        command = [perf, "stat", "-x", ",", "-o", report.name, "-p", str(pid)]
        for event in events:
            command += ["-e", event]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            for line in Path(report.name).read_text().splitlines():
                cells = line.split(",")
                if len(cells) > 2 and cells[0].strip().isdigit():
                    name = cells[2].rsplit(":", 1)[-1].removeprefix("sys_enter_")
                    counts["all" if name == "sys_enter" else name] = int(cells[0])


PERF_LINE = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$")


@contextlib.contextmanager
def perf_oncpu(pid: int, data: Path, samples: dict[str, int]) -> Iterator[None]:
    """`perf record -e cpu-clock` (on-CPU samples, kernel included, no call graphs) of
    `pid` while the block runs; fills `samples` by "dso: symbol" (a library without
    symbols: "dso: (no symbols)"). Skipped when perf is missing."""
    perf = shutil.which("perf")
    if perf is None:
        yield
        return
    command = [perf, "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", str(pid)]
    proc = subprocess.Popen(
        [*command, "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        options = ["--no-children", "--sort", "dso,sym", "--stdio", "-n"]
        report = subprocess.run(
            [perf, "report", "-i", str(data), *options],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        for line in report.stdout.splitlines():
            match = PERF_LINE.match(line)
            if match:
                count, dso, _, symbol = match.groups()
                symbol = "(no symbols)" if symbol.startswith("0x") else symbol
                key = f"{dso}: {symbol}"
                samples[key] = samples.get(key, 0) + int(count)


@contextlib.contextmanager
def counting(args: argparse.Namespace, pid: int, name: str) -> Iterator[Profile]:
    """The first pass, nothing pausing the process: perf stat (system calls) and perf
    record (on-CPU samples) on `pid` while the block runs, into the Profile yielded (the
    caller sets its CPU, units and wall)."""
    profile = Profile(name, "", 0, (0.0, 0.0), 0.0)
    data = args.out / f"{name}.perf.data"
    with perf_syscalls(pid, profile.syscalls), perf_oncpu(pid, data, profile.oncpu):
        yield profile


@contextlib.contextmanager
def sampling(args: argparse.Namespace, pid: int, name: str, profile: Profile) -> Iterator[None]:
    """The second pass: py-spy alone (it pauses the process for every sample, and
    interrupts the system calls its threads are blocked in, which then restart: nothing
    is counted meanwhile); its stacks go to `profile`."""
    stacks = args.out / f"{name}.txt"
    with py_spy(pid, stacks, args.rate, args.native):
        yield
    profile.stacks = read_stacks(stacks)


# --------------------------------------------------------------------------- scenarios


def profile_wrk(
    args: argparse.Namespace,
    name: str,
    server: tuple[str, int],
    path: str,
    digest: str,
    headers: dict[str, str],
) -> Profile:
    """wrk twice on one cache hit of `server` (its URL and process id): counted, then
    sampled."""
    url, pid = server[0] + path, server[1]
    get_blob(url, digest, headers or None)  # fills the cache; checks the bytes
    time.sleep(1.0)
    with counting(args, pid, name) as profile:
        before, began = cpu_split(pid), time.monotonic()
        got = run_wrk(args.wrk, url, args.seconds, 16, 2, headers)
        profile.cpu, profile.wall = cpu_since(pid, before), time.monotonic() - began
    profile.unit, profile.units = "request", got.requests
    profile.notes.append(
        f"wrk -t2 -c16 -d{args.seconds}s: {got.requests_per_s:.0f} req/s, "
        f"p50 {got.p50_ms:.2f} ms, p99 {got.p99_ms:.2f} ms, {got.errors} errors"
    )
    time.sleep(1.0)
    with sampling(args, pid, name, profile):
        sampled = run_wrk(args.wrk, url, args.seconds, 16, 2, headers)
    profile.notes.append(
        f"the same under py-spy at {args.rate} Hz: {sampled.requests_per_s:.0f} req/s, "
        f"{sampled.errors} errors"
    )
    return profile


def profile_cold(
    args: argparse.Namespace, upstream: BenchRegistry, big: PushedImage, round_: int
) -> Profile:
    """A cold GET from a fresh mirror, counted; another from another fresh one, sampled."""
    digest = big.layer_digests[0]
    name = f"cold-{round_}"
    with fresh_mirror(args, upstream, f"{name}-counted") as mirror:
        time.sleep(1.0)  # its start-up work done
        pid = mirror.process.proc.pid
        url = f"{mirror.url}/v2/{big.name}/blobs/{digest}"
        with counting(args, pid, name) as profile:
            before = cpu_split(pid)
            got = get_blob(url, digest)
            upstream.quiesce(quiet=0.25)
            profile.cpu = cpu_since(pid, before)
    profile.name, profile.unit, profile.units = "cold", "MiB", got.size / MiB
    profile.wall = got.seconds
    profile.notes.append(
        f"cold GET of {got.size / MiB:.0f} MiB: {got.seconds:.3f} s, {got.mbps:.0f} MB/s, "
        f"first byte {got.first_byte:.4f} s, {sum(profile.cpu):.2f} CPU-s"
    )
    with fresh_mirror(args, upstream, f"{name}-sampled") as mirror:
        time.sleep(1.0)
        pid = mirror.process.proc.pid
        url = f"{mirror.url}/v2/{big.name}/blobs/{digest}"
        with sampling(args, pid, name, profile):
            sampled = get_blob(url, digest)
            upstream.quiesce(quiet=0.25)
    profile.notes.append(
        f"  and under py-spy at {args.rate} Hz (another fresh mirror): {sampled.seconds:.3f} s"
    )
    return profile


def profile_bare(
    args: argparse.Namespace, small: PushedImage, target: tuple[str, str, dict[str, str]]
) -> Profile:
    """The manifest load on bench_bare.py, serving the same bytes at the same path."""
    root = args.work / "bare-static"
    manifest = root / target[0].lstrip("/")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_bytes(small.manifest_bytes)
    bare = BareServer(args.work / "bare", root, manifest, small.media_type)
    bare.start()
    try:
        return profile_wrk(args, "bare", (bare.url, bare.pid), *target)
    finally:
        bare.stop()


@contextlib.contextmanager
def fresh_mirror(
    args: argparse.Namespace, upstream: BenchRegistry, name: str
) -> Iterator[MirrorServer]:
    workdir = args.work / f"mirror-{name}"
    shutil.rmtree(workdir, ignore_errors=True)
    mirror = MirrorServer(workdir, upstream.url, 1)
    try:
        yield mirror
    finally:
        mirror.stop()


# --------------------------------------------------------------------------- summaries


LINE_NUMBER = re.compile(r":\d+\)$")


IDLE = re.compile(r"PyThread_acquire_lock_timed|pthread_cond_(timed)?wait|sem_(timed)?wait")


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw format: `frame;frame;...;leaf COUNT`, root first; line numbers dropped."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = tuple(LINE_NUMBER.sub(")", f) for f in stack.split(";"))
            stacks[frames] += int(count)
    return stacks


def busy(stacks: Counter[tuple[str, ...]]) -> tuple[Counter[tuple[str, ...]], int]:
    """The samples of threads not blocked on a lock, and how many were left out."""
    kept: Counter[tuple[str, ...]] = Counter()
    idle = 0
    for frames, count in stacks.items():
        if any(IDLE.search(f) for f in frames):
            idle += count
        else:
            kept[frames] = count
    return kept, idle


def thread_of(frames: tuple[str, ...]) -> str:
    """`main`, or the function a `threading.Thread` runs."""
    for outer, inner in itertools.pairwise(frames):
        if outer.startswith("Thread.run "):
            return short(inner)
    return "main"


def short(frame: str) -> str:
    """`name (…/site-packages/aiohttp/web_protocol.py)` → `name (aiohttp/web_protocol.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


TRUNK = 0.95  # frames in this share of the samples or more are the trunk (main, the loop)


def top_frames(stacks: Counter[tuple[str, ...]]) -> tuple[Counter[str], Counter[str]]:
    """Samples by leaf frame (own) and by every frame on the stack (cumulative, the trunk
    left out)."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    for frames, count in stacks.items():
        if not frames:
            continue
        own[short(frames[-1])] += count
        for frame in {short(f) for f in frames}:
            cumulative[frame] += count
    total = sum(stacks.values())
    trunk = [f for f, c in cumulative.items() if c >= TRUNK * total or not PYTHON.search(f)]
    for frame in trunk:
        del cumulative[frame]
    return own, cumulative


PYTHON = re.compile(r"\.py\)$")


def parts(stacks: Counter[tuple[str, ...]]) -> dict[str, int]:
    found: dict[str, int] = {}
    for part, pattern in PARTS:
        regex = re.compile(pattern)
        found[part] = sum(c for frames, c in stacks.items() if any(regex.search(f) for f in frames))
    return found


def oncpu_table(profile: Profile, per_unit: float) -> Iterator[str]:
    """perf's on-CPU samples: by shared object, then the top symbols."""
    total = sum(profile.oncpu.values()) or 1
    by_dso: Counter[str] = Counter()
    for key, count in profile.oncpu.items():
        by_dso[key.split(": ", 1)[0]] += count
    shown = ", ".join(f"{d} {100 * c / total:.1f}%" for d, c in by_dso.most_common(8))
    yield f"On-CPU (perf record -e cpu-clock, {total} samples) by object: {shown}"
    yield ""
    yield f"| % | us | object: symbol (on-CPU, top {TOP}) |"
    yield "|---:|---:|---|"
    for key, count in Counter(profile.oncpu).most_common(TOP):
        share = count / total
        yield f"| {100 * share:.1f} | {share * per_unit:.1f} | `{key}` |"


def owner(frames: tuple[str, ...]) -> str:
    """The innermost owner of a sample; a system call leaf named with its caller's."""
    syscall = (
        next((n for n, p in SYSCALL_OWNERS if re.search(p, frames[-1])), None) if frames else None
    )
    for frame in reversed(frames[:-1] if syscall else frames):
        for name, pattern in OWNERS:
            if re.search(pattern, frame):
                return f"syscall {syscall} <- {name}" if syscall else name
    return f"syscall {syscall}" if syscall else "other (interpreter, C helpers)"


def owners(stacks: Counter[tuple[str, ...]]) -> Counter[str]:
    found: Counter[str] = Counter()
    for frames, count in stacks.items():
        found[owner(frames)] += count
    return found


def summary(profile: Profile) -> Iterator[str]:
    stacks, idle = busy(profile.stacks)
    total = sum(stacks.values()) or 1
    per_unit = profile.cpu_seconds * 1e6 / max(profile.units, 1e-9)
    user, system = profile.cpu
    yield f"## {profile.name}"
    yield ""
    for note in profile.notes:
        yield f"- {note}"
    yield (
        f"- CPU (counted pass): {user:.2f} s user + {system:.2f} s system over "
        f"{profile.units:.0f} "
        f"{profile.unit}s in {profile.wall:.1f} s: {per_unit:.0f} us per {profile.unit} "
        f"({user * 1e6 / max(profile.units, 1e-9):.0f} user)"
    )
    threads: Counter[str] = Counter()
    for frames, count in stacks.items():
        threads[thread_of(frames)] += count
    shown_threads = ", ".join(f"{t} {c}" for t, c in threads.most_common())
    polling = sum(c for frames, c in stacks.items() if "epoll_wait" in frames[-1])
    yield (
        f"- py-spy samples: {total} busy ({shown_threads}; {polling} of them in epoll_wait), "
        f"{idle} idle (blocked on a lock) left out"
    )
    yield (
        "- us columns: shares of the counted CPU per unit. py-spy samples running threads,"
        " waits in system calls (epoll_wait, fsync) included: where the process also waits"
        " (the cold GET) its shares overstate waits, and perf's on-CPU table is the CPU"
    )
    if profile.syscalls:
        per = {k: v / max(profile.units, 1e-9) for k, v in profile.syscalls.items() if v}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
        yield f"- system calls per {profile.unit} (perf stat; `all` = every call): {shown}"
    own, cumulative = top_frames(stacks)
    for title, counter in (("own", own), ("cumulative", cumulative)):
        yield ""
        trunk = f", Python frames in < {TRUNK:.0%} of them" if title != "own" else ""
        unit = profile.unit
        yield f"Top {TOP} frames by {title} samples (% of busy samples{trunk}; us per {unit}):"
        yield ""
        yield "| % | us | frame |"
        yield "|---:|---:|---|"
        for frame, count in counter.most_common(TOP):
            share = count / total
            yield f"| {100 * share:.1f} | {share * per_unit:.1f} | `{frame}` |"
    yield ""
    if profile.oncpu:
        yield from oncpu_table(profile, per_unit)
        yield ""
    yield f"Exclusive: each sample to its innermost owner (us per {profile.unit}):"
    yield ""
    yield "| % | us | owner |"
    yield "|---:|---:|---|"
    for part, count in owners(stacks).most_common():
        share = count / total
        yield f"| {100 * share:.1f} | {share * per_unit:.1f} | {part} |"
    yield ""
    yield f"Inclusive: a sample counts for each part it has a frame of (us per {profile.unit}):"
    yield ""
    yield "| % | us | part |"
    yield "|---:|---:|---|"
    for part, count in sorted(parts(stacks).items(), key=lambda kv: -kv[1]):
        share = count / total
        if count:
            yield f"| {100 * share:.1f} | {share * per_unit:.1f} | {part} |"
    yield ""


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/mirror-profiles"))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run (10)")
    parser.add_argument("--big-mib", type=int, default=256, help="the cold blob (256)")
    parser.add_argument("--cold-rounds", type=int, default=3, help="cold GETs (3)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--no-native", dest="native", action="store_false")
    parser.add_argument("--no-svg", dest="svg", action="store_false")
    parser.add_argument(
        "--summarize", action="store_true", help="only summarise what --out holds (no run)"
    )
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {', '.join(sorted(unknown))}")
    if args.seconds < 1 or args.seconds > 300:
        parser.error("--seconds: 1 to 300")
    if args.cold_rounds < 1 or args.cold_rounds > 20:
        parser.error("--cold-rounds: 1 to 20")
    return args


def flame_svg(raw: Path) -> None:
    """An SVG flame graph of `raw`'s stacks, when a collapsed-stack renderer is installed
    (inferno-flamegraph or flamegraph.pl); otherwise none."""
    for tool in ("inferno-flamegraph", "flamegraph.pl"):
        path = shutil.which(tool)
        if path:
            with raw.with_suffix(".svg").open("wb") as svg:
                subprocess.run([path, str(raw)], stdout=svg, check=False, timeout=120)
            return


def save(profile: Profile, out: Path) -> None:
    """`NAME.json` beside `NAME.txt`: what the summary needs besides the stacks."""
    meta = {k: v for k, v in asdict(profile).items() if k != "stacks"}
    (out / f"{profile.name}.json").write_text(json.dumps(meta, indent=1) + "\n")


def load(out: Path, name: str) -> Profile:
    meta = json.loads((out / f"{name}.json").read_text())
    meta["cpu"] = tuple(meta["cpu"])
    return Profile(**meta, stacks=read_stacks(out / f"{name}.txt"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        names = [s for s in SCENARIOS if s in args.scenarios.split(",")]
        kept = [load(args.out, n) for n in names if (args.out / f"{n}.json").exists()]
        print("\n".join(line for p in kept for line in summary(p)))
        return 0
    isolate_from_proxies()
    args.wrk = shutil.which("wrk")
    chosen = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    if shutil.which("py-spy") is None or (args.wrk is None and set(chosen) - {"cold"}):
        print("needs py-spy (pip install py-spy) and wrk (apt-get install -y wrk)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    profiles: list[Profile] = []
    with tempfile.TemporaryDirectory(prefix="mirror-profile-") as tmp:
        args.work = Path(tmp)
        with BenchRegistry(args.work / "upstream") as upstream:
            progress(f"seeding {upstream.url}")
            small = asyncio.run(
                push_image(upstream.url, "bench/small", "1", [MiB] * 5, tmp_dir=args.work)
            )
            big = None
            if "cold" in chosen:
                size = [args.big_mib * MiB]
                big = asyncio.run(
                    push_image(upstream.url, "bench/big", "1", size, tmp_dir=args.work)
                )
            wrk_scenarios = {
                "manifest": (
                    f"/v2/{small.name}/manifests/{small.manifest_digest}",
                    small.manifest_digest,
                    {"Accept": MANIFEST_ACCEPT},
                ),
                "blob": (
                    f"/v2/{small.name}/blobs/{small.layer_digests[0]}",
                    small.layer_digests[0],
                    {},
                ),
            }
            if set(chosen) & set(wrk_scenarios):
                with fresh_mirror(args, upstream, "warm") as mirror:
                    server = (mirror.url, mirror.process.proc.pid)
                    for name in (s for s in chosen if s in wrk_scenarios):
                        progress(f"profiling {name}")
                        profiles.append(profile_wrk(args, name, server, *wrk_scenarios[name]))
            if big is not None:
                cold: Profile | None = None
                for round_ in range(args.cold_rounds):
                    progress(f"profiling cold, round {round_ + 1}")
                    got = profile_cold(args, upstream, big, round_)
                    if cold is None:
                        cold = got
                    else:
                        cold.add(got)
                assert cold is not None
                merged = args.out / "cold.txt"  # the rounds' stacks, without line numbers
                merged.write_text("".join(f"{';'.join(f)} {c}\n" for f, c in cold.stacks.items()))
                profiles.append(cold)
            if "bare" in chosen:
                progress("profiling bare")
                profiles.append(profile_bare(args, small, wrk_scenarios["manifest"]))
    for profile in profiles:
        save(profile, args.out)
    text = "\n".join(line for p in profiles for line in summary(p))
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    if args.svg:
        for profile in profiles:
            flame_svg(args.out / f"{profile.name}.txt")
    print(f"\nstacks: {args.out}/{{{','.join(p.name for p in profiles)}}}.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
