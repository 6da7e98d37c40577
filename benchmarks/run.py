"""The mirror against its alternatives, in one run: a markdown table of ratios and a JSON file.

A real docker-registry on loopback (the upstream) is seeded with four generated images:
one big single-layer image (512 MiB; 128 MiB with --quick), 5 x 1 MiB, 50 x 100 KiB and
a two-platform index. Each figure is measured for each contender (see bench_servers.py):
the upstream directly, `mirror serve`, docker-registry in proxy mode, nginx serving the
files with sendfile, an nginx caching proxy, and (in the wrk manifest figure only) a bare
aiohttp handler answering the manifest from memory. Every cold figure starts a fresh
process with an empty cache; upstream requests are counted in the upstream's access log.

Phases (--phases): `skopeo` (cold and warm `skopeo copy` of each image by tag, and the
upstream requests of each copy), `get` (one GET of the big blob, cold then warm: time to
the first body byte, total, MB/s; every byte hashed and checked), `crowd` (8 clients GET
the cold big blob at once: wall time, upstream GETs, each client's first byte), `wrk`
(cache hits under `wrk`, 16 connections: the 1 MiB blob and the manifest by digest). The
peak RSS and the user+system CPU seconds of each contender are read during each step; the
CPU of a big-blob GET is set against what SHA-256 (hashlib, one core) spends on the same
bytes, measured in the same round.

    python benchmarks/run.py                 # full run, several minutes
    python benchmarks/run.py --quick         # under 2 minutes: 128 MiB, 1 round, short wrk
    python benchmarks/run.py --only mirror,direct --phases get,crowd
    python benchmarks/run.py --install       # apt-get install nginx and wrk first

Needs docker-registry and skopeo (`apt-get install -y docker-registry skopeo`) and the
project with its test extras (`pip install '.[test]'`); nginx and wrk are optional
(`apt-get install -y nginx wrk`): without them their columns or figures are skipped.
Only 127.0.0.1 is used. Exit status: 0, or 1 when a measurement failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_clients import (
    PeakRss,
    cpu_seconds,
    get_blob,
    get_concurrently,
    hash_cpu_seconds,
    run_wrk,
)
from bench_report import SHA256, Results, markdown, write_json
from bench_servers import (
    BARE,
    DIRECT,
    KINDS,
    MIRROR,
    NGINX,
    NGINX_CACHE,
    REGISTRY_PROXY,
    BenchRegistry,
    Contender,
    Lab,
)
from upstream_registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    LoggedRequest,
    PushedImage,
    dir_digests,
    push_image,
    push_index,
    skopeo_copy,
)

MiB = 1 << 20
PHASES = ("skopeo", "get", "crowd", "wrk")
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST])
INSTALL_REQUIRED = "apt-get install -y docker-registry skopeo"
SETTLE = 1.0  # seconds between filling a cache and reading from it


@dataclass(frozen=True)
class Settings:
    big_mib: int
    rounds: int  # cold/warm GET and crowd rounds; skopeo rounds of the big image
    skopeo_rounds: int  # skopeo rounds of the three small images
    wrk_seconds: int
    clients: int = 8
    connections: int = 16
    wrk_threads: int = 2
    warm_gets: int = 2  # warm GETs after each cold one
    nginx_workers: str = "1"
    mirror_workers: int = 1


QUICK = Settings(big_mib=128, rounds=1, skopeo_rounds=1, wrk_seconds=2)
FULL = Settings(big_mib=512, rounds=3, skopeo_rounds=3, wrk_seconds=5, warm_gets=3)


@dataclass(frozen=True)
class Image:
    key: str
    title: str
    pushed: PushedImage
    all_images: bool = False  # skopeo copy --all (the index)


@dataclass
class Run:
    lab: Lab
    settings: Settings
    images: dict[str, Image]
    results: Results
    contenders: list[str]
    wrk: str | None
    _serial: Iterator[int] = field(default_factory=itertools.count)

    @property
    def upstream(self) -> BenchRegistry:
        return self.lab.upstream

    def kinds(self, allowed: tuple[str, ...]) -> list[str]:
        return [k for k in allowed if k in self.contenders]

    def scratch(self, name: str) -> Path:
        return self.lab.work / f"{name}-{next(self._serial)}"

    def attempt(self, keys: list[str], kind: str, measure: Callable[[], None]) -> None:
        """Run one measurement; a failure marks its figures for `kind` and the run goes on."""
        try:
            measure()
        except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            self.results.fail(keys, kind, f"{keys[0]}: {message}")
            progress(f"  {kind}: FAILED {message}")


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- observing


@dataclass
class Seen:
    """What the upstream was asked, and the contender's peak RSS and CPU time, during one
    step (the CPU until the upstream was idle again, so a download the contender finished
    after its client counts)."""

    requests: list[LoggedRequest] = field(default_factory=list)
    peak_rss: float = 0.0  # MiB
    cpu_seconds: float = 0.0  # user + system, summed over the contender's processes

    def blob_gets(self, digest: str) -> int:
        return sum(1 for r in self.requests if r.method == "GET" and r.path.endswith(digest))

    def summary(self) -> list[str]:
        return [f"{r.method} {r.path.split('/')[-2]} {r.status}" for r in self.requests]


@contextlib.contextmanager
def observe(run: Run, server: Contender) -> Iterator[Seen]:
    run.upstream.quiesce(quiet=0.1)
    run.upstream.reset_counts()
    seen = Seen()
    pids = server.pids()
    cpu_before = cpu_seconds(pids)
    with PeakRss(pids) as rss:
        yield seen
    run.upstream.quiesce(quiet=0.25)
    seen.cpu_seconds = cpu_seconds(pids) - cpu_before
    seen.requests = run.upstream.requests()
    seen.peak_rss = rss.peak / MiB


# --------------------------------------------------------------------------- seeding


async def seed(url: str, big_mib: int, work: Path) -> dict[str, Image]:
    big = await push_image(url, "bench/big", "1", [big_mib * MiB], tmp_dir=work)
    small = await push_image(url, "bench/small", "1", [MiB] * 5, tmp_dir=work)
    many = await push_image(url, "bench/many", "1", [100 * 1024] * 50, tmp_dir=work)
    multi = await push_index(url, "bench/multi", "1", layer_size=MiB, tmp_dir=work)
    return {
        "big": Image("big", f"{big_mib} MiB x 1", big),
        "small": Image("small", "1 MiB x 5", small),
        "many": Image("many", "100 KiB x 50", many),
        "multi": Image("multi", "index, 2 x (1 MiB x 1), --all", multi, all_images=True),
    }


def record_hash_cpu(run: Run, keys: list[str]) -> None:
    """The `sha256` reference of CPU figures `keys`: what hashing the big blob's bytes
    costs one core now (the bench process is otherwise idle meanwhile)."""
    digest = run.images["big"].pushed.layer_digests[0]
    seconds = hash_cpu_seconds(run.lab.upstream_blob(digest), digest)
    for key in keys:
        run.results.add(key, SHA256, seconds)
    progress(f"sha256 of the big blob: {seconds:.3f} CPU-s")


def publish_static(lab: Lab, images: dict[str, Image]) -> None:
    """What the plain nginx serves: the big blob, the 1 MiB blob, the small manifest."""
    big, small = images["big"].pushed, images["small"].pushed
    lab.publish_static(big.name, big.layer_digests[0])
    lab.publish_static(small.name, small.layer_digests[0])
    lab.publish_static(small.name, small.manifest_digest, small.manifest_bytes)


# --------------------------------------------------------------------------- skopeo

SKOPEO_KINDS = (DIRECT, MIRROR, REGISTRY_PROXY, NGINX_CACHE)


def phase_skopeo(run: Run) -> None:
    for image in run.images.values():
        keys = define_skopeo(run.results, image)
        rounds = run.settings.rounds if image.key == "big" else run.settings.skopeo_rounds
        for _ in range(rounds):
            for kind in run.kinds(SKOPEO_KINDS):
                run.attempt(keys, kind, functools.partial(skopeo_round, run, kind, image))


def define_skopeo(results: Results, image: Image) -> list[str]:
    k, title = image.key, image.title
    results.define(f"skopeo.cold.{k}", f"skopeo copy {title}, cold", "s", DIRECT)
    results.define(f"skopeo.warm.{k}", f"skopeo copy {title}, warm", "s", DIRECT)
    results.define(
        f"skopeo.cold_upstream.{k}", f"skopeo copy {title}, cold: upstream", "requests", None, 0
    )
    results.define(
        f"skopeo.warm_upstream.{k}",
        f"skopeo copy {title}, warm by tag inside tag_ttl: upstream",
        "requests",
        None,
        0,
    )
    results.define(f"rss.skopeo.{k}", f"skopeo copy {title}: peak RSS", "MiB", None, 1)
    for step in ("cold", "warm"):
        label = f"skopeo copy {title}, {step}: CPU (user+system)"
        results.define(f"cpu.skopeo.{step}.{k}", label, "CPU-s", DIRECT)
    return [f"skopeo.{p}.{k}" for p in ("cold", "warm", "cold_upstream", "warm_upstream")]


def skopeo_round(run: Run, kind: str, image: Image) -> None:
    with run.lab.running(kind) as server:
        host = server.url.removeprefix("http://")
        peak = 0.0
        for step in ("cold", "warm"):
            with observe(run, server) as seen:
                seconds = timed_copy(run, f"{host}/{image.pushed.reference}", image)
            run.results.add(f"skopeo.{step}.{image.key}", kind, seconds)
            run.results.add(f"skopeo.{step}_upstream.{image.key}", kind, len(seen.requests))
            run.results.detail(f"skopeo.{step}_upstream.{image.key}", [kind, seen.summary()])
            run.results.add(f"cpu.skopeo.{step}.{image.key}", kind, seen.cpu_seconds)
            peak = max(peak, seen.peak_rss)
            progress(
                f"skopeo {image.key} {kind} {step}: {seconds:.3f} s, "
                f"{len(seen.requests)} upstream requests"
            )
        run.results.add(f"rss.skopeo.{image.key}", kind, peak)


def timed_copy(run: Run, source: str, image: Image) -> float:
    """Seconds of one `skopeo copy` to a fresh dir:, whose blobs are then checked."""
    dest = run.scratch("skopeo")
    try:
        began = time.perf_counter()
        skopeo_copy(source, dest, all_images=image.all_images, timeout=600)
        seconds = time.perf_counter() - began
        missing = image.pushed.blob_digests() - dir_digests(dest)
        if missing:
            raise AssertionError(f"skopeo copy of {source} lacks {sorted(missing)}")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return seconds


# --------------------------------------------------------------------------- one GET

GET_KINDS = (DIRECT, MIRROR, REGISTRY_PROXY, NGINX_CACHE, NGINX)


def phase_get(run: Run) -> None:
    keys = define_get(run.results, run.settings.big_mib)
    for _ in range(run.settings.rounds):
        record_hash_cpu(run, ["cpu.get.cold", "cpu.get.warm"])
        for kind in run.kinds(GET_KINDS):
            run.attempt(keys, kind, functools.partial(get_round, run, kind))


def define_get(results: Results, mib: int) -> list[str]:
    keys = []
    for step, ref in (("cold", DIRECT), ("warm", NGINX)):
        title = f"{step} GET {mib} MiB blob"
        results.define(f"get.{step}.seconds", f"{title}: total", "s", ref)
        results.define(f"get.{step}.first_byte", f"{title}: first body byte", "s", ref, 4)
        results.define(f"get.{step}.mbps", f"{title}: throughput", "MB/s", ref, 0)
        results.define(f"get.{step}.upstream_gets", f"{title}: upstream GETs", "requests", None, 0)
        results.define(f"rss.get.{step}", f"{title}: peak RSS", "MiB", None, 1)
        results.define(f"cpu.get.{step}", f"{title}: CPU (user+system)", "CPU-s", SHA256)
        keys += [f"get.{step}.{k}" for k in ("seconds", "first_byte", "mbps", "upstream_gets")]
    return keys


def get_round(run: Run, kind: str) -> None:
    big = run.images["big"].pushed
    digest = big.layer_digests[0]
    with run.lab.running(kind) as server:
        url = f"{server.url}/v2/{big.name}/blobs/{digest}"
        warm = ["warm"] * run.settings.warm_gets
        steps = warm if kind == NGINX else ["cold", *warm]
        for step in steps:
            with observe(run, server) as seen:
                got = get_blob(url, digest)
            record_get(run, kind, step, got.seconds, got.first_byte, got.mbps)
            run.results.add(f"get.{step}.upstream_gets", kind, seen.blob_gets(digest))
            run.results.add(f"rss.get.{step}", kind, seen.peak_rss)
            run.results.add(f"cpu.get.{step}", kind, seen.cpu_seconds)
            progress(
                f"get {kind} {step}: {got.seconds:.3f} s, first byte {got.first_byte:.4f} s, "
                f"{got.mbps:.0f} MB/s, {seen.blob_gets(digest)} upstream GETs, "
                f"{seen.cpu_seconds:.2f} CPU-s"
            )
            if step == "cold":
                time.sleep(SETTLE)


def record_get(run: Run, kind: str, step: str, seconds: float, first: float, mbps: float) -> None:
    run.results.add(f"get.{step}.seconds", kind, seconds)
    run.results.add(f"get.{step}.first_byte", kind, first)
    run.results.add(f"get.{step}.mbps", kind, mbps)


# --------------------------------------------------------------------------- crowd

CROWD_KINDS = (DIRECT, MIRROR, REGISTRY_PROXY, NGINX_CACHE)


def phase_crowd(run: Run) -> None:
    keys = define_crowd(run.results, run.settings)
    for _ in range(run.settings.rounds):
        record_hash_cpu(run, ["cpu.crowd"])
        for kind in run.kinds(CROWD_KINDS):
            run.attempt(keys, kind, functools.partial(crowd_round, run, kind))


def define_crowd(results: Results, settings: Settings) -> list[str]:
    title = f"{settings.clients} clients GET one cold {settings.big_mib} MiB blob"
    results.define("crowd.wall", f"{title}: wall", "s", DIRECT)
    results.define("crowd.upstream_gets", f"{title}: upstream GETs", "requests", None, 0)
    results.define("crowd.first_byte_max", f"{title}: slowest first body byte", "s", None, 4)
    results.define("crowd.first_byte_median", f"{title}: median first body byte", "s", None, 4)
    results.define("rss.crowd", f"{title}: peak RSS", "MiB", None, 1)
    results.define("cpu.crowd", f"{title}: CPU (user+system)", "CPU-s", SHA256)
    return ["crowd.wall", "crowd.upstream_gets", "crowd.first_byte_max", "crowd.first_byte_median"]


def crowd_round(run: Run, kind: str) -> None:
    big = run.images["big"].pushed
    digest = big.layer_digests[0]
    with run.lab.running(kind) as server:
        url = f"{server.url}/v2/{big.name}/blobs/{digest}"
        with observe(run, server) as seen:
            crowd = get_concurrently(url, digest, run.settings.clients)
    firsts = [g.first_byte for g in crowd.gets]
    run.results.add("crowd.wall", kind, crowd.wall)
    run.results.add("crowd.upstream_gets", kind, seen.blob_gets(digest))
    run.results.add("crowd.first_byte_max", kind, max(firsts))
    run.results.add("crowd.first_byte_median", kind, statistics.median(firsts))
    run.results.add("rss.crowd", kind, seen.peak_rss)
    run.results.add("cpu.crowd", kind, seen.cpu_seconds)
    clients = [{"first_byte": g.first_byte, "seconds": g.seconds} for g in crowd.gets]
    run.results.detail("crowd.clients", [kind, clients])
    progress(
        f"crowd {kind}: wall {crowd.wall:.3f} s, {seen.blob_gets(digest)} upstream GETs, "
        f"first bytes {min(firsts):.4f}..{max(firsts):.4f} s, {seen.cpu_seconds:.2f} CPU-s"
    )


# --------------------------------------------------------------------------- wrk

WRK_KINDS = (DIRECT, MIRROR, BARE, REGISTRY_PROXY, NGINX_CACHE, NGINX)
WRK_REFERENCES = {"blob": NGINX, "manifest": BARE}


def phase_wrk(run: Run) -> None:
    keys = define_wrk(run.results, run.settings)
    for _ in range(run.settings.rounds):
        for kind in run.kinds(WRK_KINDS):
            run.attempt(keys, kind, functools.partial(wrk_round, run, kind))


def define_wrk(results: Results, settings: Settings) -> list[str]:
    keys = []
    for what, title in (("blob", "1 MiB blob"), ("manifest", "manifest by digest")):
        title = f"wrk -c{settings.connections} {settings.wrk_seconds}s, cached {title}"
        ref = WRK_REFERENCES[what]
        results.define(f"wrk.{what}.rps", f"{title}: requests", "req/s", ref, 0)
        results.define(f"wrk.{what}.p50", f"{title}: p50 latency", "ms", ref, 2)
        results.define(f"wrk.{what}.p99", f"{title}: p99 latency", "ms", ref, 2)
        results.define(f"wrk.{what}.cpu_us", f"{title}: CPU per request", "us", ref, 1)
        results.define(f"wrk.{what}.upstream", f"{title}: upstream", "requests", None, 0)
        results.define(f"rss.wrk.{what}", f"{title}: peak RSS", "MiB", None, 1)
        keys += [f"wrk.{what}.{k}" for k in ("rps", "p50", "p99", "cpu_us", "upstream")]
    return keys


def wrk_round(run: Run, kind: str) -> None:
    """Each wrk target `kind` serves (bare-aiohttp: the manifest only), on one fresh
    `kind`, each filled by a GET and left to settle first."""
    assert run.wrk is not None
    small = run.images["small"].pushed
    targets = {
        "blob": (f"/v2/{small.name}/blobs/{small.layer_digests[0]}", small.layer_digests[0], {}),
        "manifest": (
            f"/v2/{small.name}/manifests/{small.manifest_digest}",
            small.manifest_digest,
            {"Accept": MANIFEST_ACCEPT},
        ),
    }
    if kind == BARE:
        del targets["blob"]
    with run.lab.running(kind) as server:
        for what, (path, digest, headers) in targets.items():
            get_blob(server.url + path, digest, headers or None)  # fills the cache; checks bytes
            time.sleep(SETTLE)
            with observe(run, server) as seen:
                s = run.settings
                got = run_wrk(
                    run.wrk, server.url + path, s.wrk_seconds, s.connections, s.wrk_threads, headers
                )
            if got.errors:
                run.results.failures.append(f"{kind}: wrk {what}: {got.errors} errors")
            for key, value in (
                ("rps", got.requests_per_s),
                ("p50", got.p50_ms),
                ("p99", got.p99_ms),
                ("cpu_us", seen.cpu_seconds / max(got.requests, 1) * 1e6),
                ("upstream", len(seen.requests)),
            ):
                run.results.add(f"wrk.{what}.{key}", kind, value)
            run.results.add(f"rss.wrk.{what}", kind, seen.peak_rss)
            run.results.detail(f"wrk.{what}", [kind, asdict(got)])
            progress(
                f"wrk {what} {kind}: {got.requests_per_s:.0f} req/s, p50 {got.p50_ms:.2f} ms, "
                f"p99 {got.p99_ms:.2f} ms, {got.errors} errors, {seen.cpu_seconds:.2f} CPU-s"
            )


PHASE_RUNNERS: dict[str, Callable[[Run], None]] = {
    "skopeo": phase_skopeo,
    "get": phase_get,
    "crowd": phase_crowd,
    "wrk": phase_wrk,
}


# --------------------------------------------------------------------------- tools


def install_tools() -> None:
    """`apt-get update`, then install nginx and wrk (and docker-registry, skopeo if missing)."""
    packages = ["nginx", "wrk"]
    packages += [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", *packages], check=True, env=env, timeout=1200)


def find_tools() -> dict[str, str | None]:
    return {t: shutil.which(t) for t in ("docker-registry", "skopeo", "nginx", "wrk")}


def missing_required(tools: dict[str, str | None]) -> list[str]:
    problems = [
        f"{t} not found: {INSTALL_REQUIRED}" for t in ("docker-registry", "skopeo") if not tools[t]
    ]
    if not (Path(sys.executable).parent / "mirror").exists():
        problems.append("the `mirror` console script is missing: pip install '.[test]'")
    return problems


def tool_versions(tools: dict[str, str | None]) -> dict[str, str]:
    flags = {"docker-registry": "--version", "skopeo": "--version", "nginx": "-v", "wrk": "-v"}
    versions = {}
    for name, path in tools.items():
        if path:
            done = subprocess.run([path, flags[name]], capture_output=True, text=True, timeout=10)
            versions[name] = (done.stdout + done.stderr).strip().splitlines()[0]
    return versions


def isolate_from_proxies() -> None:
    """Loopback only: no HTTP proxy from the environment may carry a request anywhere."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        os.environ.pop(name, None)
    os.environ.pop("ALL_PROXY", None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, 1 round, 2 s wrk runs")
    parser.add_argument("--only", default=",".join(KINDS), help="contenders, comma-separated")
    parser.add_argument("--phases", default=",".join(PHASES), help="phases, comma-separated")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results.json")
    parser.add_argument("--install", action="store_true", help="apt-get install nginx wrk first")
    parser.add_argument("--big-mib", type=int, help="size of the big blob (512; quick 128)")
    parser.add_argument("--rounds", type=int, help="GET/crowd rounds (3; quick 1)")
    parser.add_argument("--skopeo-rounds", type=int, help="skopeo rounds, small images (3; 1)")
    parser.add_argument("--wrk-seconds", type=int, help="each wrk run (5; quick 2)")
    parser.add_argument("--nginx-workers", default="1", help="nginx worker_processes (1)")
    parser.add_argument("--mirror-workers", type=int, default=1, help="mirror's workers (1)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    args = parser.parse_args(argv)
    for name, chosen, known in (("--only", args.only, KINDS), ("--phases", args.phases, PHASES)):
        unknown = set(chosen.split(",")) - set(known)
        if unknown:
            parser.error(f"{name}: unknown {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    overrides = {
        "big_mib": args.big_mib,
        "rounds": args.rounds,
        "skopeo_rounds": args.skopeo_rounds,
        "wrk_seconds": args.wrk_seconds,
    }
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return replace(
        base, nginx_workers=args.nginx_workers, mirror_workers=args.mirror_workers, **chosen
    )


def choose(args: argparse.Namespace, tools: dict[str, str | None]) -> tuple[list[str], list[str]]:
    contenders = [k for k in KINDS if k in args.only.split(",")]
    phases = [p for p in PHASES if p in args.phases.split(",")]
    if not tools["nginx"] and {NGINX, NGINX_CACHE} & set(contenders):
        print(
            "nginx not found: skipping the nginx and nginx-cache columns"
            " (apt-get install -y nginx, or --install)"
        )
        contenders = [k for k in contenders if k not in (NGINX, NGINX_CACHE)]
    if not tools["wrk"] and "wrk" in phases:
        print("wrk not found: skipping the wrk figures (apt-get install -y wrk, or --install)")
        phases.remove("wrk")
    return contenders, phases


@contextlib.contextmanager
def workspace(keep: Path | None, prefix: str = "mirror-bench-") -> Iterator[Path]:
    """`keep` (made if need be), or a temporary directory removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def measure(args: argparse.Namespace, tools: dict[str, str | None]) -> Results:
    settings = settings_from(args)
    contenders, phases = choose(args, tools)
    results = Results([*contenders, SHA256])
    results.meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "settings": asdict(settings),
        "phases": phases,
        "machine": machine(),
        "tools": tool_versions(tools),
    }
    began = time.monotonic()
    with workspace(args.workdir) as work, BenchRegistry(work / "upstream") as upstream:
        progress(f"seeding the upstream {upstream.url} ({settings.big_mib} MiB big blob)")
        images = asyncio.run(seed(upstream.url, settings.big_mib, work))
        lab = Lab(
            work,
            upstream,
            tools["nginx"],
            settings.nginx_workers,
            settings.mirror_workers,
            work / "static",
            images["small"].pushed.media_type,
        )
        publish_static(lab, images)
        run = Run(lab, settings, images, results, contenders, tools["wrk"])
        results.meta["phase_seconds"] = {"seed": round(time.monotonic() - began, 1)}
        for phase in phases:
            progress(f"--- phase {phase}")
            began = time.monotonic()
            PHASE_RUNNERS[phase](run)
            results.meta["phase_seconds"][phase] = round(time.monotonic() - began, 1)
    return results


def headline(results: Results) -> str:
    meta, s = results.meta, results.meta["settings"]
    return (
        f"{meta['mode']} run, {meta['seconds']} s; big blob {s['big_mib']} MiB, {s['rounds']} "
        f"round(s), medians; mirror workers {s['mirror_workers']}, nginx worker_processes "
        f"{s['nginx_workers']}; (Nx) is the ratio to the contender named under `ratio vs`"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    isolate_from_proxies()
    if args.install:
        install_tools()
    tools = find_tools()
    problems = missing_required(tools)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    began = time.monotonic()
    results = measure(args, tools)
    results.meta["seconds"] = round(time.monotonic() - began, 1)
    print("\n" + headline(results) + "\n")
    print("\n".join(markdown(results)))
    for failure in results.failures:
        print(f"- failure: {failure}")
    write_json(results, args.json)
    print(f"\nJSON: {args.json}")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
