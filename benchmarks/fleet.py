"""Fleet mode in one run: what several replicas cost the upstream, and how fast a shared hit is.

`mirror serve` replicas share a tier (`shared:`): a bucket in radosgw (a one-node Ceph
cluster; moto's S3 server, with a printed note, when Ceph cannot start) indexed in a real
PostgreSQL. Their upstream is a real docker-registry on loopback. The parts:

- `leases` (fleet mode part 2, the first section of the table): N = 1, 2, 3 fresh
  replicas with the fleet's secret (each round and N: a fresh bucket prefix and
  database), 8 clients per replica pulling one cold image at the same moment (the
  manifest by tag, then all its blobs at once, every body hashed). Upstream bytes / image
  bytes (the goal: 1.00 for every N), wall time as a ratio to N = 1's, and the slowest
  first body byte.
- `proxy`: the established alternative on the same kind of image: distribution's proxy
  (`docker-registry` with `proxy: remoteurl:`), three replicas on one storage directory,
  8 clients per replica: the same figures, its wall as a ratio to the mirror's N = 1.
1. `sequential`: a cold image (5 layers, 64 MiB in all; `--mib`) pulled with `skopeo copy`
   through each replica in turn, each once the fleet has kept what the previous one
   fetched. Upstream bytes / image bytes: the goal is 1.00, three separate mirrors 3.00.
2. `concurrent`: another cold image pulled with skopeo through three replicas without
   the fleet's secret (no leases: part 1) at the same moment. The same ratio: the
   "before" of the leases part.
3. `shared hit`: a blob (`--mib` MiB) replica A fetched, GET through a fresh replica
   (an L2 hit, streamed from the bucket into its L1) and through a fresh replica with
   `redirect: true` (a 307 to a presigned URL, followed); the reference is an L1 hit on
   A in the same round. MB/s, and each as a ratio to the L1 hit.

Upstream bytes come from the replicas' `mirror_upstream_bytes_total` (summed), checked
against the bytes of the GETs in the docker-registry's access log.

    python benchmarks/fleet.py               # 3 rounds of each part, 64 MiB
    python benchmarks/fleet.py --quick       # 1 round of all but the shared hits
    python benchmarks/fleet.py --parts leases,proxy --mib 256 --rounds 5

Needs docker-registry and skopeo, PostgreSQL 15 and Ceph (`apt-get install -y
docker-registry skopeo postgresql ceph-mon ceph-osd ceph-common radosgw`) and the project
with its test extras. Only 127.0.0.1 is used. Prints a markdown table (progress on
stderr) and writes JSON; exit status 1 when a measurement failed or a check did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import http.client
import json
import multiprocessing
import os
import queue
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pytest
from bench_servers import BenchRegistry
from conftest import MirrorProcess
from engines import PG_BIN, CephCluster, Postgres, S3Endpoint, unique_bucket_name
from moto_ecr import DEFAULT_REGION, DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, MotoServer
from prometheus_client.parser import text_string_to_metric_families
from run import isolate_from_proxies, machine, progress, tool_versions, workspace
from server_process import ServerError
from upstream_registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    PushedImage,
    dir_digests,
    free_loopback_port,
    push_image,
    skopeo_copy,
)

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

MiB = 1 << 20
REPLICAS = 3
CHUNK = 1 << 20
GET_TIMEOUT = 300.0  # seconds one GET may take, whatever the size
UPLOAD_WAIT = 120.0  # seconds the fleet may take to keep what one pull fetched
COPY_TIMEOUT = 600.0  # seconds one skopeo copy may take
SETTLE = 0.5  # seconds between a step and the next measurement
FLEET_SIZES = (1, 2, 3)  # replicas of the leases part
CROWD_TIMEOUT = 300.0  # seconds one crowd of clients may take, whatever the size
READY_TIMEOUT = 60.0  # seconds the client processes may take to be ready
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
PARTS = ("leases", "proxy", "sequential", "concurrent", "hits")
INSTALL = (
    "apt-get install -y docker-registry skopeo postgresql ceph-mon ceph-osd ceph-common radosgw"
)


@dataclass(frozen=True)
class Settings:
    mib: int  # the image of parts 1 and 2 (all layers) and the blob of part 3
    layers: int
    rounds: int  # of parts 1 and 2, leases and proxy
    hit_rounds: int  # of part 3
    clients: int = 8  # per replica, in the leases and proxy parts


FULL = Settings(mib=64, layers=5, rounds=3, hit_rounds=3)
QUICK = Settings(mib=64, layers=5, rounds=1, hit_rounds=3)


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """Values, one per round; the median, and its ratio to another figure's median."""

    label: str
    unit: str
    reference: str | None = None  # the key of the figure ratios are taken against
    note: str = ""  # what to read it against (the goal, what three plain mirrors do)
    digits: int = 2
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


@dataclass
class Report:
    meta: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    details: dict[str, list[Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    goals: list[dict[str, Any]] = field(default_factory=list)  # text, measured, met
    notes: list[str] = field(default_factory=list)  # what a contender did wrong

    def define(self, key: str, label: str, unit: str, **kwargs: Any) -> None:
        self.figures.setdefault(key, Figure(label, unit, **kwargs))

    def add(self, key: str, value: float) -> None:
        self.figures[key].values.append(value)

    def detail(self, key: str, item: Any) -> None:
        self.details.setdefault(key, []).append(item)

    def ratio(self, key: str) -> float | None:
        figure = self.figures[key]
        reference = self.figures.get(figure.reference or "")
        mine, ref = figure.median, reference.median if reference else None
        return mine / ref if mine is not None and ref else None

    def markdown(self) -> Iterator[str]:
        yield "| figure | median | rounds | ratio | vs |"
        yield "|---|---|---|---|---|"
        for key, f in self.figures.items():
            if f.median is None:
                continue
            rounds = ", ".join(f"{v:.{f.digits}f}" for v in f.values)
            ratio = self.ratio(key)
            shown = f"{ratio:.2f}x" if ratio is not None else ""
            vs = self.figures[f.reference].label if f.reference else f.note
            median = f"{f.median:.{f.digits}f}"
            label = f"{f.label} ({f.unit})" if f.unit else f.label
            yield f"| {label} | {median} | {rounds} | {shown} | {vs} |"

    def as_json(self) -> dict[str, Any]:
        figures = {
            key: {**asdict(f), "median": f.median, "ratio": self.ratio(key)}
            for key, f in self.figures.items()
        }
        return {
            "meta": self.meta,
            "figures": figures,
            "goals": self.goals,
            "notes": self.notes,
            "details": self.details,
            "failures": self.failures,
        }


# --------------------------------------------------------------------------- engines


@contextlib.contextmanager
def s3_store(work: Path, report: Report) -> Iterator[S3Endpoint]:
    """radosgw of a one-node Ceph cluster; moto's S3 server if Ceph cannot start."""
    began = time.monotonic()
    try:
        cluster = CephCluster(work / "ceph")
        cluster.start()
    except (ServerError, OSError, pytest.skip.Exception) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        note = f"radosgw could not start ({first}): using moto's S3 server instead"
        print(f"NOTE: {note}", flush=True)
        report.meta["s3_note"] = note
        with MotoServer(work / "moto") as moto:
            report.meta["s3"] = "moto"
            yield S3Endpoint(moto.url, DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, DEFAULT_REGION)
        return
    report.meta["s3"] = "radosgw"
    report.meta["s3_start_seconds"] = round(time.monotonic() - began, 1)
    try:
        yield cluster.endpoint
    finally:
        cluster.close()


def use_s3_keys(endpoint: S3Endpoint, work: Path) -> None:
    """The replicas (subprocesses) read the store's keys from the standard AWS variables;
    nothing else of this machine's AWS set-up may reach them (no files, no metadata)."""
    os.environ["AWS_ACCESS_KEY_ID"] = endpoint.access_key
    os.environ["AWS_SECRET_ACCESS_KEY"] = endpoint.secret_key
    os.environ["AWS_DEFAULT_REGION"] = endpoint.region
    os.environ["AWS_CONFIG_FILE"] = str(work / "no-aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(work / "no-aws-credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)


# --------------------------------------------------------------------------- the fleet


def metrics(replica: MirrorProcess, **labels: str) -> dict[str, float]:
    """The replica's samples with these labels, each name summed over its other labels
    (a counter's whole)."""
    with urllib.request.urlopen(f"{replica.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def shared_blob_hits(replica: MirrorProcess) -> float:
    """Blob requests this replica answered from the shared tier."""
    hits = metrics(replica, kind="blob", result="shared")
    return hits.get("mirror_cache_requests_total", 0.0)


@dataclass
class Fleet:
    """Replicas with one `shared:` block, each with a cache directory of its own."""

    work: Path
    upstream_url: str
    shared: dict[str, Any]
    replicas: list[MirrorProcess] = field(default_factory=list)
    _serial: int = 0

    def start(self, *, redirect: bool = False) -> MirrorProcess:
        n, self._serial = self._serial, self._serial + 1
        home = self.work / f"replica{n}"
        home.mkdir(parents=True)
        port = free_loopback_port()
        # Peers reach each other on loopback: the default names the host, which may not.
        advertise = f"http://127.0.0.1:{port}"
        config = {
            "storage": {"path": str(home / "cache"), "max_size": "4GiB"},
            "upstreams": [
                {"name": "upstream", "url": self.upstream_url, "default": True, "tag_ttl": "5m"}
            ],
            "shared": {**self.shared, "redirect": redirect, "advertise_url": advertise},
        }
        (home / "mirror.yaml").write_text(json.dumps(config, indent=2))  # YAML reads JSON
        config_path = str(home / "mirror.yaml")
        replica = MirrorProcess(["--config", config_path], home / "mirror.log", port=port)
        self.replicas.append(replica)
        return replica

    def stop(self, replica: MirrorProcess) -> None:
        """Stop it and remove its cache: every replica started later is fresh."""
        replica.stop()
        self.replicas.remove(replica)
        shutil.rmtree(replica.log_path.parent / "cache", ignore_errors=True)

    def close(self) -> None:
        for replica in list(self.replicas):
            self.stop(replica)

    def total(self, replicas: list[MirrorProcess], name: str) -> float:
        return sum(metrics(r).get(name, 0.0) for r in replicas)

    def wait_kept(self, replicas: list[MirrorProcess], since: float, objects: int) -> float:
        """Seconds until the fleet has kept `objects` more objects in the shared tier (rows
        written, counted once, by whichever replica uploaded them); at most UPLOAD_WAIT."""
        began = time.monotonic()
        while self.total(replicas, "mirror_shared_uploads_total") - since < objects:
            if time.monotonic() - began > UPLOAD_WAIT:
                raise RuntimeError(f"the fleet did not keep {objects} objects in {UPLOAD_WAIT} s")
            time.sleep(0.05)
        return time.monotonic() - began


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Got:
    seconds: float  # from sending the first request to the last body byte
    first_byte: float
    size: int
    redirected: bool

    @property
    def mbps(self) -> float:
        return self.size / self.seconds / 1e6


def get_blob(url: str, digest: str, *, follow: bool = False) -> Got:
    """GET `url` on a fresh connection, following one 307 when `follow` (to loopback only),
    hashing every body byte and checking it against `digest`."""
    deadline = time.perf_counter() + GET_TIMEOUT
    began = time.perf_counter()
    connection, response = _request(url)
    redirected = False
    try:
        if follow and response.status == 307:
            location = response.getheader("Location") or ""
            response.read()
            connection.close()
            if urlsplit(location).hostname != "127.0.0.1":
                raise RuntimeError(f"redirected off loopback: {location[:80]}")
            connection, response = _request(location)
            redirected = True
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {response.read(300)!r}")
        seconds, first, size, got = _read_hashed(response, began, deadline)
    finally:
        connection.close()
    if got != digest:
        raise RuntimeError(f"GET {url}: body hashes to {got}, not {digest}")
    return Got(seconds, first, size, redirected)


def _request(url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    connection.request("GET", target, headers={"User-Agent": "mirror-bench", "Accept": "*/*"})
    return connection, connection.getresponse()


def _read_hashed(
    response: http.client.HTTPResponse, began: float, deadline: float
) -> tuple[float, float, int, str]:
    """(seconds to the last and to the first body byte, length, sha256 digest) of the
    body; a body cut short of its Content-Length raises http.client.IncompleteRead."""
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    first: float | None = None
    size = 0
    while n := response.readinto(buffer):
        if first is None:
            first = time.perf_counter() - began
        hasher.update(view[:n])
        size += n
        if time.perf_counter() > deadline:
            raise RuntimeError(f"GET timed out after {size} bytes")
    total = time.perf_counter() - began
    return total, first or total, size, "sha256:" + hasher.hexdigest()


def copy_image(host: str, image: PushedImage, dest: Path) -> None:
    """`skopeo copy` by tag into a dir:, every blob re-hashed and checked."""
    try:
        skopeo_copy(f"{host}/{image.reference}", dest, timeout=COPY_TIMEOUT)
        missing = image.blob_digests() - dir_digests(dest)
        if missing:
            raise RuntimeError(f"skopeo copy through {host} lacks {sorted(missing)}")
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def image_bytes(image: PushedImage) -> int:
    """What one pull needs: the manifest, the config and every layer."""
    manifest = json.loads(image.manifest_bytes)
    config = int(manifest["config"]["size"])
    return len(image.manifest_bytes) + config + sum(image.layer_sizes)


@dataclass(frozen=True)
class Pull:
    """One client's pull of an image: the manifest by tag, then all its blobs at once."""

    host: str
    ended: float  # time.monotonic(): one clock for every process of this machine
    first_bytes: list[float]  # per GET (the manifest's first), seconds to its first body byte
    size: int  # body bytes received, every one hashed
    error: str | None = None


@dataclass(frozen=True)
class Crowd:
    """Clients released together: seconds until the last was done, and each one's pull."""

    wall: float
    pulls: list[Pull]

    @property
    def errors(self) -> list[str]:
        return [f"{p.host}: {p.error}" for p in self.pulls if p.error is not None]

    @property
    def whole(self) -> list[Pull]:
        """The pulls that got the whole image."""
        return [p for p in self.pulls if p.error is None]

    @property
    def slowest_first_byte(self) -> float:
        return max(s for p in self.whole for s in p.first_bytes)


def crowd(hosts: list[str], image: PushedImage, clients: int) -> Crowd:
    """`clients` clients per host pull `image` at the same moment. The clients of one host
    run in a process of their own (as if on a node of their own; one Python thread could
    not hash the bodies of 24 clients as fast as they arrive), released together by a
    barrier; the wall ends with the last client's last body byte. Bounded: READY_TIMEOUT
    for the processes to be ready, CROWD_TIMEOUT for the pulls."""
    context = multiprocessing.get_context("fork")  # nothing to pickle; no re-import
    barrier = context.Barrier(len(hosts) + 1, timeout=READY_TIMEOUT)
    results: Queue[list[Pull]] = context.Queue()
    processes = [
        context.Process(
            target=_clients_of,
            args=(host, image.name, image.tag or "", image.manifest_digest, clients),
            kwargs={"barrier": barrier, "results": results},
            daemon=True,
        )
        for host in hosts
    ]
    for process in processes:
        process.start()
    try:
        barrier.wait()
        began = time.monotonic()
        pulls: list[Pull] = []
        for _ in processes:
            pulls += _next_result(results, processes, began + CROWD_TIMEOUT + 10)
    finally:
        for process in processes:  # only the processes started here
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        results.close()
    return Crowd(max(p.ended for p in pulls) - began, pulls)


def _next_result(
    results: Queue[list[Pull]], processes: Sequence[multiprocessing.process.BaseProcess], by: float
) -> list[Pull]:
    while time.monotonic() < by:
        with contextlib.suppress(queue.Empty):
            return results.get(timeout=0.5)
        if all(p.exitcode is not None for p in processes) and results.empty():
            raise RuntimeError("a client process ended without its results")
    raise RuntimeError(f"clients still running after {CROWD_TIMEOUT} s")


def _clients_of(
    host: str,
    name: str,
    tag: str,
    manifest_digest: str,
    clients: int,
    *,
    barrier: Barrier,
    results: Queue[list[Pull]],
) -> None:
    """In a client process: wait for the others, then the pulls of `clients` clients."""
    try:
        barrier.wait()
        pulls = asyncio.run(_pulls(host, name, tag, manifest_digest, clients))
    except BaseException as error:  # the parent learns it, not a lost traceback
        failed = f"{type(error).__name__}: {error}"
        pulls = [Pull(host, time.monotonic(), [], 0, failed) for _ in range(clients)]
    results.put(list(pulls))


async def _pulls(host: str, name: str, tag: str, manifest_digest: str, clients: int) -> list[Pull]:
    pulls = (_pull(host, name, tag, manifest_digest) for _ in range(clients))
    return list(await asyncio.wait_for(asyncio.gather(*pulls), CROWD_TIMEOUT))


async def _pull(host: str, name: str, tag: str, manifest_digest: str) -> Pull:
    """One client, with connections of its own: the manifest by tag (checked against its
    digest), then every blob it names at once, each body hashed and checked."""
    first_bytes: list[float] = []
    size = 0
    timeout = aiohttp.ClientTimeout(total=GET_TIMEOUT, sock_read=60)
    try:
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            base = f"http://{host}/v2/{name}"
            headers = {"Accept": MANIFEST_ACCEPT}
            got = await _get(session, f"{base}/manifests/{tag}", manifest_digest, headers)
            first_bytes.append(got.first_byte)
            size += got.size
            manifest = json.loads(got.body)
            digests = [manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])]
            gets = [_get(session, f"{base}/blobs/{d}", d, None) for d in digests]
            for blob in await asyncio.gather(*gets):
                first_bytes.append(blob.first_byte)
                size += blob.size
    except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError, KeyError) as error:
        return Pull(host, time.monotonic(), first_bytes, size, f"{type(error).__name__}: {error}")
    return Pull(host, time.monotonic(), first_bytes, size)


@dataclass(frozen=True)
class Body:
    first_byte: float  # seconds from sending the GET to its first body byte
    size: int
    body: bytes  # a manifest's bytes; b"" for a blob (hashed, not kept)


async def _get(
    session: aiohttp.ClientSession, url: str, digest: str, headers: dict[str, str] | None
) -> Body:
    """A GET whose body must hash to `digest`; a manifest's (`headers` given) is kept."""
    hasher = hashlib.sha256()
    began = time.monotonic()
    first: float | None = None
    kept = bytearray()
    size = 0
    async with session.get(url, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {(await response.read())[:200]!r}")
        async for chunk in response.content.iter_chunked(CHUNK):
            if first is None:
                first = time.monotonic() - began
            hasher.update(chunk)
            size += len(chunk)
            if headers is not None:  # a manifest: its bytes are read
                kept += chunk
    if "sha256:" + hasher.hexdigest() != digest:
        raise RuntimeError(f"GET {url}: body hashes to sha256:{hasher.hexdigest()}")
    return Body(first if first is not None else time.monotonic() - began, size, bytes(kept))


# --------------------------------------------------------------------------- parts


@dataclass
class Bench:
    work: Path
    settings: Settings
    upstream: BenchRegistry
    fleet: Fleet
    report: Report
    postgres: Postgres
    secret: str  # the leases part's fleet secret (peer_secret)
    serial: int = 0

    def scratch(self) -> Path:
        self.serial += 1
        return self.work / f"copy-{self.serial}"

    def push(self, name: str, sizes: list[int]) -> PushedImage:
        return asyncio.run(push_image(self.upstream.url, name, "1", sizes, tmp_dir=self.work))

    def layer_sizes(self) -> list[int]:
        total, n = self.settings.mib * MiB, self.settings.layers
        return [total // n] * (n - 1) + [total - (total // n) * (n - 1)]

    @contextlib.contextmanager
    def upstream_cost(
        self, key: str, image: PushedImage, replicas: list[MirrorProcess]
    ) -> Iterator[None]:
        """Upstream bytes / image bytes of what runs inside: from the replicas' metric (the
        figure), and from the registry's access log (the cross-check; the only figure for
        a contender without the metric: no `replicas`)."""
        self.upstream.quiesce(quiet=0.1)
        self.upstream.reset_counts()
        before = [metrics(r).get("mirror_upstream_bytes_total", 0.0) for r in replicas]
        yield
        self.upstream.quiesce(quiet=0.25)
        after = [metrics(r).get("mirror_upstream_bytes_total", 0.0) for r in replicas]
        per_replica = [a - b for a, b in zip(after, before, strict=True)]
        requests = self.upstream.requests()
        gets = [r for r in requests if r.method == "GET"]
        logged = sum(r.size for r in gets if r.status == 200)
        blob_gets = sum(1 for r in gets if "/blobs/" in r.path)
        size = image_bytes(image)
        if replicas:
            self.report.add(f"{key}.ratio", sum(per_replica) / size)
        self.report.add(f"{key}.logged_ratio", logged / size)
        self.report.add(f"{key}.blob_gets", blob_gets)
        seen = [f"{r.method} {r.path.split('/')[-2]} {r.status}" for r in requests]
        self.report.detail(
            key,
            {
                "image_bytes": size,
                "upstream_bytes_per_replica": per_replica,
                "registry_get_bytes": logged,
                "registry_requests": seen,
            },
        )
        metered = f"{sum(per_replica) / size:.2f} (metric), " if replicas else ""
        progress(
            f"{key}: upstream bytes / image bytes {metered}{logged / size:.2f} (registry log), "
            f"{blob_gets} upstream blob GETs"
        )

    def objects(self, image: PushedImage) -> int:
        return len(image.blob_digests()) + 1  # and the manifest

    def sequential(self, round_: int) -> None:
        image = self.push(f"fleet-bench/sequential{round_}", self.layer_sizes())
        replicas = list(self.fleet.replicas)
        kept = self.fleet.total(replicas, "mirror_shared_uploads_total")
        waits = []
        with self.upstream_cost("sequential", image, replicas):
            for replica in replicas:
                began = time.perf_counter()
                copy_image(replica.host, image, self.scratch())
                seconds = time.perf_counter() - began
                # The next replica pulls once this pull is in the shared tier: what the
                # fleet holds, not how fast it uploads, is measured here.
                waits.append(self.fleet.wait_kept(replicas, kept, self.objects(image)))
                progress(f"  copy through {replica.host}: {seconds:.2f} s")
        self.report.add("sequential.upload_wait", waits[0])

    def concurrent(self, round_: int) -> None:
        image = self.push(f"fleet-bench/concurrent{round_}", self.layer_sizes())
        replicas = list(self.fleet.replicas)
        kept = self.fleet.total(replicas, "mirror_shared_uploads_total")
        with self.upstream_cost("concurrent", image, replicas):
            wall = at_once(
                [functools.partial(copy_image, r.host, image, self.scratch()) for r in replicas]
            )
            # Uploads still running would weigh on the next measurement: wait them out.
            self.fleet.wait_kept(replicas, kept, self.objects(image))
        self.report.add("concurrent.wall", wall)

    def leases(self, round_: int, size: int) -> None:
        """`size` fresh replicas with the fleet's secret, on a fresh bucket prefix and a
        fresh database, each asked by `clients` clients for one cold image at once."""
        tag = f"n{size}-r{round_}"
        image = self.push(f"fleet-bench/leases-{tag}", self.layer_sizes())
        database = f"fleet_leases_{size}_{round_}"
        shared = {
            **self.fleet.shared,
            "prefix": f"leases-{tag}",
            "database": self.postgres.create_database(database),
            "peer_secret": self.secret,
        }
        fleet = Fleet(self.work / f"leases-{tag}", self.upstream.url, shared)
        key = f"leases.n{size}"
        try:
            replicas = [fleet.start() for _ in range(size)]
            time.sleep(SETTLE)
            with self.upstream_cost(key, image, replicas):
                got = crowd([r.host for r in replicas], image, self.settings.clients)
                if got.errors:
                    raise RuntimeError(
                        f"{len(got.errors)} of {len(got.pulls)} clients failed: {got.errors[0]}"
                    )
                # The uploads to the bucket end the leases: wait them out, then count.
                fleet.wait_kept(replicas, 0, self.objects(image))
            peer = fleet.total(replicas, "mirror_peer_bytes_total")
            served = sum(
                metrics(r, result="served").get("mirror_peer_requests_total", 0.0) for r in replicas
            )
            leases = {
                outcome: sum(
                    metrics(r, outcome=outcome).get("mirror_fleet_leases_total", 0.0)
                    for r in replicas
                )
                for outcome in ("taken", "followed", "taken_over")
            }
        finally:
            fleet.close()
            with contextlib.suppress(ServerError, OSError, subprocess.SubprocessError):
                self.postgres.drop_database(database)
        self.record_crowd(key, got, size)
        self.report.detail(
            f"{key}.fleet",
            {"peer_bytes": peer, "peer_requests_served": served, "leases": leases},
        )
        progress(
            f"  peer bytes / image bytes {peer / image_bytes(image):.2f}, "
            f"peer requests served {served:g}, leases {leases}"
        )

    def proxy(self, round_: int) -> None:
        """distribution's proxy: REPLICAS docker-registry processes with `proxy:
        remoteurl:` on one fresh storage directory, `clients` clients each."""
        image = self.push(f"fleet-bench/proxy-r{round_}", self.layer_sizes())
        root = self.work / f"proxy-r{round_}"
        replicas: list[BenchRegistry] = []
        try:
            for n in range(REPLICAS):
                replica = BenchRegistry(
                    root / f"replica{n}",
                    storage_dir=root / "storage",
                    extra_config={"proxy": {"remoteurl": self.upstream.url}},
                )
                replicas.append(replica)
                replica.start()
            time.sleep(SETTLE)
            with self.upstream_cost("proxy", image, []):
                got = crowd([r.host for r in replicas], image, self.settings.clients)
        finally:
            for replica in replicas:
                replica.stop()
            shutil.rmtree(root, ignore_errors=True)
        # Failed clients are its answer under this load, not a failed measurement: counted,
        # and the other figures taken over the clients that got the whole image.
        self.report.add("proxy.failed_clients", len(got.errors))
        if got.errors:
            self.report.detail("proxy.errors", got.errors)
            self.report.notes.append(
                f"distribution proxy, round {round_ + 1}: {len(got.errors)} of "
                f"{len(got.pulls)} clients failed: {got.errors[0]}"
            )
        if not got.whole:
            raise RuntimeError(f"no client got the whole image: {got.errors[0]}")
        self.record_crowd("proxy", got, REPLICAS)

    def record_crowd(self, key: str, got: Crowd, replicas: int) -> None:
        """The crowd's figures, over the clients that got the whole image (all of them, but
        for a contender whose failed clients are counted apart)."""
        delivered = sum(p.size for p in got.whole)
        self.report.add(f"{key}.wall", got.wall)
        self.report.add(f"{key}.mbps", delivered / got.wall / 1e6)
        self.report.add(f"{key}.first_byte", got.slowest_first_byte)
        manifests = max(p.first_bytes[0] for p in got.whole)
        blobs = max(s for p in got.whole for s in p.first_bytes[1:])
        self.report.detail(
            f"{key}.clients",
            {
                "wall": got.wall,
                "slowest_first_byte_per_client": [max(p.first_bytes) for p in got.whole],
                "slowest_manifest_first_byte": manifests,
                "slowest_blob_first_byte": blobs,
                "bytes_per_client": [p.size for p in got.whole],
                "failed_clients": len(got.errors),
            },
        )
        progress(
            f"  {key}: {replicas} x {self.settings.clients} clients, wall {got.wall:.2f} s "
            f"({delivered / got.wall / 1e6:.0f} MB/s to the clients in all); slowest first "
            f"body byte {manifests * 1000:.1f} ms (manifests), {blobs * 1000:.1f} ms (blobs)"
        )

    def shared_hits(self) -> None:
        blob = self.push("fleet-bench/blob", [self.settings.mib * MiB])
        digest = blob.layer_digests[0]
        path = f"/v2/{blob.name}/blobs/{digest}"
        origin = self.fleet.replicas[0]
        kept = metrics(origin).get("mirror_shared_uploads_total", 0.0)
        get_blob(origin.url + path, digest)  # from the upstream into A's L1
        self.fleet.wait_kept([origin], kept, 1)
        time.sleep(SETTLE)
        steps = [
            ("hit.l1", functools.partial(self.l1_hit, origin.url + path, digest)),
            ("hit.l2", functools.partial(self.l2_hit, path, digest, redirect=False)),
            ("hit.redirect", functools.partial(self.l2_hit, path, digest, redirect=True)),
        ]
        for round_ in range(self.settings.hit_rounds):
            # A different order each round: no kind always runs just after a replica stops.
            turn = round_ % len(steps)
            for key, step in steps[turn:] + steps[:turn]:
                self.attempt(key, step)

    def l1_hit(self, url: str, digest: str) -> None:
        got = get_blob(url, digest)
        self.record("hit.l1", got)

    def l2_hit(self, path: str, digest: str, *, redirect: bool) -> None:
        key = "hit.redirect" if redirect else "hit.l2"
        replica = self.fleet.start(redirect=redirect)
        try:
            time.sleep(SETTLE)
            self.upstream.quiesce(quiet=0.1)
            self.upstream.reset_counts()
            got = get_blob(replica.url + path, digest, follow=redirect)
            self.upstream.quiesce(quiet=0.25)
            upstream_gets = self.upstream.blob_gets()
            hits = shared_blob_hits(replica)
        finally:
            self.fleet.stop(replica)
        # Else it was not the hit it claims to measure.
        if upstream_gets or hits != 1 or got.redirected != redirect:
            raise RuntimeError(
                f"{key}: {upstream_gets} upstream blob GETs, {hits:g} shared hits, "
                f"redirected: {got.redirected}"
            )
        self.record(key, got)

    def record(self, key: str, got: Got) -> None:
        self.report.add(f"{key}.mbps", got.mbps)
        self.report.add(f"{key}.first_byte", got.first_byte)
        progress(f"  {key}: {got.mbps:.0f} MB/s, first byte {got.first_byte * 1000:.1f} ms")

    def attempt(self, key: str, measure: Callable[[], None]) -> None:
        """One measurement; a failure is listed and the run goes on."""
        try:
            measure()
        except (
            AssertionError,
            RuntimeError,
            OSError,
            subprocess.SubprocessError,
            http.client.HTTPException,
        ) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            self.report.failures.append(f"{key}: {message}")
            progress(f"  {key}: FAILED {message}")


def at_once(jobs: list[Callable[[], None]]) -> float:
    """Run the jobs in threads released together; wall seconds until the last is done.
    A job's failure is raised here, after all have ended (each is bounded by its own
    timeout, and the joins by COPY_TIMEOUT)."""
    barrier = threading.Barrier(len(jobs) + 1, timeout=30)
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            barrier.wait()
            job()
        except BaseException as error:  # reported by the caller, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join(max(0.0, began + COPY_TIMEOUT - time.perf_counter()))
    wall = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} pulls failed: {errors[0]}")
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"pulls still running after {COPY_TIMEOUT} s")
    return wall


# --------------------------------------------------------------------------- the run


def define_crowds(report: Report, s: Settings, blobs: int) -> None:
    """The leases part (the table's first section) and distribution's proxy."""
    clients = f"{s.clients} clients per replica at once"
    for size in FLEET_SIZES:
        key, part = f"leases.n{size}", f"leases, {size} replica{'s' if size > 1 else ''}"
        before = "without leases" if size > 1 else ""
        note = f"goal 1.00; {before}: up to {size}.00" if before else "goal 1.00"
        report.define(f"{key}.ratio", f"{part}: upstream bytes / image bytes", "", note=note)
        report.define(
            f"{key}.logged_ratio",
            f"{part}: registry GET bytes / image bytes (cross-check)",
            "",
            note=note,
        )
        report.define(
            f"{key}.blob_gets",
            f"{part}: upstream blob GETs",
            "requests",
            note=f"{blobs} blobs in the image",
            digits=0,
        )
        report.define(
            f"{key}.wall",
            f"{part}: wall, {clients}",
            "s",
            reference="leases.n1.wall",
        )
        report.define(
            f"{key}.mbps",
            f"{part}: MB/s to all the clients",
            "MB/s",
            reference="leases.n1.mbps",
            digits=0,
        )
        report.define(
            f"{key}.first_byte",
            f"{part}: slowest first body byte (of any client's GET)",
            "s",
            digits=4,
        )
    part = f"distribution proxy, {REPLICAS} replicas on one filesystem"
    report.define(
        "proxy.logged_ratio",
        f"{part}: registry GET bytes / image bytes",
        "",
        note="the mirror's goal: 1.00",
    )
    report.define(
        "proxy.blob_gets",
        f"{part}: upstream blob GETs",
        "requests",
        note=f"{blobs} blobs in the image",
        digits=0,
    )
    report.define(
        "proxy.failed_clients",
        f"{part}: clients that failed",
        "clients",
        note=f"of {REPLICAS * s.clients}",
        digits=0,
    )
    report.define(
        "proxy.wall",
        f"{part}: wall, {clients}",
        "s",
        reference="leases.n1.wall",
    )
    report.define(
        "proxy.mbps",
        f"{part}: MB/s to all the clients",
        "MB/s",
        reference="leases.n1.mbps",
        digits=0,
    )
    report.define("proxy.first_byte", f"{part}: slowest first body byte", "s", digits=4)


def define(report: Report, s: Settings, blobs: int) -> None:
    goal = f"goal 1.00; {REPLICAS} separate mirrors: {REPLICAS}.00"
    parts = (
        ("sequential", "1. one after the other"),
        ("concurrent", "2. at once, without leases (part 1)"),
    )
    for key, part in parts:
        report.define(f"{key}.ratio", f"{part}: upstream bytes / image bytes", "", note=goal)
        report.define(
            f"{key}.logged_ratio",
            f"{part}: registry GET bytes / image bytes (cross-check)",
            "",
            note=goal,
        )
        report.define(
            f"{key}.blob_gets",
            f"{part}: upstream blob GETs",
            "requests",
            note=f"{blobs} blobs in the image",
            digits=0,
        )
        if key == "sequential":
            report.define(
                "sequential.upload_wait",
                "1. after the first pull ended, until the fleet had kept all of it",
                "s",
                note="the window in which a pull elsewhere would fetch again",
            )
    report.define(
        "concurrent.wall",
        "2. at once, without leases (part 1): wall, until the last pull was done",
        "s",
    )
    what = {
        "l1": "3. L1 hit on replica A",
        "l2": "3. L2 hit on a fresh replica (bucket -> client and its L1)",
        "redirect": "3. L2 hit on a fresh replica, redirect: true (307 followed to the bucket)",
    }
    figures = (
        ("mbps", f"GET {s.mib} MiB blob", "MB/s", 0),
        ("first_byte", "first body byte", "s", 4),
    )
    for figure, label, unit, digits in figures:
        for key, title in what.items():
            report.define(
                f"hit.{key}.{figure}",
                f"{title}: {label}",
                unit,
                reference=None if key == "l1" else f"hit.l1.{figure}",
                digits=digits,
            )


def judge(report: Report, blobs: int) -> None:
    """The goal of fleet mode's part 2, per fleet size: every round's upstream bytes equal
    the image's (the replicas' metric and the registry's log) in one GET per blob."""
    for size in FLEET_SIZES:
        key = f"leases.n{size}"
        ratios = report.figures[f"{key}.ratio"].values
        logged = report.figures[f"{key}.logged_ratio"].values
        gets = report.figures[f"{key}.blob_gets"].values
        if not ratios:
            continue
        met = all(round(r, 2) == 1.0 for r in ratios + logged) and all(g == blobs for g in gets)
        report.goals.append(
            {
                "text": f"{size} replica(s): upstream bytes / image bytes 1.00 and {blobs} "
                "upstream blob GETs, every round",
                "measured": {"ratio": ratios, "logged_ratio": logged, "blob_gets": gets},
                "met": met,
            }
        )


def engine_versions() -> dict[str, str]:
    versions = {}
    for name, argv in (
        ("postgres", [str(PG_BIN / "postgres"), "--version"]),
        ("radosgw", ["radosgw", "--version"]),
    ):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            versions[name] = (done.stdout + done.stderr).strip().splitlines()[0]
    return versions


def measure(args: argparse.Namespace, work: Path) -> Report:
    settings = replace(
        QUICK if args.quick else FULL,
        **{k: v for k, v in (("mib", args.mib), ("rounds", args.rounds)) if v is not None},
    )
    if args.rounds is not None:
        settings = replace(settings, hit_rounds=args.rounds)
    report = Report()
    report.meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "settings": asdict(settings),
        "replicas": REPLICAS,
        "machine": machine(),
        "tools": tool_versions({t: shutil.which(t) for t in ("docker-registry", "skopeo")})
        | engine_versions(),
    }
    blobs = settings.layers + 1  # and the config
    define_crowds(report, settings, blobs)
    define(report, settings, blobs)
    began = time.monotonic()
    with (
        s3_store(work, report) as s3,
        Postgres(work / "postgres") as postgres,
        BenchRegistry(work / "upstream") as upstream,
    ):
        use_s3_keys(s3, work)
        shared = {
            "bucket": unique_bucket_name("fleet-bench"),
            "endpoint_url": s3.url,
            "region": s3.region,
            "database": postgres.create_database("fleet_bench"),
            "max_size": "16GiB",
        }
        fleet = Fleet(work, upstream.url, shared)
        secret = secrets.token_urlsafe(24)
        bench = Bench(work, settings, upstream, fleet, report, postgres, secret)
        seconds = {"start": round(time.monotonic() - began, 1)}
        try:
            began = time.monotonic()
            for round_ in range(settings.rounds):
                # Round by round, each kind once: drift on the machine weighs on all alike.
                if "leases" in args.parts:
                    for size in FLEET_SIZES:
                        progress(f"--- leases, {size} replicas, round {round_ + 1}")
                        leases = functools.partial(bench.leases, round_, size)
                        bench.attempt(f"leases.n{size}", leases)
                if "proxy" in args.parts:
                    progress(f"--- distribution proxy, round {round_ + 1}")
                    bench.attempt("proxy", functools.partial(bench.proxy, round_))
            seconds["leases and proxy"] = round(time.monotonic() - began, 1)
            parts: list[tuple[str, int, Callable[[int], None]]] = [
                ("sequential", settings.rounds, bench.sequential),
                ("concurrent", settings.rounds, bench.concurrent),
                ("hits", 1, lambda _round: bench.shared_hits()),
            ]
            parts = [part for part in parts if part[0] in args.parts]
            if parts:  # the three replicas of parts 1 to 3 (no fleet secret: no leases)
                for _ in range(REPLICAS):
                    fleet.start()
            for part, rounds, step in parts:
                progress(f"--- {part}")
                began = time.monotonic()
                for n in range(rounds):
                    bench.attempt(part, functools.partial(step, n))
                seconds[part] = round(time.monotonic() - began, 1)
            report.meta["phase_seconds"] = seconds
        finally:
            fleet.close()
    judge(report, blobs)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of all but the hits")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"parts to run, comma-separated (default: all of {','.join(PARTS)})",
    )
    parser.add_argument("--mib", type=int, help="image and blob size in MiB (64)")
    parser.add_argument("--rounds", type=int, help="rounds of every part (3; quick: 1 and 3)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "fleet-results.json")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temp dir)")
    args = parser.parse_args(argv)
    if args.mib is not None and args.mib < 1:
        parser.error("--mib must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    isolate_from_proxies()
    missing = [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
    missing += [] if os.access(PG_BIN / "postgres", os.X_OK) else ["postgresql 15"]
    if missing:
        print(f"{', '.join(missing)} not found: {INSTALL}", file=sys.stderr)
        return 2
    began = time.monotonic()
    with workspace(args.workdir, "mirror-fleet-bench-") as work:
        report = measure(args, work)
    report.meta["seconds"] = round(time.monotonic() - began, 1)
    s = report.meta["settings"]
    print(
        f"\n{report.meta['mode']} run, {report.meta['seconds']} s; S3: {report.meta['s3']}; "
        f"{s['mib']} MiB ({s['layers']} layers for the images); {s['clients']} clients per "
        f"replica (leases, proxy); rounds: {s['rounds']} (leases, proxy, parts 1, 2), "
        f"{s['hit_rounds']} (shared hits); medians\n"
    )
    print("\n".join(report.markdown()))
    if report.goals:
        print("\nGoal of fleet mode part 2 (leases): each blob leaves the upstream once per fleet")
    for goal in report.goals:
        print(f"- {goal['text']}: {'met' if goal['met'] else 'NOT met'}")
    for note in report.notes:
        print(f"- note: {note}")
    for failure in report.failures:
        print(f"- failure: {failure}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
