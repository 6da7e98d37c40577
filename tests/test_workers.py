"""`workers: 2`: two processes of `mirror serve` on one port, a real docker-registry
upstream, skopeo and many connections pulling through it.

The kernel spreads connections over the processes by their source port, so any 16
connections reach both (all 16 reaching one has a chance of 2 in 65,536). A worker answers
cache hits itself and hands everything else, connection and all, to the primary.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import USERS, MirrorProcess, _console_script, write_htpasswd
from upstream_registry import (
    OCI_MANIFEST,
    PushedImage,
    RegistryProcess,
    dir_digests,
    push_image,
    sha256_digest,
    skopeo_copy_async,
)

StartMirrorProcess = Callable[..., MirrorProcess]
CONNECTIONS = 16
COLD_CONNECTIONS = 600
WORKER_LINE = re.compile(r"worker 1 \(pid (\d+)\) serving cache hits")


async def two_processes(
    start: StartMirrorProcess, registry: RegistryProcess, tmp_path: Path
) -> tuple[MirrorProcess, int]:
    """`mirror serve --workers 2`, once its worker serves; and the worker's pid."""
    mirror = start(
        "--storage", str(tmp_path / "cache"), "--upstream", registry.url, "--workers", "2"
    )  # fmt: skip
    return mirror, await worker_pid(mirror, after=0)


async def worker_pid(mirror: MirrorProcess, after: int) -> int:
    """The pid of the `after`+1-th worker 1 to start."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        started = WORKER_LINE.findall(mirror.log())
        if len(started) > after:
            return int(started[after])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no worker started:\n{mirror.log()}")


async def get_on_new_connections(
    url: str, count: int = CONNECTIONS, headers: dict[str, str] | None = None, status: int = 200
) -> list[asyncio.Task[bytes]]:
    """`count` GETs of `url`, each on a connection of its own, started now; each must
    answer `status`."""

    async def get() -> bytes:
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url, headers=headers) as resp,
        ):
            body = await resp.read()
            assert resp.status == status, body
            return body

    return [asyncio.create_task(get()) for _ in range(count)]


async def metric(mirror: MirrorProcess, line: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{mirror.url}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    assert found is not None, text
    return float(found.group(1))


async def pushed(registry: RegistryProcess, name: str) -> PushedImage:
    image = await push_image(registry.url, name, "v1", [64 * 1024, 32 * 1024])
    await registry.settle()
    registry.reset_counts()
    return image


async def test_skopeo_pulls_through_two_processes_and_every_hit_is_counted_once(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    image = await pushed(registry, "workers/skopeo")
    mirror, _ = await two_processes(start_mirror_process, registry, tmp_path)

    await skopeo_copy_async(f"{mirror.host}/{image.reference}", tmp_path / "first")
    await skopeo_copy_async(f"{mirror.host}/{image.reference}", tmp_path / "second")
    assert dir_digests(tmp_path / "first") == dir_digests(tmp_path / "second")
    await registry.settle()
    assert registry.blob_gets(image.name) == len(image.blob_digests())

    hits_before = await metric(mirror, 'mirror_cache_requests_total{kind="blob",result="hit"}')
    layer = image.layer_digests[0]
    bodies = await asyncio.gather(
        *await get_on_new_connections(f"{mirror.url}/v2/{image.name}/blobs/{layer}")
    )
    assert {sha256_digest(body) for body in bodies} == {layer}
    # Counted by whichever process answered, summed by /metrics (which the primary serves).
    hits = await metric(mirror, 'mirror_cache_requests_total{kind="blob",result="hit"}')
    assert hits - hits_before == CONNECTIONS
    served = await metric(
        mirror, 'mirror_http_requests_total{method="GET",route="blob",status="200"}'
    )
    assert served >= CONNECTIONS + len(image.blob_digests())  # hand-offs not counted twice
    assert served <= CONNECTIONS + 2 * len(image.blob_digests())  # two skopeo copies

    # Ranges and HEADs are answered the same, whichever process has the connection.
    url = f"{mirror.url}/v2/{image.name}/blobs/{layer}"
    parts = await asyncio.gather(
        *await get_on_new_connections(url, headers={"Range": "bytes=100-4195"}, status=206)
    )
    whole = bodies[0]
    assert set(parts) == {whole[100:4196]}
    async with aiohttp.ClientSession() as session:
        for _ in range(8):
            async with session.head(url, headers={"Connection": "close"}) as resp:
                assert (resp.status, resp.content_length) == (200, len(whole))
                assert resp.headers["Docker-Content-Digest"] == layer

    # And conditional requests: a 304 for the ETag; a Range honoured only when the
    # If-Range is the ETag; another unit or several ranges, the whole blob.
    etag = f'"{layer}"'
    manifest = f"{mirror.url}/v2/{image.name}/manifests/{image.manifest_digest}"
    for target, tag in ((url, etag), (manifest, f'"{image.manifest_digest}"')):
        unchanged = await get_on_new_connections(target, headers={"If-None-Match": tag}, status=304)
        assert set(await asyncio.gather(*unchanged)) == {b""}
    ranged = {"Range": "bytes=0-9", "If-Range": etag}
    parts = await asyncio.gather(*await get_on_new_connections(url, headers=ranged, status=206))
    assert set(parts) == {whole[:10]}
    for headers in (
        {"Range": "bytes=0-9", "If-Range": f'"{image.config_digest}"'},
        {"Range": "items=0-9"},
        {"Range": "bytes=0-1,5-9"},
    ):
        wholes = await asyncio.gather(*await get_on_new_connections(url, headers=headers))
        assert set(wholes) == {whole}


async def test_a_worker_answers_hits_while_the_primary_is_stopped(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    image = await pushed(registry, "workers/alone")
    mirror, _ = await two_processes(start_mirror_process, registry, tmp_path)
    manifest = f"{mirror.url}/v2/{image.name}/manifests/{image.manifest_digest}"
    headers = {"Accept": OCI_MANIFEST}
    await asyncio.gather(*await get_on_new_connections(manifest, 1, headers))  # cached now

    os.kill(mirror.proc.pid, signal.SIGSTOP)
    try:
        gets = await get_on_new_connections(manifest, CONNECTIONS, headers)
        done, _ = await asyncio.wait(gets, timeout=3)
        assert done, "no connection was answered by the worker"
        assert len(done) < CONNECTIONS, "no connection reached the stopped primary"
        assert {sha256_digest(task.result()) for task in done} == {image.manifest_digest}
    finally:
        os.kill(mirror.proc.pid, signal.SIGCONT)
    bodies = await asyncio.gather(*gets)  # the primary's share, once it runs again
    assert {sha256_digest(body) for body in bodies} == {image.manifest_digest}


async def test_cold_requests_on_every_connection_download_the_blob_once(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """The worker's share of the connections is handed to the primary, whose single
    download they all follow: with the primary stopped, none can be answered. About 300
    hand-offs queue up meanwhile, more than the Unix socket's buffer holds: the worker
    waits for room rather than refusing them."""
    image = await pushed(registry, "workers/cold")
    mirror, _ = await two_processes(start_mirror_process, registry, tmp_path)
    layer = image.layer_digests[0]

    os.kill(mirror.proc.pid, signal.SIGSTOP)
    try:
        url = f"{mirror.url}/v2/{image.name}/blobs/{layer}"
        gets = await get_on_new_connections(url, COLD_CONNECTIONS)
        done, _ = await asyncio.wait(gets, timeout=2)
        assert not done, "a worker answered a miss"
    finally:
        os.kill(mirror.proc.pid, signal.SIGCONT)
    bodies = await asyncio.gather(*gets)
    assert {sha256_digest(body) for body in bodies} == {layer}
    await registry.settle()
    assert registry.blob_gets(image.name) == 1
    answered = 'mirror_http_requests_total{method="GET",route="blob",status="200"}'
    assert await metric(mirror, answered) == COLD_CONNECTIONS  # by the primary, once each
    access_lines = [line for line in mirror.log().splitlines() if f"blobs/{layer} 200" in line]
    assert len(access_lines) == COLD_CONNECTIONS, access_lines


async def test_a_worker_that_dies_is_started_again_and_stops_with_the_primary(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    image = await pushed(registry, "workers/restart")
    mirror, first = await two_processes(start_mirror_process, registry, tmp_path)
    os.kill(first, signal.SIGKILL)
    second = await worker_pid(mirror, after=1)
    assert second != first
    assert f"worker 1 (pid {first}) exited with code -9" in mirror.log()
    manifest = f"{mirror.url}/v2/{image.name}/manifests/{image.manifest_digest}"
    bodies = await asyncio.gather(
        *await get_on_new_connections(manifest, headers={"Accept": OCI_MANIFEST})
    )
    assert {sha256_digest(body) for body in bodies} == {image.manifest_digest}

    mirror.stop()
    assert mirror.proc.returncode == 0, mirror.log()
    assert _gone(second)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.split(") ", 1)[1].startswith("Z")  # exited, not yet reaped by init


async def test_a_worker_never_serves_a_private_blob_through_a_public_upstream(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """The blob is marked private by the primary after the worker started: the worker
    must learn it from the index, not from what it read at its start."""
    private = RegistryProcess(tmp_path / "private-upstream")
    private.start()
    try:
        secret = await push_image(private.url, "team/app", "1", [8192])
        config = tmp_path / "mirror.yaml"
        config.write_text(
            f"storage: {{path: {tmp_path / 'cache'}}}\n"
            f"auth: {{htpasswd: {write_htpasswd(tmp_path / 'htpasswd')}}}\n"
            "workers: 2\n"
            "upstreams:\n"
            f"  - {{name: public, url: '{registry.url}', default: true}}\n"
            f"  - {{name: private, url: '{private.url}', prefix: private,"
            " access: authenticated}\n"
        )
        mirror = start_mirror_process("--config", str(config))
        await worker_pid(mirror, after=0)
        [layer] = secret.layer_digests
        alice = "Basic " + base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
        logged_in = {"Authorization": alice}
        private_url = f"{mirror.url}/v2/private/team/app/blobs/{layer}"
        await asyncio.gather(*await get_on_new_connections(private_url, 1, logged_in))

        public_url = f"{mirror.url}/v2/library/app/blobs/{layer}"
        await asyncio.gather(*await get_on_new_connections(public_url, status=404))
        bodies = await asyncio.gather(*await get_on_new_connections(private_url, 16, logged_in))
        assert {sha256_digest(body) for body in bodies} == {layer}
        await private.settle()
        assert private.blob_gets() == 1  # the worker's share were hits
    finally:
        private.stop()


async def test_a_second_mirror_on_a_taken_port_fails_to_start_and_says_why(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """SO_REUSEPORT would let it bind, and take half the connections, with another cache."""
    mirror, _ = await two_processes(start_mirror_process, registry, tmp_path)
    for workers in ("2", "1"):
        second = await asyncio.to_thread(
            subprocess.run,
            [_console_script(), "serve", "--listen", mirror.host, "--workers", workers,
             "--storage", str(tmp_path / "other"), "--upstream", registry.url],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert (
            f"mirror: config error: listen: cannot listen on {mirror.host}: Address already in use"
            in second.stderr
        )


async def test_workers_stop_when_the_primary_is_killed(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    mirror, worker = await two_processes(start_mirror_process, registry, tmp_path)
    mirror.proc.kill()
    deadline = time.monotonic() + 10
    while not _gone(worker):  # its hand-off socket closed
        assert time.monotonic() < deadline, "the worker outlived the primary"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("value", [0, "two", True])
def test_workers_must_be_a_whole_number(value: object) -> None:
    from mirror.config import config_from_dict
    from mirror.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^workers: must be a whole number >= 1"):
        config_from_dict({"workers": value})
