"""The disk budget: bytes on disk under storage.path, measured by walking the directory,
stay within max_size; LRU blobs go first, blobs in use and pinned images never.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from conftest import downloads_stored
from fake_upstream import FakeUpstream
from pytest_aiohttp import AiohttpClient
from upstream_registry import (
    FOREIGN_LAYERS_ALLOWED,
    OCI_INDEX,
    OCI_MANIFEST,
    PushedImage,
    RegistryProcess,
    push_image,
    push_index_with_foreign_digests,
)

from mirror.app import EVICTOR, make_app
from mirror.cli import main as cli
from mirror.reference import parse_image_reference

if TYPE_CHECKING:
    from conftest import MirrorClient, MirrorProcess

    MakeMirror = Callable[..., Awaitable[MirrorClient]]

KIB, MIB = 1024, 1024 * 1024
SLOW = (32 * KIB, 0.005)  # the upstream's pieces and pause: downloads overlap and last


def disk_bytes(root: Path) -> int:
    """Everything under the storage directory: blobs, temp files, the index and its WAL."""
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a temp file committed meanwhile
            if path.is_file():
                total += path.stat().st_size
    return total


def blob_path(root: Path, digest: str) -> Path:
    hex_digest = digest.split(":", 1)[1]
    return root / "blobs" / "sha256" / hex_digest[:2] / hex_digest


async def pull(mirror: MirrorClient, image: PushedImage) -> None:
    """The manifest by tag, then every blob it names, each checked against its digest."""
    headers = {"Accept": OCI_MANIFEST}
    async with mirror.get(f"/v2/{image.name}/manifests/{image.tag}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        manifest = json.loads(await resp.read())
    for entry in [manifest["config"], *manifest["layers"]]:
        async with mirror.get(f"/v2/{image.name}/blobs/{entry['digest']}") as resp:
            assert resp.status == 200
            body = await resp.read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == entry["digest"]
    await downloads_stored(mirror)


async def test_pulls_beyond_the_budget_keep_the_most_recent(
    registry: RegistryProcess, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    storage = tmp_path / "cache"
    images = [await push_image(registry.url, f"lru/i{n}", "v1", [700 * KIB]) for n in range(6)]
    budget = 3 * MIB
    mirror = await make_mirror(registry.url, storage=storage, budget={"max_size": budget})
    for image in images:
        await pull(mirror, image)
        assert disk_bytes(storage) <= budget
    # Room for about three layers next to the index: the last ones pulled are kept.
    kept = [blob_path(storage, i.layer_digests[0]).exists() for i in images]
    assert kept[-2:] == [True, True]
    assert kept[0] is False
    registry.reset_counts()
    await pull(mirror, images[0])  # evicted: fetched again, whole and correct
    await registry.settle()
    assert registry.blob_gets("lru/i0") >= 1
    assert disk_bytes(storage) <= budget


async def test_a_pass_with_nothing_to_evict_leaves_the_index_alone(
    registry: RegistryProcess,
    make_mirror: MakeMirror,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass follows every download, holding the budget's lock that the next download's
    reservation waits for: under the high watermark and with nothing past max_age, it
    neither flushes the accesses nor walks the index."""
    image = await push_image(registry.url, "quiet/app", "v1", [KIB])
    mirror = await make_mirror(registry.url, storage=tmp_path / "cache", budget={"max_age": 3600})
    async with mirror.get(f"/v2/quiet/app/blobs/{image.layer_digests[0]}") as resp:
        assert resp.status == 200
        await resp.read()
    await downloads_stored(mirror)
    assert mirror.app is not None
    evictor = mirror.app[EVICTOR]

    async def walked(*args: object) -> None:
        raise AssertionError("the index was walked")

    monkeypatch.setattr(evictor.index, "flush", walked)
    monkeypatch.setattr(evictor.index, "lru", walked)
    evicted = await evictor.run_pass()
    assert (evicted.blobs, evicted.failure) == (0, None)


async def test_an_evicted_manifest_is_not_served_from_memory(
    registry: RegistryProcess, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    image = await push_image(registry.url, "mem/app", "v1", [KIB])
    mirror = await make_mirror(registry.url, storage=tmp_path / "cache", budget={"max_age": 1.0})
    path = f"/v2/mem/app/manifests/{image.manifest_digest}"

    async def get() -> str:
        async with mirror.get(path, headers={"Accept": OCI_MANIFEST}) as resp:
            assert await resp.read() == image.manifest_bytes
            return resp.headers["Docker-Content-Digest"]

    assert await get() == image.manifest_digest
    registry.reset_counts()
    await get()  # a hit, from memory
    await registry.settle()
    assert registry.count("GET", "/manifests/") == 0

    await asyncio.sleep(1.1)
    assert mirror.app is not None
    assert (await mirror.app[EVICTOR].run_pass()).blobs == 1
    assert not blob_path(tmp_path / "cache", image.manifest_digest).exists()
    await get()  # evicted: fetched again, and cached again
    await registry.settle()
    assert registry.count("GET", "/manifests/") == 1
    assert blob_path(tmp_path / "cache", image.manifest_digest).exists()


async def test_a_blob_streaming_to_a_slow_client_is_not_evicted(
    registry: RegistryProcess, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    storage = tmp_path / "cache"
    big = await push_image(registry.url, "slow/big", "v1", [8 * MIB])
    others = [await push_image(registry.url, f"slow/o{n}", "v1", [4 * MIB]) for n in range(2)]
    budget = 14 * MIB
    mirror = await make_mirror(registry.url, storage=storage, budget={"max_size": budget})
    await pull(mirror, big)
    layer = big.layer_digests[0]

    # A client that reads a little, then stalls: tiny socket buffers, so the mirror is
    # still sending (sendfile) while the other pulls need room.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", mirror.server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(f"GET /v2/slow/big/blobs/{layer} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await reader.readexactly(64 * KIB)

    for image in others:  # the big blob is now least recently used, but in use
        await pull(mirror, image)
        assert disk_bytes(storage) <= budget
    assert blob_path(storage, layer).exists()

    rest = await reader.readexactly(8 * MIB - 64 * KIB)
    writer.close()
    assert len(rest) == 8 * MIB - 64 * KIB
    body_hash = hashlib.sha256()
    # Re-read what was sent: the first 64 KiB went by above, so check the whole by GET.
    async with mirror.get(f"/v2/slow/big/blobs/{layer}") as resp:
        body = await resp.read()
    body_hash.update(body)
    assert "sha256:" + body_hash.hexdigest() == layer
    assert body[64 * KIB :] == rest


async def test_concurrent_cold_downloads_hold_the_budget_at_every_moment(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = tmp_path / "cache"
    datas = [os.urandom(512 * KIB) for _ in range(16)]
    blobs = {fake_upstream.blobs.put(d): d for d in datas}
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = SLOW
    budget = 4 * MIB  # half of what the 16 downloads bring
    mirror = await make_mirror(fake_upstream.url, storage=storage, budget={"max_size": budget})
    samples: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(await asyncio.to_thread(disk_bytes, storage))
            await asyncio.sleep(0.005)

    async def get(digest: str) -> bytes:
        async with mirror.get(f"/v2/x/blobs/{digest}") as resp:
            assert resp.status == 200
            return await resp.read()

    sampler = asyncio.create_task(sample())
    bodies = await asyncio.gather(*(get(d) for d in blobs))
    done.set()
    await sampler
    assert bodies == list(blobs.values())
    assert len(samples) > 10
    assert max(samples) <= budget, max(samples)
    assert "served without caching" in caplog.text  # some had no room, and still arrived


async def test_pinned_images_survive_pressure_and_max_age_evicts_the_old(
    registry: RegistryProcess, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    from conftest import mirror_config

    storage = tmp_path / "cache"
    pinned = await push_image(registry.url, "pin/me", "v1", [600 * KIB])
    others = [await push_image(registry.url, f"pin/o{n}", "v1", [600 * KIB]) for n in range(5)]
    config = dataclasses.replace(
        mirror_config(storage, registry.url, budget={"max_size": 3 * MIB}),
        pins=(parse_image_reference(f"{registry.host}/pin/me:v1"),),
    )
    mirror = await aiohttp_client(make_app(config))
    await pull(mirror, pinned)
    for image in others:
        await pull(mirror, image)
    assert disk_bytes(storage) <= 3 * MIB
    for digest in [pinned.manifest_digest, *pinned.blob_digests()]:
        assert blob_path(storage, digest).exists(), digest
    assert not blob_path(storage, others[0].layer_digests[0]).exists()
    await mirror.close()

    # max_age: `mirror gc` on the same storage evicts what went unused too long, pins aside.
    config_file = tmp_path / "mirror.yaml"
    config_file.write_text(
        f"storage: {{path: {storage}, max_size: 3MiB, max_age: 1s}}\n"
        f"upstreams: [{{name: upstream, url: '{registry.url}'}}]\n"
        f"pins: ['{registry.host}/pin/me:v1']\n"
    )
    await asyncio.sleep(1.1)
    assert await asyncio.to_thread(cli, ["gc", "--config", str(config_file)]) == 0
    left = {p.name for p in (storage / "blobs").rglob("*") if p.is_file()}
    expected = {d.split(":")[1] for d in [pinned.manifest_digest, *pinned.blob_digests()]}
    assert left == expected


async def pull_index(mirror: MirrorClient, index: PushedImage) -> None:
    """The index by tag, its images by digest, and their blobs but the foreign layers."""
    accept = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
    async with mirror.get(f"/v2/{index.name}/manifests/{index.tag}", headers=accept) as resp:
        assert resp.status == 200, await resp.text()
    for child in index.children:
        path = f"/v2/{index.name}/manifests/{child.manifest_digest}"
        async with mirror.get(path, headers=accept) as resp:
            assert await resp.read() == child.manifest_bytes
        for digest in child.blob_digests():
            async with mirror.get(f"/v2/{index.name}/blobs/{digest}") as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
    await downloads_stored(mirror)


async def test_a_pinned_image_naming_sha384_and_md5_digests_breaks_no_eviction(
    aiohttp_client: AiohttpClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Manifests may name digests of algorithms the mirror never stores: the pins walk
    skips them (logged once), and eviction keeps making room for cold blobs."""
    from conftest import mirror_config

    caplog.set_level(logging.WARNING)
    storage = tmp_path / "cache"
    with RegistryProcess(tmp_path / "upstream", extra_config=FOREIGN_LAYERS_ALLOWED) as registry:
        pinned = await push_index_with_foreign_digests(registry.url, "odd/pin", "v1")
        others = [await push_image(registry.url, f"odd/o{n}", "v1", [600 * KIB]) for n in range(5)]
        config = dataclasses.replace(
            mirror_config(storage, registry.url, budget={"max_size": 3 * MIB}),
            pins=(parse_image_reference(f"{registry.host}/odd/pin:v1"),),
        )
        mirror = await aiohttp_client(make_app(config))
        await pull_index(mirror, pinned)
        for image in others:  # cold blobs, each needing room: all served
            await pull(mirror, image)
        await mirror.close()
    assert disk_bytes(storage) <= 3 * MIB
    for digest in [*pinned.manifest_digests(), *pinned.blob_digests()]:
        assert blob_path(storage, digest).exists(), digest
    assert not blob_path(storage, others[0].layer_digests[0]).exists()  # evicted
    for algorithm in ("sha384", "md5"):
        assert caplog.text.count(f"names '{algorithm}:") == 1, caplog.text
    assert "eviction pass failed" not in caplog.text


async def test_a_failing_eviction_pass_is_logged_once_and_fails_no_request(
    registry: RegistryProcess,
    make_mirror: MakeMirror,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    storage = tmp_path / "cache"
    images = [await push_image(registry.url, f"fail/i{n}", "v1", [600 * KIB]) for n in range(5)]
    budget = 3 * MIB
    mirror = await make_mirror(registry.url, storage=storage, budget={"max_size": budget})
    await pull(mirror, images[0])
    # A directory where the least recently used layer was: removing it fails (EISDIR), as
    # a disk error would, in every pass that reaches it.
    stuck = blob_path(storage, images[0].layer_digests[0])
    stuck.unlink()
    stuck.mkdir()
    for image in images[1:]:
        await pull(mirror, image)  # every blob whole (served uncached when no room)
        assert disk_bytes(storage) <= budget
    assert caplog.text.count("eviction pass failed") == 1
    assert "IsADirectoryError" in caplog.text
    assert "served without caching" in caplog.text

    stuck.rmdir()
    assert mirror.app is not None
    assert (await mirror.app[EVICTOR].run_pass(force=True)).failure is None
    assert caplog.text.count("eviction passes work again") == 1
    await pull(mirror, images[0])
    assert blob_path(storage, images[0].layer_digests[0]).is_file()  # cached again


async def test_a_blob_larger_than_the_budget_passes_through_uncached(
    registry: RegistryProcess,
    make_mirror: MakeMirror,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    storage = tmp_path / "cache"
    image = await push_image(registry.url, "huge/one", "v1", [3 * MIB])
    mirror = await make_mirror(registry.url, storage=storage, budget={"max_size": 2 * MIB})
    for _ in range(2):
        await pull(mirror, image)  # streamed, complete and verified, both times
    assert not blob_path(storage, image.layer_digests[0]).exists()
    assert caplog.text.count("served without caching") == 2
    assert disk_bytes(storage) <= 2 * MIB


def index_state(storage: Path) -> tuple[dict[str, int], tuple[int, int]]:
    """The index's rows (digest: size) and its totals, read straight from SQLite."""
    with sqlite3.connect(storage / "index.db") as db:
        rows = dict(db.execute("SELECT digest, size FROM blobs").fetchall())
        totals = db.execute("SELECT bytes, blobs FROM totals").fetchone()
    return rows, totals


def files_state(storage: Path) -> dict[str, int]:
    return {
        f"sha256:{p.name}": p.stat().st_size for p in (storage / "blobs").rglob("*") if p.is_file()
    }


async def test_kill_9_mid_download_then_restart(
    fake_upstream: FakeUpstream,
    start_mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    storage = tmp_path / "cache"
    data = os.urandom(4 * MIB)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = SLOW
    args = ("--storage", str(storage), "--upstream", fake_upstream.url)
    first = await asyncio.to_thread(start_mirror_process, *args)

    async def get(base: str) -> bytes:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/v2/x/blobs/{digest}") as resp,
        ):
            return await resp.read()

    pending = asyncio.create_task(get(first.url))
    deadline = time.monotonic() + 10
    while sum(p.stat().st_size for p in (storage / "tmp").glob("*")) < 512 * KIB:
        assert time.monotonic() < deadline, "the download never got going"
        await asyncio.sleep(0.01)
    first.proc.kill()  # SIGKILL, mid-download
    await asyncio.to_thread(first.proc.wait)
    with pytest.raises(aiohttp.ClientError):
        await pending  # the client was cut short, not handed a short body as complete
    assert not blob_path(storage, digest).exists()

    second = await asyncio.to_thread(start_mirror_process, *args)
    assert list((storage / "tmp").iterdir()) == []  # the half download is gone
    rows, totals = index_state(storage)
    assert rows == files_state(storage) == {}
    assert totals == (0, 0)

    assert await get(second.url) == data
    await asyncio.sleep(0.1)  # the index row is written just after the last byte
    rows, totals = index_state(storage)
    assert rows == files_state(storage) == {digest: len(data)}
    assert totals == (len(data), 1)


async def test_pass_through_keeps_memory_bounded_for_slow_and_departing_readers(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """No room in the budget: readers share a bounded window; the download waits for the
    slowest; one that leaves does not hold the others back."""
    data = os.urandom(12 * MIB)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = SLOW
    storage = tmp_path / "cache"
    mirror = await make_mirror(fake_upstream.url, storage=storage, budget={"max_size": 2 * MIB})

    async def read(pause: float, leave_after: int | None = None) -> tuple[str, int]:
        """The digest of what arrived, and how much; nothing kept, to measure the mirror."""
        hasher, received = hashlib.sha256(), 0
        async with mirror.get(f"/v2/x/blobs/{digest}") as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(256 * KIB):
                hasher.update(chunk)
                received += len(chunk)
                if leave_after is not None and received >= leave_after:
                    break
                await asyncio.sleep(pause)
        return "sha256:" + hasher.hexdigest(), received

    tracemalloc.start()
    try:
        fast, slow, leaver = await asyncio.gather(read(0), read(0.02), read(0, 1 * MIB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fast == slow == (digest, len(data))
    assert MIB <= leaver[1] < len(data)
    assert not blob_path(storage, digest).exists()
    # Bounded by the window (4 MiB) and socket buffers, not by the 12 MiB blob.
    assert peak < 10 * MIB, peak
