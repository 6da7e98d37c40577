"""mirror/shared/eviction.py against a real PostgreSQL (a database per test) and moto's S3
server (a bucket per test)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import aiohttp
import pytest
from engines import S3Endpoint, s3_client
from moto_ecr import apply_aws_env

from mirror.metrics import Metrics
from mirror.reference import Digest, digest_of
from mirror.shared.bucket import Bucket
from mirror.shared.database import SharedIndex
from mirror.shared.eviction import SharedEvicted, SharedEvictor

LAYER = "application/vnd.oci.image.layer.v1.tar"
SIZE = 100  # bytes of every blob here
TTL = 1.0  # presign_ttl: the shortest a presigned URL lasts
QUICK_TTL = 0.1  # where no URL is handed out
INTERVAL = 0.05  # between two tries of a background evictor
WAIT = 10.0  # the longest any step may take
TIMEOUT = 2.0  # of the index's calls


@pytest.fixture
async def bucket(
    moto_s3: S3Endpoint, s3_bucket_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[Bucket]:
    apply_aws_env(monkeypatch, moto_s3.url, tmp_path, region=moto_s3.region)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.secret_key)
    store = Bucket(s3_bucket_name, prefix="fleet", endpoint_url=moto_s3.url)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def index(database_url: str) -> AsyncIterator[SharedIndex]:
    shared = SharedIndex(database_url, timeout=TIMEOUT)
    await shared.open()
    yield shared
    await shared.close()


def pins(digests: Iterable[Digest] = ()) -> Callable[[], Awaitable[set[str]]]:
    pinned = {str(digest) for digest in digests}

    async def pinned_now() -> set[str]:
        return pinned

    return pinned_now


def evictor(
    index: SharedIndex,
    bucket: Bucket,
    *,
    max_size: int,
    presign_ttl: float = QUICK_TTL,
    pinned: Iterable[Digest] = (),
) -> SharedEvictor:
    return SharedEvictor(
        index, bucket, max_size, presign_ttl, pins(pinned), Metrics(), interval=INTERVAL
    )


async def fill(index: SharedIndex, bucket: Bucket, count: int, first: int = 0) -> list[Digest]:
    """`count` blobs in the bucket and the index, least recently used first."""
    later = time.time() + 100  # past every add_blob's own time
    digests = []
    for n in range(first, first + count):
        digest = digest_of(n.to_bytes(SIZE, "big"))
        await bucket.put_bytes(digest, n.to_bytes(SIZE, "big"), LAYER)
        await index.add_blob(str(digest), SIZE, None, False)
        await index.touch({str(digest): later + n})
        digests.append(digest)
    return digests


async def visible(index: SharedIndex, digests: Iterable[Digest]) -> list[Digest]:
    return [digest for digest in digests if await index.blob(str(digest), "public") is not None]


async def kept(bucket: Bucket, digests: Iterable[Digest]) -> list[Digest]:
    return [digest for digest in digests if await bucket.head(digest) is not None]


async def some_hidden(index: SharedIndex, digests: list[Digest]) -> bool:
    return len(await visible(index, digests)) < len(digests)


def sample(evicting: SharedEvictor, name: str) -> float | None:
    return evicting.metrics.registry.get_sample_value(name)


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll `condition`, for WAIT seconds at most."""
    deadline = time.monotonic() + WAIT
    while not await condition():
        assert time.monotonic() < deadline, f"still not so after {WAIT} s"
        await asyncio.sleep(INTERVAL / 2)


@contextlib.asynccontextmanager
async def running(*evictors: SharedEvictor) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(each.run()) for each in evictors]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*tasks, return_exceptions=True)


def failures_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "eviction failed" in r.getMessage()]


# --------------------------------------------------------------------------- marking


async def test_over_the_budget_the_least_recently_used_are_marked_but_never_pins(
    index: SharedIndex, bucket: Bucket
) -> None:
    blobs = await fill(index, bucket, 5)  # 500 bytes over a high watermark of 360
    evicting = evictor(index, bucket, max_size=4 * SIZE, pinned=[blobs[0]])

    evicted = await evicting.run_pass()

    # Down to the low watermark (320): the oldest but for the pinned one.
    assert evicted == SharedEvicted(marked=2, deleted=0, bytes=0, used=3 * SIZE)
    assert await visible(index, blobs) == [blobs[0], blobs[3], blobs[4]]
    assert await kept(bucket, blobs) == blobs
    assert sample(evicting, "mirror_shared_size_bytes") == 3 * SIZE
    assert sample(evicting, "mirror_shared_max_bytes") == 4 * SIZE
    assert sample(evicting, "mirror_shared_evictions_total") == 0


async def test_under_the_high_watermark_nothing_is_marked(
    index: SharedIndex, bucket: Bucket
) -> None:
    blobs = await fill(index, bucket, 5)  # 500 bytes, the high watermark at 504
    evicting = evictor(index, bucket, max_size=560)

    assert await evicting.run_pass() == SharedEvicted(0, 0, 0, 5 * SIZE)
    assert await visible(index, blobs) == blobs
    assert sample(evicting, "mirror_shared_size_bytes") == 5 * SIZE


async def test_pinned_content_stays_even_over_the_budget(
    index: SharedIndex, bucket: Bucket
) -> None:
    blobs = await fill(index, bucket, 3)
    evicting = evictor(index, bucket, max_size=SIZE, pinned=blobs[1:])

    assert await evicting.run_pass() == SharedEvicted(1, 0, 0, 2 * SIZE)
    assert await visible(index, blobs) == blobs[1:]


# --------------------------------------------------------------------------- deletion


async def test_objects_are_deleted_only_once_marked_longer_than_a_presigned_url_lasts(
    index: SharedIndex, bucket: Bucket
) -> None:
    blobs = await fill(index, bucket, 5)
    evicting = evictor(index, bucket, max_size=4 * SIZE, presign_ttl=TTL)
    url = await bucket.presigned_get(blobs[0], TTL)  # handed out just before the mark

    assert (await evicting.run_pass()).marked == 2
    marked_at = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        assert response.status == 200
        assert await response.read() == (0).to_bytes(SIZE, "big")
    assert await evicting.run_pass() == SharedEvicted(0, 0, 0, 3 * SIZE)
    assert time.monotonic() - marked_at < TTL  # so that pass was within the URL's life
    assert await kept(bucket, blobs) == blobs

    await asyncio.sleep(TTL)

    assert await evicting.run_pass() == SharedEvicted(0, 2, 2 * SIZE, 3 * SIZE)
    assert await kept(bucket, blobs) == blobs[2:]
    assert await index.marked_before(time.time() + 1, 10) == []
    assert (await index.usage()).bytes == 3 * SIZE
    assert sample(evicting, "mirror_shared_evictions_total") == 2
    assert sample(evicting, "mirror_shared_evicted_bytes_total") == 2 * SIZE


async def test_a_marked_blob_uploaded_again_keeps_its_object(
    index: SharedIndex, bucket: Bucket
) -> None:
    blobs = await fill(index, bucket, 5)
    evicting = evictor(index, bucket, max_size=4 * SIZE)
    assert (await evicting.run_pass()).marked == 2

    # What a replica does after a miss on the hidden row: upload (the key is taken), add;
    # and then it serves the blob.
    assert await bucket.put_bytes(blobs[1], (1).to_bytes(SIZE, "big"), LAYER) is False
    await index.add_blob(str(blobs[1]), SIZE, None, False)
    await index.touch({str(blobs[1]): time.time() + 1000})
    await asyncio.sleep(QUICK_TTL)

    # Over the budget again: the next least recently used goes instead.
    assert await evicting.run_pass() == SharedEvicted(1, 1, SIZE, 3 * SIZE)
    assert await kept(bucket, blobs) == blobs[1:]
    assert await visible(index, blobs) == [blobs[1], blobs[3], blobs[4]]


# --------------------------------------------------------------------------- leader


async def test_one_of_two_replicas_leads_and_evicts_then_the_other_when_it_is_gone(
    database_url: str, index: SharedIndex, bucket: Bucket
) -> None:
    other_index = SharedIndex(database_url, timeout=TIMEOUT)
    await other_index.open()
    replicas = [
        evictor(index, bucket, max_size=4 * SIZE),
        evictor(other_index, bucket, max_size=4 * SIZE),
    ]
    blobs = await fill(index, bucket, 5)

    async def deleted(count: int) -> bool:
        return len(await kept(bucket, blobs)) == len(blobs) - count

    async def leader() -> SharedEvictor | None:
        leading = [each for each in replicas if sample(each, "mirror_shared_leader") == 1]
        assert len(leading) <= 1
        return leading[0] if leading else None

    try:
        async with running(*replicas):
            await until(lambda: deleted(2))
            first = await leader()
            assert first is not None
            second = replicas[1] if first is replicas[0] else replicas[0]
            assert sample(first, "mirror_shared_evictions_total") == 2
            assert sample(second, "mirror_shared_evictions_total") == 0
            assert sample(second, "mirror_shared_leader") == 0

            await first.index.close()  # its connections end, the leader lock with them
            blobs += await fill(second.index, bucket, 2, first=len(blobs))

            await until(lambda: deleted(4))
            assert await leader() is second
            assert sample(second, "mirror_shared_evictions_total") == 2
            assert sample(first, "mirror_shared_evictions_total") == 2
    finally:
        await other_index.close()


async def test_a_replica_that_does_not_lead_does_nothing(
    database_url: str, index: SharedIndex, bucket: Bucket
) -> None:
    blobs = await fill(index, bucket, 5)
    assert await index.lead() is True  # another replica leads
    other_index = SharedIndex(database_url, timeout=TIMEOUT)
    await other_index.open()
    follower = evictor(other_index, bucket, max_size=SIZE)
    try:
        async with running(follower):
            await asyncio.sleep(5 * INTERVAL)
            assert await visible(index, blobs) == blobs
            assert sample(follower, "mirror_shared_leader") == 0
            assert sample(follower, "mirror_shared_size_bytes") == 0
            await index.resign()
            await until(lambda: some_hidden(index, blobs))
            assert sample(follower, "mirror_shared_leader") == 1
    finally:
        await other_index.close()


# --------------------------------------------------------------------------- failures


async def test_a_closed_index_fails_tries_logged_once_and_the_task_goes_on(
    index: SharedIndex, bucket: Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = await fill(index, bucket, 5)
    evicting = evictor(index, bucket, max_size=4 * SIZE)
    await index.close()
    caplog.set_level(logging.INFO, logger="mirror.shared.eviction")

    async with running(evicting) as (task,):
        await asyncio.sleep(10 * INTERVAL)
        assert not task.done()
        assert len(failures_logged(caplog)) == 1
        evicted = await evicting.run_pass()
        assert evicted.failure is not None and "closed" in evicted.failure
        assert len(failures_logged(caplog)) == 1

        await index.open()

        await until(lambda: some_hidden(index, blobs))
        assert sample(evicting, "mirror_shared_leader") == 1
    assert len(failures_logged(caplog)) == 1
    assert "shared eviction works again" in caplog.messages


async def test_a_missing_bucket_fails_the_deletion_and_keeps_the_rows(
    index: SharedIndex,
    bucket: Bucket,
    moto_s3: S3Endpoint,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blobs = await fill(index, bucket, 3)
    await index.mark([str(blob) for blob in blobs], time.time() - 100)
    client = s3_client(moto_s3)
    for blob in blobs:
        await bucket.delete(blob)
    client.delete_bucket(Bucket=bucket.name)
    evicting = evictor(index, bucket, max_size=4 * SIZE)

    for _ in range(2):
        evicted = await evicting.run_pass()
        assert evicted.failure is not None and "does not exist" in evicted.failure
    assert len(failures_logged(caplog)) == 1
    assert len(await index.marked_before(time.time(), 10)) == 3

    client.create_bucket(Bucket=bucket.name)

    assert await evicting.run_pass() == SharedEvicted(0, 3, 3 * SIZE, 0)
    assert await index.marked_before(time.time(), 10) == []
    assert "shared eviction works again" in caplog.messages
