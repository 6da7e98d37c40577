"""Fleet mode, part 2: each blob and each counted manifest GET leaves the upstream once per
fleet, however many replicas are asked at the same moment. Real `mirror serve` replicas
sharing PostgreSQL and a bucket (moto), over the fake upstream where it must be slow or
count what it is asked, and over a real docker-registry for skopeo."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from engines import Postgres, S3Endpoint
from fake_upstream import OCI_MANIFEST, FakeUpstream, manifest_bytes
from fleet import Fleet, expected, metric, shared_block, wait_until
from upstream_registry import RegistryProcess, dir_digests, push_image, skopeo_copy_async

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

MIB = 1024 * 1024
SECRET = "fleet-secret-for-tests"


@pytest.fixture
def fleet(
    start_mirror_process: StartMirrorProcess,
    moto_s3: S3Endpoint,
    s3_bucket_name: str,
    database_url: str,
    aws_credentials: Callable[[S3Endpoint], None],
    tmp_path: Path,
) -> Iterator[Callable[[str], Fleet]]:
    """`fleet(upstream_url)`: replicas sharing one bucket and database, with the secret."""
    aws_credentials(moto_s3)
    shared = shared_block(moto_s3, s3_bucket_name, database_url)
    shared.update(peer_secret=SECRET, lease_ttl="3s")
    yield lambda upstream: Fleet(start_mirror_process, tmp_path, upstream, shared)


class Pull:
    """One client's GET of a blob: when its first body byte came, and what it got."""

    def __init__(self) -> None:
        self.first_byte_at: float | None = None
        self.digest: str | None = None
        self.error: str | None = None

    async def run(self, session: aiohttp.ClientSession, url: str) -> None:
        hashed = hashlib.sha256()
        try:
            async with session.get(url) as resp:
                resp.raise_for_status()
                async for chunk in resp.content.iter_chunked(1024 * 1024):
                    if self.first_byte_at is None:
                        self.first_byte_at = time.monotonic()
                    hashed.update(chunk)
            self.digest = "sha256:" + hashed.hexdigest()
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"


async def pull_all(urls: list[str]) -> list[Pull]:
    pulls = [Pull() for _ in urls]
    timeout = aiohttp.ClientTimeout(total=120, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(p.run(session, url) for p, url in zip(pulls, urls, strict=True)))
    return pulls


async def test_one_cold_blob_asked_of_three_replicas_at_once_leaves_the_upstream_once(
    fleet: Callable[[str], Fleet], fake_upstream: FakeUpstream
) -> None:
    """24 clients, 8 through each replica, on a 64 MiB blob the upstream sends slowly:
    one upstream GET, 24 whole bodies, and every client's first byte before the upstream
    has sent its last (the other replicas stream from the one fetching)."""
    blob = os.urandom(64 * MIB)
    digest = fake_upstream.blobs.put(blob)
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = MIB, 0.05  # about 3 s in all
    replicas = fleet(fake_upstream.url)
    three = [await replicas.add() for _ in range(3)]
    urls = [f"{r.url}/v2/team/app/blobs/{digest}" for r in three for _ in range(8)]

    pulls = await pull_all(urls)

    assert [p.error for p in pulls] == [None] * 24
    assert {p.digest for p in pulls} == {digest}
    assert fake_upstream.count("GET", f"/blobs/{digest}") == 1
    last_piece_at = fake_upstream.blobs.last_piece_at
    assert last_piece_at is not None
    assert all(p.first_byte_at is not None and p.first_byte_at < last_piece_at for p in pulls)
    peers = sum(metric(r, "mirror_peer_requests_total", result="served") for r in three)
    assert peers >= 1  # the others followed the one fetching


async def test_the_holder_killed_mid_download_the_others_finish_from_another_source(
    fleet: Callable[[str], Fleet], fake_upstream: FakeUpstream
) -> None:
    """The replica fetching for the fleet is SIGKILLed halfway: the other replicas'
    clients get the exact blob, or a cut that a retry repairs; at most 2 upstream GETs."""
    blob = os.urandom(16 * MIB)
    digest = fake_upstream.blobs.put(blob)
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = 256 * 1024, 0.05  # about 3 s
    replicas = fleet(fake_upstream.url)
    holder = await replicas.add()
    others = [await replicas.add() for _ in range(2)]
    urls = [f"{r.url}/v2/team/app/blobs/{digest}" for r in others for _ in range(3)]
    first = asyncio.create_task(pull_all([f"{holder.url}/v2/team/app/blobs/{digest}"]))
    await asyncio.wait_for(fake_upstream.blobs.requested.wait(), 10)
    await asyncio.sleep(0.3)  # the holder's lease is taken: the others will follow it
    followers = asyncio.create_task(pull_all(urls))
    await asyncio.sleep(1.0)
    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait(timeout=10)
    await first  # cut, with the holder gone

    for pull in await followers:
        assert pull.digest in (digest, None), "a wrong body, never"
    retried = await pull_all(urls)
    assert {p.digest for p in retried} == {digest}
    assert fake_upstream.count("GET", f"/blobs/{digest}") <= 2


async def test_peer_requests_need_the_fleet_secret(
    fleet: Callable[[str], Fleet], fake_upstream: FakeUpstream
) -> None:
    digest = fake_upstream.blobs.put(os.urandom(1024))
    replica = await fleet(fake_upstream.url).add()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{replica.url}/v2/team/app/blobs/{digest}") as resp:
            assert resp.status == 200
        peer = f"{replica.url}/_mirror/peer/blobs/{digest}"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with session.get(peer, headers=headers) as resp:
                assert resp.status == 401
        async with session.get(peer, headers={"Authorization": f"Bearer {SECRET}"}) as resp:
            assert resp.status == 200 and await resp.read() == fake_upstream.blobs.data[digest]
        # The public API has no way to the peer route: not a repository name (400).
        async with session.get(f"{replica.url}/v2/_mirror/peer/blobs/{digest}") as resp:
            assert resp.status == 400


async def test_skopeo_through_three_replicas_at_once_fetches_each_layer_once(
    fleet: Callable[[str], Fleet], registry: RegistryProcess, tmp_path: Path
) -> None:
    image = await push_image(registry.url, "fleet/five", "v1", [300 * 1024] * 5)
    replicas = fleet(registry.url)
    three = [await replicas.add() for _ in range(3)]
    await registry.settle()
    registry.reset_counts()
    await asyncio.gather(
        *(
            skopeo_copy_async(f"{r.host}/{image.reference}", tmp_path / f"r{n}")
            for n, r in enumerate(three)
        )
    )
    for n in range(3):
        assert dir_digests(tmp_path / f"r{n}") == expected(image)
    await registry.settle()
    assert registry.blob_gets(image.name) == len(image.blob_digests())
    await wait_until(lambda: True, "settled")


async def get_manifests(urls: list[str]) -> list[tuple[int, bytes]]:
    headers = {"Accept": OCI_MANIFEST}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(url: str) -> tuple[int, bytes]:
            async with session.get(url, headers=headers) as resp:
                return resp.status, await resp.read()

        return await asyncio.gather(*(one(url) for url in urls))


async def test_a_tag_is_fetched_and_revalidated_once_per_fleet(
    fleet: Callable[[str], Fleet], fake_upstream: FakeUpstream
) -> None:
    """Docker Hub's quota counts manifest GETs: a cold tag asked of three replicas at once
    costs one GET in all, and once its tag_ttl has passed, one HEAD in all."""
    fake_upstream.quota.remaining = 100  # quota headers on every manifest answer
    body = manifest_bytes(b"config of the fleet's tag")
    fake_upstream.manifests.put("team/app", "v1", body)
    replicas = fleet(fake_upstream.url)
    replicas.settings["upstreams"][0]["tag_ttl"] = "2s"
    three = [await replicas.add() for _ in range(3)]
    urls = [f"{r.url}/v2/team/app/manifests/v1" for r in three for _ in range(4)]

    assert await get_manifests(urls) == [(200, body)] * 12
    assert fake_upstream.count("GET", "/manifests/") == 1
    heads = fake_upstream.count("HEAD", "/manifests/")
    assert heads <= 1  # a HEAD and a GET by digest, or one GET by tag
    assert fake_upstream.quota.remaining == 99

    await asyncio.sleep(2.5)  # past tag_ttl everywhere: each replica would revalidate
    assert await get_manifests(urls) == [(200, body)] * 12
    assert fake_upstream.count("GET", "/manifests/") == 1
    assert fake_upstream.count("HEAD", "/manifests/") == heads + 1


async def test_the_pull_quota_reserve_holds_for_the_fleet(
    fleet: Callable[[str], Fleet], fake_upstream: FakeUpstream
) -> None:
    """Docker Hub counts pulls per address: once one replica has seen the quota at the
    reserve, another that never asked Hub itself spends no pull either."""
    fake_upstream.quota.remaining = 7
    for tag in ("a", "b", "c"):
        fake_upstream.manifests.put("team/app", tag, manifest_bytes(tag.encode()))
    replicas = fleet(fake_upstream.url)
    replicas.settings["upstreams"][0]["ratelimit_reserve"] = 5
    first, second = [await replicas.add() for _ in range(2)]
    base = "/v2/team/app/manifests/"
    assert [s for s, _ in await get_manifests([first.url + base + "a"])] == [200]  # 6 left
    assert [s for s, _ in await get_manifests([first.url + base + "b"])] == [200]  # 5: reserve
    spent = fake_upstream.count("GET", "/manifests/")

    answers = await get_manifests([second.url + base + "c"])
    assert [status for status, _ in answers] == [429]
    assert fake_upstream.count("GET", "/manifests/") == spent  # not a pull more
    assert fake_upstream.quota.remaining == 5


async def test_postgresql_restarted_mid_run_costs_no_client_more_than_a_retry(
    fleet: Callable[[str], Fleet], fake_upstream: FakeUpstream, postgres: Postgres
) -> None:
    """Pulls through three replicas while PostgreSQL stops and starts again: every client
    gets its blob exactly, at worst on its one retry."""
    digests = [fake_upstream.blobs.put(os.urandom(512 * 1024)) for _ in range(18)]
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = 64 * 1024, 0.02  # 0.16 s each
    replicas = fleet(fake_upstream.url)
    three = [await replicas.add() for _ in range(3)]

    async def pull_with_a_retry(n: int, digest: str) -> Pull:
        await asyncio.sleep(0.15 * n)  # a stream of pulls, across the restart
        urls = [f"{r.url}/v2/team/app/blobs/{digest}" for r in three]  # each replica
        pulls = await pull_all(urls)
        if any(p.digest != digest for p in pulls):
            pulls = await pull_all(urls)
        return next((p for p in pulls if p.digest != digest), pulls[0])

    async def restart() -> None:
        await asyncio.sleep(0.6)
        await asyncio.to_thread(postgres.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(postgres.start)

    try:
        results, _ = await asyncio.gather(
            asyncio.gather(*(pull_with_a_retry(n, d) for n, d in enumerate(digests))),
            restart(),
        )
    finally:
        if not postgres.running:
            postgres.start()
    assert [p.digest for p in results] == digests, [p.error for p in results]


async def test_a_replica_with_another_secret_is_refused_and_fetches_alone(
    fleet: Callable[[str], Fleet], fake_upstream: FakeUpstream
) -> None:
    digest = fake_upstream.blobs.put(os.urandom(4 * MIB))
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = 256 * 1024, 0.1  # about 1.6 s
    replicas = fleet(fake_upstream.url)
    holder = await replicas.add()
    replicas.shared["peer_secret"] = "another-secret"
    stranger = await replicas.add()
    first = asyncio.create_task(pull_all([f"{holder.url}/v2/team/app/blobs/{digest}"]))
    await asyncio.wait_for(fake_upstream.blobs.requested.wait(), 10)
    await asyncio.sleep(0.3)  # the holder has the lease
    started = time.monotonic()
    [alone] = await pull_all([f"{stranger.url}/v2/team/app/blobs/{digest}"])
    [held] = await first
    assert alone.digest == held.digest == digest
    assert alone.first_byte_at is not None and alone.first_byte_at - started < 3.0
    assert fake_upstream.count("GET", f"/blobs/{digest}") == 2  # each its own
    assert metric(holder, "mirror_peer_requests_total", result="refused") >= 1
    assert "refused the fleet's secret" in stranger.log()
