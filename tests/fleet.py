"""Helpers of the fleet-mode tests (test_fleet*.py): replicas sharing one `shared:` block,
and what to ask them."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from engines import S3Endpoint
from prometheus_client.parser import text_string_to_metric_families
from upstream_registry import PushedImage, free_loopback_port

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]


def shared_block(endpoint: S3Endpoint, bucket: str, database: str) -> dict[str, Any]:
    """The `shared:` block of replicas of one fleet (a test adds to it)."""
    return {
        "bucket": bucket,
        "endpoint_url": endpoint.url,
        "region": endpoint.region,
        "database": database,
        "max_size": "1GiB",
    }


class Fleet:
    """Replicas of one fleet: each with its own cache directory, all with one `shared:`."""

    def __init__(
        self,
        start: StartMirrorProcess,
        root: Path,
        upstream: str,
        shared: dict[str, Any],
    ) -> None:
        self.start = start
        self.root = root
        self.shared = shared
        self.settings: dict[str, Any] = {"upstreams": [{"name": "up", "url": upstream}]}
        self.replicas: list[MirrorProcess] = []

    def config(self, n: int, port: int) -> Path:
        path = self.root / f"replica{n}.yaml"
        # Peers reach each other on loopback: the host's name may resolve elsewhere.
        shared = {"advertise_url": f"http://127.0.0.1:{port}", **self.shared}
        config = {
            **self.settings,
            "storage": {"path": str(self.root / f"cache{n}")},
            "shared": shared,
        }
        path.write_text(yaml.safe_dump(config))
        return path

    async def add(self) -> MirrorProcess:
        port = free_loopback_port()
        config = self.config(len(self.replicas), port)
        replica = await asyncio.to_thread(self.start, "--config", str(config), port=port)
        self.replicas.append(replica)
        return replica


def metric(replica: MirrorProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{replica.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def wait_uploaded(replica: MirrorProcess, count: int) -> None:
    """Until `replica` has kept `count` objects in the shared tier (rows written)."""

    def uploaded() -> bool:
        return metric(replica, "mirror_shared_uploads_total") >= count

    await wait_until(uploaded, f"{count} uploads kept\n{replica.log()}")


async def wait_until(check: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {within} s")
        await asyncio.sleep(0.2)


def readyz(replica: MirrorProcess) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{replica.url}/readyz", timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as error:
        body = json.loads(error.read())
    return body


def expected(image: PushedImage) -> set[str]:
    return image.blob_digests() | {image.manifest_digest}


def get_blob(
    replica: MirrorProcess, name: str, digest: str, authorization: str | None = None
) -> bytes | None:
    """The body of a blob GET, or None when the answer is an error or is cut."""
    request = urllib.request.Request(f"{replica.url}/v2/{name}/blobs/{digest}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            return bytes(resp.read())
    except (urllib.error.HTTPError, http.client.IncompleteRead, ConnectionError):
        return None
