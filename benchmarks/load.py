"""Bounded load: 500 concurrent clients against `mirror serve`, every answer checked.

A real docker-registry on loopback is seeded with 20 images (2-4 random layers of
64 KiB-2 MiB each); `mirror serve --config FILE` runs as a subprocess in front of it, and
half of the images are pulled through it first, so the load meets cached and uncached
content. Then each of `--clients` clients (its own aiohttp session, with one connection)
sends a random sequence of requests, at most `--requests` of them and none started after
`--duration` seconds: GET manifest by tag, GET manifest by digest, HEAD manifest, GET
blob, Range GET blob. Every answer is checked: the status, `Docker-Content-Digest`,
`Content-Length` of a HEAD, and the bytes (a body hashes to the digest asked for; a range
is exactly that slice of the blob).

Reported: requests, req/s, failures by kind, p50/p99 latency per kind of request, the
upstream's blob GETs per digest (from its access log), and the mirror's open file
descriptors and RSS at baseline (after warm-up), peak (sampled every 100 ms) and after
the load.

    python benchmarks/load.py [--clients 500] [--duration 60] [--requests 1000]
                              [--seed 1] [--json PATH]

Exits 1 when a request failed, a blob was fetched upstream more than once (or a blob
cached at the start at all), the mirror died, or its descriptors / RSS did not come back
to baseline within the tolerances printed with the results. The mirror's log is kept in
a temp file named in the output when a check fails. Only 127.0.0.1 is used; a default
run takes about 90 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import MirrorProcess
from upstream_registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryProcess,
    blob_repository,
    push_image,
)

IMAGES = 20
LAYERS_PER_IMAGE = (2, 4)
LAYER_SIZE = (64 * 1024, 2 * 1024 * 1024)
MAX_RANGE = 256 * 1024
KIND_WEIGHTS = {
    "manifest-tag": 15,
    "manifest-digest": 10,
    "manifest-head": 10,
    "blob": 45,
    "blob-range": 20,
}
ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST])
REQUEST_SECONDS = 30.0  # a request not answered in full by then counts as a timeout
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=REQUEST_SECONDS, sock_connect=10)
CHUNK = 256 * 1024

FD_TOLERANCE = 5
RSS_TOLERANCE = 30 * 1024 * 1024
SETTLE_BEFORE = 2.0  # seconds between warm-up and the baseline reading
SETTLE_AFTER = 10.0  # at most this long for fds and RSS to come back after the load
SAMPLE_EVERY = 0.1
MAX_EXAMPLES = 12
MiB = 1024 * 1024


# --------------------------------------------------------------------------- content


@dataclass(frozen=True)
class Image:
    name: str
    tag: str
    digest: str
    manifest: bytes
    blobs: tuple[str, ...]  # config and layers
    warm: bool  # pulled through the mirror before the load


@dataclass(frozen=True)
class Probe:
    """One request, and what its answer must be."""

    kind: str
    method: str
    path: str
    headers: Mapping[str, str]
    status: int
    digest: str  # Docker-Content-Digest, and the hash of a whole body
    length: int  # of the whole content (a HEAD's Content-Length)
    expected: bytes | None = None  # a range's exact bytes


async def seed(
    upstream: RegistryProcess, rng: random.Random, work: Path
) -> tuple[list[Image], dict[str, bytes]]:
    """Push IMAGES images, half to be warmed; read every blob back for range checks."""
    async with aiohttp.ClientSession() as session:
        pushed = await asyncio.gather(
            *(
                push_image(
                    upstream.url,
                    f"load/img{n:02d}",
                    "v1",
                    [rng.randint(*LAYER_SIZE) for _ in range(rng.randint(*LAYERS_PER_IMAGE))],
                    session=session,
                    tmp_dir=work,
                )
                for n in range(IMAGES)
            )
        )
        images = [
            Image(p.name, "v1", p.manifest_digest, p.manifest_bytes, blobs, n < IMAGES // 2)
            for n, p in enumerate(pushed)
            for blobs in [tuple(sorted(p.blob_digests()))]
        ]
        blobs = {
            digest: await _read_blob(session, f"{upstream.url}/v2/{image.name}/blobs/{digest}")
            for image in images
            for digest in image.blobs
        }
    return images, blobs


async def _read_blob(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        response.raise_for_status()
        data = await response.read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == url.rsplit("/", 1)[1], url
    return data


# --------------------------------------------------------------------------- requests


def pick(rng: random.Random, images: list[Image], blobs: Mapping[str, bytes]) -> Probe:
    image = rng.choice(images)
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    label = f"{kind} ({'cached' if image.warm else 'uncached'} at start)"
    base = f"/v2/{image.name}"
    accept = {"Accept": ACCEPT}
    size = len(image.manifest)
    if kind == "manifest-tag":
        return Probe(label, "GET", f"{base}/manifests/{image.tag}", accept, 200, image.digest, size)
    if kind == "manifest-digest":
        path = f"{base}/manifests/{image.digest}"
        return Probe(label, "GET", path, accept, 200, image.digest, size)
    if kind == "manifest-head":
        return Probe(
            label, "HEAD", f"{base}/manifests/{image.tag}", accept, 200, image.digest, size
        )
    digest = rng.choice(image.blobs)
    data = blobs[digest]
    if kind == "blob":
        return Probe(label, "GET", f"{base}/blobs/{digest}", {}, 200, digest, len(data))
    header, start, stop = byte_range(rng, len(data))
    path = f"{base}/blobs/{digest}"
    return Probe(label, "GET", path, {"Range": header}, 206, digest, len(data), data[start:stop])


def byte_range(rng: random.Random, size: int) -> tuple[str, int, int]:
    """A Range header of one of the three forms, and the slice [start, stop) it selects."""
    span = rng.randint(1, min(size, MAX_RANGE))
    form = rng.randrange(3)
    if form == 0:
        start = rng.randrange(size - span + 1)
        return f"bytes={start}-{start + span - 1}", start, start + span
    if form == 1:
        return f"bytes={size - span}-", size - span, size
    return f"bytes=-{span}", size - span, size


async def check(response: aiohttp.ClientResponse, probe: Probe) -> tuple[str | None, int]:
    """(what was wrong, or None; body bytes received)."""
    if response.status != probe.status:
        body = await response.content.read(300)
        return f"status {response.status}: {body.decode(errors='replace')}", len(body)
    if response.headers.get("Docker-Content-Digest") != probe.digest:
        return f"Docker-Content-Digest {response.headers.get('Docker-Content-Digest')}", 0
    if probe.method == "HEAD":
        wrong = response.content_length != probe.length
        return (f"HEAD Content-Length {response.content_length}" if wrong else None), 0
    if probe.expected is not None:
        return await _check_range(response, probe.expected)
    return await _check_whole(response, probe)


async def _check_range(response: aiohttp.ClientResponse, expected: bytes) -> tuple[str | None, int]:
    data = await response.read()
    if data != expected:
        return f"range bytes differ ({len(data)} bytes, expected {len(expected)})", len(data)
    return None, len(data)


async def _check_whole(response: aiohttp.ClientResponse, probe: Probe) -> tuple[str | None, int]:
    hasher, received = hashlib.sha256(), 0
    async for chunk in response.content.iter_chunked(CHUNK):
        hasher.update(chunk)
        received += len(chunk)
    if "sha256:" + hasher.hexdigest() != probe.digest:
        return f"body digest mismatch ({received} of {probe.length} bytes)", received
    return None, received


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    received: int = 0
    blobs_asked: set[str] = field(default_factory=set)

    def record(self, probe: Probe, seconds: float, failure: str | None, received: int) -> None:
        self.latencies[probe.kind].append(seconds)
        self.received += received
        if probe.path.split("/")[-2] == "blobs":
            self.blobs_asked.add(probe.digest)
        if failure is None:
            return
        self.failures[f"{probe.kind}: {_failure_kind(failure)}"] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{probe.method} {probe.path} {dict(probe.headers)}: {failure}")


def _failure_kind(failure: str) -> str:
    return failure.split(":", 1)[0] if failure.startswith("status") else failure.split(" (")[0]


async def send(session: aiohttp.ClientSession, probe: Probe, stats: Stats) -> None:
    began = time.perf_counter()
    received = 0
    try:
        async with session.request(probe.method, probe.path, headers=probe.headers) as response:
            failure, received = await check(response, probe)
    except TimeoutError:
        failure = "timeout"
    except aiohttp.ClientError as exc:
        failure = f"connection error ({type(exc).__name__}: {exc})"
    stats.record(probe, time.perf_counter() - began, failure, received)


async def client(
    url: str,
    rng: random.Random,
    content: tuple[list[Image], Mapping[str, bytes]],
    stop_at: float,
    max_requests: int,
    stats: Stats,
) -> None:
    """One client: its own session and connection, requests until the count or the time."""
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(url, connector=connector, timeout=REQUEST_TIMEOUT) as session:
        for _ in range(max_requests):
            if time.monotonic() >= stop_at:
                return
            await send(session, pick(rng, *content), stats)


async def load(
    url: str, args: argparse.Namespace, images: list[Image], blobs: Mapping[str, bytes]
) -> tuple[Stats, float]:
    """All clients at once; (stats, seconds from the first request to the last answer)."""
    stats = Stats()
    began = time.monotonic()
    stop_at = began + args.duration
    rngs = [random.Random(args.seed * 100_003 + n) for n in range(args.clients)]
    clients = [client(url, rng, (images, blobs), stop_at, args.requests, stats) for rng in rngs]
    # Requests start until the deadline; one started just before it may take its timeout.
    try:
        async with asyncio.timeout(args.duration + REQUEST_SECONDS + 10):
            await asyncio.gather(*clients)
    except TimeoutError:
        stats.failures["clients still busy at the hard deadline (cancelled)"] += 1
    return stats, time.monotonic() - began


async def warm_up(url: str, images: list[Image]) -> Stats:
    """Pull the warm images through the mirror: manifest by tag, then every blob."""
    stats = Stats()
    async with aiohttp.ClientSession(url, timeout=REQUEST_TIMEOUT) as session:
        for image in (i for i in images if i.warm):
            path = f"/v2/{image.name}/manifests/{image.tag}"
            size = len(image.manifest)
            probe = Probe("warm-up", "GET", path, {"Accept": ACCEPT}, 200, image.digest, size)
            await send(session, probe, stats)
            for digest in image.blobs:
                path = f"/v2/{image.name}/blobs/{digest}"
                await send(session, Probe("warm-up", "GET", path, {}, 200, digest, 0), stats)
    return stats


# --------------------------------------------------------------------------- the mirror process


def raise_fd_limit(wanted: int = 65536) -> None:
    """Soft RLIMIT_NOFILE up to `wanted` (the hard limit at most); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def start_mirror(work: Path, upstream: RegistryProcess) -> MirrorProcess:
    config = work / "mirror.yaml"
    config.write_text(
        f"storage: {{path: '{work / 'cache'}', max_size: 2GiB}}\n"
        "upstreams:\n"
        f"  - {{name: upstream, url: '{upstream.url}', tag_ttl: 5m}}\n"
        "log: {level: info}\n"
    )
    return MirrorProcess(["--config", str(config)], work / "mirror.log")


@dataclass(frozen=True)
class Usage:
    fds: int
    rss: int  # bytes


def usage(pid: int) -> Usage:
    """Open descriptors and resident memory; zeros once the process is gone."""
    try:
        return _read_usage(pid)
    except OSError:
        return Usage(0, 0)


def _read_usage(pid: int) -> Usage:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return Usage(fds, int(match[1]) * 1024 if match else 0)


def fd_kinds(pid: int, mirror_port: int, upstream_port: int) -> dict[str, int]:
    """The mirror's open descriptors by what they are: client or upstream connections
    (by port, from /proc/PID/net/tcp), cache files, SQLite, other."""
    ports = _socket_ports(pid)
    kinds: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                kinds[_fd_kind(target, ports, mirror_port, upstream_port)] += 1
    return dict(sorted(kinds.items()))


def _fd_kind(target: str, ports: Mapping[str, tuple[int, int, str]], mine: int, up: int) -> str:
    if target.startswith("socket:["):
        local, remote, state = ports.get(target[8:-1], (0, 0, "?"))
        if remote == up:
            return f"upstream socket {state}"
        if local == mine:
            return "listening socket" if remote == 0 else f"client socket {state}"
        return "other socket"
    if "index.db" in target:
        return "sqlite"
    if "/cache/" in target:
        return "cache file"
    return target.split(":")[0] if ":" in target else "other file"


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def _socket_ports(pid: int) -> dict[str, tuple[int, int, str]]:
    """socket inode -> (local port, remote port, state)."""
    found: dict[str, tuple[int, int, str]] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in cols[1:3])
                found[cols[9]] = (local, remote, _TCP_STATES.get(cols[3], cols[3]))
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu() -> dict[str, int]:
    """The machine's CPU time so far, in ticks, by kind (first line of /proc/stat)."""
    values = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return dict(zip(_CPU_FIELDS, map(int, values), strict=False))


def cpu_shares(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Percent of all CPUs' time spent in each kind between two `machine_cpu` readings."""
    spent = {kind: after[kind] - before[kind] for kind in _CPU_FIELDS}
    total = sum(spent.values()) or 1
    return {kind: round(100 * ticks / total, 1) for kind, ticks in spent.items() if ticks}


def busy_seconds(before: dict[str, int], after: dict[str, int]) -> float:
    """CPU seconds the whole machine spent not idle between two `machine_cpu` readings."""
    busy = (after[k] - before[k] for k in _CPU_FIELDS if k not in ("idle", "iowait"))
    return sum(busy) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """The peak of fds and RSS, read every SAMPLE_EVERY seconds until stopped (or 10 min),
    and what the descriptors were when there were most."""

    def __init__(self, pid: int, ports: tuple[int, int]) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.ports = ports
        self.peak = usage(pid)
        self.peak_kinds = fd_kinds(pid, *ports)
        self._stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop_event.wait(SAMPLE_EVERY) and time.monotonic() < deadline:
            now = usage(self.pid)
            if now.fds > self.peak.fds:
                self.peak_kinds = fd_kinds(self.pid, *self.ports)
            self.peak = Usage(max(self.peak.fds, now.fds), max(self.peak.rss, now.rss))

    def stop(self) -> Usage:
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak


async def settle_after(pid: int, baseline: Usage) -> tuple[Usage, float]:
    """Poll until fds and RSS are back within tolerance, SETTLE_AFTER seconds at most."""
    began = time.monotonic()
    now = usage(pid)
    while time.monotonic() - began < SETTLE_AFTER and not within(now, baseline):
        await asyncio.sleep(0.2)
        now = usage(pid)
    return now, time.monotonic() - began


def within(now: Usage, baseline: Usage) -> bool:
    return now.fds <= baseline.fds + FD_TOLERANCE and now.rss <= baseline.rss + RSS_TOLERANCE


# --------------------------------------------------------------------------- logs


def upstream_blob_gets(upstream: RegistryProcess) -> Counter[str]:
    """GETs of each blob digest the upstream logged since its counts were reset."""
    return Counter(
        r.path.rsplit("/", 1)[1]
        for r in upstream.requests()
        if r.method == "GET" and blob_repository(r.path) is not None
    )


def upstream_summary(upstream: RegistryProcess) -> dict[str, int]:
    """Requests by method, what was asked for and status."""
    return dict(Counter(f"{r.method} {_asked(r.path)} {r.status}" for r in upstream.requests()))


def manifest_repeats(upstream: RegistryProcess) -> dict[str, int]:
    """Manifest references the upstream was asked for (GET) more than once."""
    gets = Counter(
        r.path for r in upstream.requests() if r.method == "GET" and "/manifests/" in r.path
    )
    return {path: n for path, n in sorted(gets.items()) if n > 1}


def miss_lines(text: str, paths: Mapping[str, int]) -> list[str]:
    """The mirror's access lines answering `paths` from upstream (cache=miss)."""
    return [
        line[:300]
        for line in text.splitlines()
        if "mirror.access" in line and "cache=miss" in line and line.split()[5] in paths
    ]


def _asked(path: str) -> str:
    """`blobs`, `manifests by tag`, `manifests by digest`, or the second-last path segment."""
    *_, kind, reference = path.split("/")
    if kind != "manifests":
        return kind
    return f"manifests by {'digest' if reference.startswith('sha256:') else 'tag'}"


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) (?P<rest>.*)$")


def mirror_log_summary(text: str) -> dict[str, Any]:
    """Lines at WARNING and above, 5xx access lines, tracebacks."""
    levels: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    notable: list[str] = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        levels[match["level"]] += 1
        words = match["rest"].split()
        if words[0] == "mirror.access" and len(words) > 3:
            statuses[words[3]] += 1
        if match["level"] != "INFO" and len(notable) < MAX_EXAMPLES:
            notable.append(line[:400])
    return {
        "levels": dict(levels),
        "access_statuses": dict(statuses),
        "tracebacks": text.count("Traceback"),
        "notable": notable,
    }


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    clients: int
    duration: float
    images: int
    warm_images: int
    blobs: int
    content_mib: float
    seconds: float = 0.0
    requests: int = 0
    received_mib: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    failure_examples: list[str] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    warm_up_failures: int = 0
    upstream_warm_up_blob_gets: dict[str, int] = field(default_factory=dict)
    upstream_load_requests: dict[str, int] = field(default_factory=dict)
    upstream_blob_problems: list[str] = field(default_factory=list)
    upstream_manifest_repeats: dict[str, int] = field(default_factory=dict)
    uncached_blobs_asked: int = 0
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    fd_kinds: dict[str, dict[str, int]] = field(default_factory=dict)
    settle_seconds: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    machine_cpu_percent: dict[str, float] = field(default_factory=dict)
    mirror_alive: bool = True
    mirror_log: dict[str, Any] = field(default_factory=dict)
    mirror_log_path: str | None = None
    checks: dict[str, bool] = field(default_factory=dict)


def latency_table(stats: Stats) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for kind, values in sorted(stats.latencies.items()):
        ordered = sorted(values)
        table[kind] = {
            "count": len(ordered),
            "p50": 1000 * _percentile(ordered, 0.50),
            "p99": 1000 * _percentile(ordered, 0.99),
            "max": 1000 * ordered[-1],
        }
    return table


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest rank."""
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def blob_problems(gets: Counter[str], images: list[Image], asked: set[str]) -> list[str]:
    """Against the expectation: 0 GETs of a blob cached at the start, exactly 1 of an
    uncached blob that clients asked for (0 of one nobody asked for)."""
    problems = []
    for image in images:
        for digest in image.blobs:
            expected = 0 if image.warm or digest not in asked else 1
            if gets[digest] != expected:
                state = "cached" if image.warm else "uncached"
                problems.append(f"{digest} ({state} at start): {gets[digest]} upstream GETs")
    return problems


async def measure(
    args: argparse.Namespace,
    upstream: RegistryProcess,
    mirror: MirrorProcess,
    content: tuple[list[Image], dict[str, bytes]],
    report: Report,
) -> None:
    images, blobs = content
    pid = mirror.proc.pid
    warm = await warm_up(mirror.url, images)
    report.warm_up_failures = sum(warm.failures.values())
    report.failure_examples += warm.examples
    await upstream.settle()
    per_blob = Counter(upstream_blob_gets(upstream).values())
    report.upstream_warm_up_blob_gets = {str(gets): n for gets, n in sorted(per_blob.items())}
    upstream.reset_counts()
    await asyncio.sleep(SETTLE_BEFORE)
    baseline = usage(pid)
    ports = (mirror.port, upstream.port)
    report.fd_kinds["baseline"] = fd_kinds(pid, *ports)
    sampler = Sampler(pid, ports)
    sampler.start()
    cpu_before = (cpu_seconds(pid), time.process_time())
    machine_before = machine_cpu()
    try:
        stats, report.seconds = await load(mirror.url, args, images, blobs)
        cpu_after = (cpu_seconds(pid), time.process_time())
        machine_after = machine_cpu()
        after, report.settle_seconds = await settle_after(pid, baseline)
        report.fd_kinds["after"] = fd_kinds(pid, *ports)
    finally:
        peak = sampler.stop()
        report.fd_kinds["peak"] = sampler.peak_kinds
    report.cpu_seconds = {"mirror": cpu_after[0] - cpu_before[0]}
    report.cpu_seconds["load client"] = cpu_after[1] - cpu_before[1]
    others = busy_seconds(machine_before, machine_after) - sum(report.cpu_seconds.values())
    report.cpu_seconds["everything else (registry, other processes)"] = others
    report.machine_cpu_percent = cpu_shares(machine_before, machine_after)
    report.usage = {"baseline": asdict(baseline), "peak": asdict(peak), "after": asdict(after)}
    await upstream.settle()
    record_load(report, stats, images, upstream)


def record_load(
    report: Report, stats: Stats, images: list[Image], upstream: RegistryProcess
) -> None:
    report.requests = sum(len(v) for v in stats.latencies.values())
    report.received_mib = stats.received / MiB
    report.failures = dict(stats.failures.most_common())
    report.failure_examples += stats.examples
    report.latency_ms = latency_table(stats)
    report.upstream_load_requests = upstream_summary(upstream)
    report.upstream_manifest_repeats = manifest_repeats(upstream)
    gets = upstream_blob_gets(upstream)
    report.upstream_blob_problems = blob_problems(gets, images, stats.blobs_asked)
    cold = {d for i in images if not i.warm for d in i.blobs}
    report.uncached_blobs_asked = len(cold & stats.blobs_asked)


def judge(report: Report) -> None:
    base, after = report.usage["baseline"], report.usage["after"]
    report.checks = {
        "warm-up answered correctly": report.warm_up_failures == 0,
        "no failed request under load": not report.failures,
        "each blob fetched upstream at most once (0 if cached at start)": (
            not report.upstream_blob_problems
        ),
        "mirror still running": report.mirror_alive,
        f"fds back to <= baseline + {FD_TOLERANCE}": after["fds"] <= base["fds"] + FD_TOLERANCE,
        f"RSS back to <= baseline + {RSS_TOLERANCE // MiB} MiB": (
            after["rss"] <= base["rss"] + RSS_TOLERANCE
        ),
    }


async def run(args: argparse.Namespace) -> Report:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        work = Path(tmp)
        with RegistryProcess(work / "upstream") as upstream:
            images, blobs = await seed(upstream, rng, work)
            await upstream.settle()
            upstream.reset_counts()
            report = Report(
                args.clients,
                args.duration,
                len(images),
                sum(i.warm for i in images),
                len(blobs),
                sum(map(len, blobs.values())) / MiB,
            )
            mirror = await asyncio.to_thread(start_mirror, work, upstream)
            try:
                await measure(args, upstream, mirror, (images, blobs), report)
            finally:
                report.mirror_alive = mirror.proc.poll() is None
                mirror.stop()
                text = mirror.log()
                report.mirror_log = mirror_log_summary(text)
                report.mirror_log["misses of repeated manifests"] = miss_lines(
                    text, report.upstream_manifest_repeats
                )
            judge(report)
            if not all(report.checks.values()):
                report.mirror_log_path = save_log(mirror.log_path)
    return report


def save_log(path: Path) -> str | None:
    """A copy of the mirror's log outside the work directory (which is removed)."""
    with contextlib.suppress(OSError):
        fd, name = tempfile.mkstemp(prefix="load-mirror-", suffix=".log")
        os.close(fd)
        shutil.copyfile(path, name)
        return name
    return None


# --------------------------------------------------------------------------- output


def markdown(report: Report) -> Iterator[str]:
    rate = report.requests / report.seconds if report.seconds else 0.0
    yield f"## mirror under load: {report.clients} clients, {report.duration:g} s"
    yield ""
    yield (
        f"{report.images} images ({report.warm_images} warmed through the mirror first), "
        f"{report.blobs} blobs, {report.content_mib:.1f} MiB; each client has its own "
        "session and connection; every answer checked (status, digest header, bytes)."
    )
    yield ""
    yield "| figure | value |"
    yield "|---|---|"
    yield f"| requests | {report.requests} in {report.seconds:.1f} s |"
    yield f"| requests/s | {rate:.0f} |"
    mib_rate = report.received_mib / report.seconds if report.seconds else 0.0
    yield f"| received | {report.received_mib:.0f} MiB ({mib_rate:.0f} MiB/s) |"
    yield f"| failed requests | {sum(report.failures.values())} |"
    cpu = ", ".join(f"{k} {v:.1f} s" for k, v in report.cpu_seconds.items())
    yield f"| CPU during the load | {cpu} (of {os.cpu_count()} CPUs) |"
    shares = ", ".join(f"{k} {v:g}%" for k, v in report.machine_cpu_percent.items())
    yield f"| machine CPU during the load | {shares} |"
    yield f"| uncached blobs asked for | {report.uncached_blobs_asked} |"
    yield from _latencies(report)
    yield from _upstream(report)
    yield from _usage(report)
    yield from _failures(report)
    yield from _log(report)
    yield ""
    yield "### checks"
    yield ""
    for name, ok in report.checks.items():
        yield f"- [{'x' if ok else ' '}] {name}"
    if report.mirror_log_path:
        yield f"\nmirror log kept in {report.mirror_log_path}"


def _latencies(report: Report) -> Iterator[str]:
    yield ""
    yield "| request | count | failed | p50 ms | p99 ms | max ms |"
    yield "|---|---|---|---|---|---|"
    for kind, row in report.latency_ms.items():
        failed = sum(n for k, n in report.failures.items() if k.startswith(kind + ":"))
        yield (
            f"| {kind} | {row['count']:.0f} | {failed} | {row['p50']:.1f} | {row['p99']:.1f}"
            f" | {row['max']:.1f} |"
        )


def _upstream(report: Report) -> Iterator[str]:
    yield ""
    warm = ", ".join(
        f"{n} blobs x {gets} GET" for gets, n in report.upstream_warm_up_blob_gets.items()
    )
    yield f"Upstream during warm-up: {warm or 'no blob GETs'}."
    load = ", ".join(f"{k}: {v}" for k, v in sorted(report.upstream_load_requests.items()))
    yield f"Upstream during the load (method, kind, status: count): {load or 'none'}."
    if report.upstream_manifest_repeats:
        yield "Manifests fetched upstream more than once (reported, not a failed check):"
        yield from (f"- {path}: {n} GETs" for path, n in report.upstream_manifest_repeats.items())
        yield "  the mirror's access lines that answered them from upstream (cache=miss):"
        yield from (f"      {line}" for line in report.mirror_log["misses of repeated manifests"])
    if report.upstream_blob_problems:
        yield "Blobs whose upstream GETs differ from the expected 0 (cached) / 1 (uncached):"
        yield from (f"- {p}" for p in report.upstream_blob_problems)


def _usage(report: Report) -> Iterator[str]:
    yield ""
    yield "| mirror process | baseline | peak | after |"
    yield "|---|---|---|---|"
    u = report.usage
    yield f"| open fds | {u['baseline']['fds']} | {u['peak']['fds']} | {u['after']['fds']} |"
    rss = [f"{u[w]['rss'] / MiB:.1f}" for w in ("baseline", "peak", "after")]
    yield f"| RSS MiB | {' | '.join(rss)} |"
    when = ("baseline", "peak", "after")
    kinds = sorted({k for w in when for k in report.fd_kinds.get(w, {})})
    for kind in kinds:
        counts = [str(report.fd_kinds.get(w, {}).get(kind, 0)) for w in when]
        yield f"| - fds: {kind} | {' | '.join(counts)} |"
    yield ""
    yield (
        f"After: read {report.settle_seconds:.1f} s after the load (polled up to "
        f"{SETTLE_AFTER:g} s). Tolerances: fds <= baseline + {FD_TOLERANCE}, "
        f"RSS <= baseline + {RSS_TOLERANCE // MiB} MiB; peak sampled every "
        f"{SAMPLE_EVERY * 1000:.0f} ms."
    )


def _failures(report: Report) -> Iterator[str]:
    if not report.failures and not report.failure_examples:
        return
    yield ""
    yield "### failures"
    yield ""
    yield from (f"- {n} x {kind}" for kind, n in report.failures.items())
    yield "\nexamples:"
    yield from (f"- {e}" for e in report.failure_examples)


def _log(report: Report) -> Iterator[str]:
    log = report.mirror_log
    yield ""
    yield (
        f"Mirror log: lines by level {log.get('levels')}, access lines by status "
        f"{log.get('access_statuses')}, tracebacks {log.get('tracebacks')}."
    )
    yield from (f"    {line}" for line in log.get("notable", []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--requests", type=int, default=1000, help="at most, per client")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    raise_fd_limit()
    report = asyncio.run(run(args))
    print("\n".join(markdown(report)))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if all(report.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
