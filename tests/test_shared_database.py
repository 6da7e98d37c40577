"""The shared index against a real PostgreSQL: a fresh database per test, one server for
the session (`postgres`, `database_url` from tests/engines.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from engines import Postgres

from mirror.shared.bucket import BucketUnavailable
from mirror.shared.database import (
    LEASE_CHANNEL,
    MIGRATIONS,
    DatabaseUnavailable,
    Lease,
    SharedBlob,
    SharedIndex,
    SharedQuota,
    SharedTag,
    SharedTagged,
    SharedUsage,
)

TIMEOUT = 2.0
# For tests that wait the timeout out.
SHORT = 0.5
# How far past the timeout a failing call may return (scheduling, a connect refused).
SLACK = 1.0
A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


@pytest.fixture
async def index(database_url: str) -> AsyncIterator[SharedIndex]:
    shared = SharedIndex(database_url, timeout=TIMEOUT)
    await shared.open()
    yield shared
    await shared.close()


@contextlib.asynccontextmanager
async def opened(dsn: str, bound: float = TIMEOUT) -> AsyncIterator[SharedIndex]:
    shared = SharedIndex(dsn, timeout=bound)
    await shared.open()
    try:
        yield shared
    finally:
        await shared.close()


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def with_port(dsn: str, port: int) -> str:
    """`dsn` pointed at another port on 127.0.0.1."""
    parts = urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------- schema


async def test_replicas_opening_together_migrate_once(database_url: str) -> None:
    replicas = [SharedIndex(database_url, timeout=TIMEOUT) for _ in range(4)]
    try:
        await asyncio.gather(*(replica.open() for replica in replicas))
        await replicas[0].add_blob(A, 10, None, False)
        assert await replicas[3].blob(A, "public") == SharedBlob(A, 10, None, False, None)
    finally:
        await asyncio.gather(*(replica.close() for replica in replicas))
    db = await asyncpg.connect(database_url, timeout=TIMEOUT)
    try:
        versions = await db.fetch("SELECT version FROM schema_version")
        assert [tuple(row) for row in versions] == [(len(MIGRATIONS),)]
    finally:
        await db.close()


async def test_reopening_keeps_the_rows(database_url: str) -> None:
    async with opened(database_url) as first:
        await first.add_blob(A, 10, MANIFEST, False)
    async with opened(database_url) as second:
        assert await second.blob(A, "public") == SharedBlob(A, 10, MANIFEST, False, None)


# --------------------------------------------------------------------------- blobs


async def test_blob_is_none_until_added(index: SharedIndex) -> None:
    assert await index.blob(A, "public") is None
    await index.add_blob(A, 1234, MANIFEST, False)
    assert await index.blob(A, "public") == SharedBlob(A, 1234, MANIFEST, False, None)
    assert await index.blob(A, "authenticated") == SharedBlob(A, 1234, MANIFEST, False, None)


async def test_a_private_blob_is_hidden_from_public_upstreams(index: SharedIndex) -> None:
    await index.add_blob(A, 5, None, True)
    assert await index.blob(A, "public") is None
    assert await index.blob(A, "authenticated") == SharedBlob(A, 5, None, True, None)


async def test_fetched_once_publicly_a_blob_is_public(index: SharedIndex) -> None:
    await index.add_blob(A, 5, None, True)
    await index.add_blob(A, 5, None, False)
    await index.add_blob(B, 5, None, False)
    await index.add_blob(B, 5, None, True)
    for blob in (A, B):
        assert await index.blob(blob, "public") == SharedBlob(blob, 5, None, False, None)


async def test_the_first_media_type_recorded_stays(index: SharedIndex) -> None:
    await index.add_blob(A, 5, None, False)
    await index.add_blob(A, 5, MANIFEST, False)
    await index.add_blob(A, 5, LIST, False)
    blob = await index.blob(A, "public")
    assert blob is not None and blob.media_type == MANIFEST


async def test_usage_counts_unmarked_blobs(index: SharedIndex) -> None:
    assert await index.usage() == SharedUsage(0, 0)
    await index.add_blob(A, 100, None, False)
    await index.add_blob(B, 20, None, True)
    await index.add_blob(C, 3, None, False)
    await index.add_blob(C, 3, None, False)  # counted once
    assert await index.usage() == SharedUsage(123, 3)
    await index.mark([B], time.time())
    assert await index.usage() == SharedUsage(103, 2)


async def test_touch_orders_least_recently_used(index: SharedIndex) -> None:
    later = time.time() + 100  # past every add_blob's own time
    for blob in (A, B, C):
        await index.add_blob(blob, 1, None, False)
    await index.touch({A: later + 20, C: later + 10})
    await index.touch({A: later})  # an older access never moves one back
    await index.touch({})
    await index.touch({digest(9): later})  # no row: nothing to record
    lru = await index.least_recently_used(10)
    assert [blob.digest for blob in lru] == [B, C, A]
    assert lru[0] == SharedBlob(B, 1, None, False, None)
    assert [blob.digest for blob in await index.least_recently_used(2)] == [B, C]
    assert [blob.digest for blob in await index.least_recently_used(10, {B, A})] == [C]
    assert await index.blob(digest(9), "authenticated") is None


async def test_replicas_writing_the_same_rows_do_not_deadlock(database_url: str) -> None:
    digests = [digest(n) for n in range(200)]
    async with (
        opened(database_url) as first,
        opened(database_url) as second,
        opened(database_url) as leader,
    ):
        for blob in digests:
            await first.add_blob(blob, 1, None, False)
        now = time.time()

        async def touches(replica: SharedIndex, order: list[str]) -> None:
            for round_ in range(20):
                # A dict's order is the order the caller met the digests in.
                await replica.touch({blob: now + round_ for blob in order})

        async def marks() -> None:
            for round_ in range(20):
                await leader.mark(digests[::-1], now + round_)

        await asyncio.gather(touches(first, digests), touches(second, digests[::-1]), marks())
        assert await first.usage() == SharedUsage(0, 0)
        marked = await leader.marked_before(now + 100, 1000)
    assert {blob.digest for blob in marked} == set(digests)


async def test_marked_blobs_are_hidden_until_added_again(index: SharedIndex) -> None:
    for blob in (A, B, C):
        await index.add_blob(blob, 1, None, False)
    await index.mark([A, B], 1000.0)
    await index.mark([A], 2000.0)  # the first mark stays: its wait does not start over
    await index.mark([], 3000.0)
    assert await index.blob(A, "authenticated") is None
    assert [blob.digest for blob in await index.least_recently_used(10)] == [C]
    assert await index.marked_before(1000.0, 10) == []
    assert await index.marked_before(1000.5, 10) == [
        SharedBlob(A, 1, None, False, 1000.0),
        SharedBlob(B, 1, None, False, 1000.0),
    ]
    assert await index.marked_before(1000.5, 1) == [SharedBlob(A, 1, None, False, 1000.0)]
    await index.add_blob(B, 1, None, False)  # uploaded again: wanted, no longer marked
    assert await index.blob(B, "public") == SharedBlob(B, 1, None, False, None)
    assert [blob.digest for blob in await index.marked_before(5000.0, 10)] == [A]


async def test_remove_forgets_blobs_but_not_tags(index: SharedIndex) -> None:
    await index.add_blob(A, 1, MANIFEST, False)
    await index.add_blob(B, 2, None, False)
    await index.set_tag("hub", "library/alpine", "latest", A, MANIFEST, 50.0)
    await index.mark([A], 10.0)
    await index.remove([A])
    await index.remove([])
    assert await index.marked_before(100.0, 10) == []
    assert await index.blob(A, "authenticated") is None
    assert await index.usage() == SharedUsage(2, 1)
    assert await index.tag("hub", "library/alpine", "latest") == SharedTag(A, MANIFEST, 50.0)


async def test_remove_marked_deletes_the_objects_of_rows_still_marked_then_the_rows(
    index: SharedIndex,
) -> None:
    for blob in (A, B, C):
        await index.add_blob(blob, 1, None, False)
    await index.mark([A, B], 10.0)
    await index.mark([C], 20.0)
    await index.add_blob(B, 1, None, False)  # uploaded again since: no longer marked
    deleted: list[list[str]] = []

    async def delete(digests: list[str]) -> None:
        deleted.append(digests)
        # To everyone else, the row stays until its object is gone.
        assert [blob.digest for blob in await index.marked_before(15.0, 10)] == [A]

    assert await index.remove_marked([A, B, C], 15.0, delete) == [A]
    assert await index.remove_marked([], 15.0, delete) == []
    assert deleted == [[A]]
    assert await index.marked_before(100.0, 10) == [SharedBlob(C, 1, None, False, 20.0)]
    assert await index.blob(B, "public") == SharedBlob(B, 1, None, False, None)


async def test_remove_marked_keeps_the_rows_when_deleting_fails(index: SharedIndex) -> None:
    await index.add_blob(A, 1, None, False)
    await index.mark([A], 10.0)

    async def delete(digests: list[str]) -> None:
        raise BucketUnavailable("no bucket")

    with pytest.raises(BucketUnavailable):
        await index.remove_marked([A], 15.0, delete)
    assert await index.marked_before(15.0, 10) == [SharedBlob(A, 1, None, False, 10.0)]


async def test_a_blob_added_while_its_object_is_deleted_waits_then_is_added_anew(
    database_url: str,
) -> None:
    async with opened(database_url) as leader, opened(database_url) as replica:
        await leader.add_blob(A, 1, None, False)
        await leader.mark([A], 10.0)
        deleting, deleted = asyncio.Event(), asyncio.Event()

        async def delete(digests: list[str]) -> None:
            deleting.set()
            await deleted.wait()

        removal = asyncio.create_task(leader.remove_marked([A], 15.0, delete))
        async with asyncio.timeout(TIMEOUT):
            await deleting.wait()
        added = asyncio.create_task(replica.add_blob(A, 1, None, False))
        await asyncio.sleep(0.3)
        assert not added.done()  # it cannot unmark a row whose object is going

        deleted.set()
        async with asyncio.timeout(TIMEOUT):
            assert await removal == [A]
            await added
        assert await replica.blob(A, "public") == SharedBlob(A, 1, None, False, None)


# --------------------------------------------------------------------------- tags


async def test_a_tag_is_per_upstream_and_repository(index: SharedIndex) -> None:
    assert await index.tag("hub", "library/alpine", "latest") is None
    await index.set_tag("hub", "library/alpine", "latest", A, MANIFEST, 100.0)
    await index.set_tag("ecr", "library/alpine", "latest", B, None, 100.0)
    await index.set_tag("hub", "library/busybox", "latest", C, LIST, 100.0)
    assert await index.tag("hub", "library/alpine", "latest") == SharedTag(A, MANIFEST, 100.0)
    assert await index.tag("ecr", "library/alpine", "latest") == SharedTag(B, None, 100.0)
    assert await index.tag("hub", "library/busybox", "latest") == SharedTag(C, LIST, 100.0)
    assert await index.tag("hub", "library/alpine", "3.19") is None


async def test_a_tag_never_goes_back_in_time(index: SharedIndex) -> None:
    await index.set_tag("hub", "library/alpine", "latest", A, MANIFEST, 100.0)
    await index.set_tag("hub", "library/alpine", "latest", B, LIST, 200.0)
    assert await index.tag("hub", "library/alpine", "latest") == SharedTag(B, LIST, 200.0)
    await index.set_tag("hub", "library/alpine", "latest", A, MANIFEST, 150.0)  # a slow replica
    assert await index.tag("hub", "library/alpine", "latest") == SharedTag(B, LIST, 200.0)
    await index.set_tag("hub", "library/alpine", "latest", B, LIST, 300.0)
    assert await index.tag("hub", "library/alpine", "latest") == SharedTag(B, LIST, 300.0)


async def test_tags_and_blobs_list_every_row_in_order(index: SharedIndex) -> None:
    assert (await index.tags(), await index.blobs()) == ([], [])
    await index.set_tag("hub", "library/busybox", "latest", C, LIST, 300.0)
    await index.set_tag("hub", "library/alpine", "latest", A, MANIFEST, 100.0)
    await index.set_tag("ecr", "library/alpine", "latest", B, None, 200.0)
    assert await index.tags() == [
        SharedTagged("ecr", "library/alpine", "latest", B, 200.0),
        SharedTagged("hub", "library/alpine", "latest", A, 100.0),
        SharedTagged("hub", "library/busybox", "latest", C, 300.0),
    ]
    await index.add_blob(B, 2, None, True)
    await index.add_blob(A, 1, MANIFEST, False)
    await index.mark([B], 10.0)  # its object is still in the bucket: listed too
    assert await index.blobs() == [
        SharedBlob(A, 1, MANIFEST, False, None),
        SharedBlob(B, 2, None, True, 10.0),
    ]


# --------------------------------------------------------------------------- leader


async def test_one_replica_leads(database_url: str) -> None:
    async with opened(database_url) as first, opened(database_url) as second:
        assert await first.lead() is True
        assert await first.lead() is True  # still held
        assert await second.lead() is False
        await first.resign()
        assert await second.lead() is True
        assert await first.lead() is False
        await second.close()
        assert await first.lead() is True


async def test_a_lost_leader_connection_ends_the_lead(
    postgres: Postgres, database_url: str
) -> None:
    async with opened(database_url) as first, opened(database_url) as second:
        assert await first.lead() is True
        ended = postgres.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND database = ("
            " SELECT oid FROM pg_database WHERE datname = current_database())",
            database_of(database_url),
        )
        assert ended.split() == ["t"]
        assert await second.lead() is True
        assert await first.lead() is False


# --------------------------------------------------------------------------- leases

KEY = f"blob:{A}"
FIRST = "http://10.0.0.1:5000"
SECOND = "http://10.0.0.2:5000"
LONG = 30.0  # a lease no test outlives
EXPIRING = 0.5
# How soon a waiter must wake once the end of its lease is committed.
PROMPTLY = 0.5


async def expired(replica: SharedIndex, key: str, holder: str) -> Lease:
    """The lease on `key`, taken by `holder` as soon as the current one has expired."""
    deadline = time.monotonic() + EXPIRING + SLACK
    while not (lease := await replica.take_lease(key, holder, LONG)).ours:
        assert time.monotonic() < deadline, f"{key} still held by {lease.holder}"
        await asyncio.sleep(0.05)
    return lease


async def listening(replica: SharedIndex, key: str) -> None:
    """Have `replica`'s listener connected (a wait on a held key that times out)."""
    assert await replica.wait_released(key, 0.05) is False


async def test_one_replica_takes_a_fresh_lease(database_url: str) -> None:
    async with opened(database_url) as first, opened(database_url) as second:
        before = time.time()
        takes = await asyncio.gather(
            *(first.take_lease(KEY, FIRST, LONG) for _ in range(4)),
            *(second.take_lease(KEY, SECOND, LONG) for _ in range(4)),
        )
        taken = [lease for lease in takes if lease.ours]
        assert len(taken) == 1
        lease = taken[0]
        assert lease.key == KEY and lease.holder in (FIRST, SECOND)
        assert before + LONG - SLACK < lease.expires_at < time.time() + LONG + SLACK
        # Everyone else learns the holder, its token and its expiry.
        assert {replace_ours(other) for other in takes} == {lease}
        # Asked again by its holder: still its lease, under the same token ("already yours").
        again = await first.take_lease(KEY, lease.holder, LONG)
        assert again == Lease(KEY, lease.holder, lease.token, lease.expires_at, False)
        other = await second.take_lease(f"blob:{B}", SECOND, LONG)
        assert other.ours and other.token != lease.token


def replace_ours(lease: Lease) -> Lease:
    return Lease(lease.key, lease.holder, lease.token, lease.expires_at, True)


async def test_an_expired_lease_is_taken_over_and_its_old_holder_is_fenced(
    database_url: str,
) -> None:
    async with opened(database_url) as first, opened(database_url) as second:
        old = await first.take_lease(KEY, FIRST, EXPIRING)
        assert old.ours
        assert not (await second.take_lease(KEY, SECOND, LONG)).ours
        new = await expired(second, KEY, SECOND)
        assert new.holder == SECOND and new.token > old.token

        assert await first.renew_lease(KEY, old.token, LONG) is False
        await first.release_lease(KEY, old.token)
        # Its bytes are verified: the row is written, but the lease stays the new holder's.
        assert await first.complete_blob(KEY, old.token, A, 5, None, False) is False
        assert await second.blob(A, "public") == SharedBlob(A, 5, None, False, None)
        held = await first.take_lease(KEY, FIRST, LONG)
        assert (held.holder, held.token, held.ours) == (SECOND, new.token, False)
        assert await second.renew_lease(KEY, new.token, LONG) is True

        await second.release_lease(KEY, new.token)
        assert await first.renew_lease(KEY, new.token, LONG) is False  # gone
        third = await first.take_lease(KEY, FIRST, LONG)
        assert third.ours and third.token > new.token


async def test_a_lease_renewed_in_time_is_kept(database_url: str) -> None:
    async with opened(database_url) as first, opened(database_url) as second:
        lease = await first.take_lease(KEY, FIRST, EXPIRING)
        for _ in range(3):
            await asyncio.sleep(EXPIRING / 2)
            assert await first.renew_lease(KEY, lease.token, EXPIRING) is True
            assert not (await second.take_lease(KEY, SECOND, LONG)).ours


async def test_complete_blob_writes_the_row_frees_the_lease_and_wakes_the_waiters(
    database_url: str,
) -> None:
    async with opened(database_url) as holder, opened(database_url) as peer:
        lease = await holder.take_lease(KEY, FIRST, LONG)
        await listening(peer, KEY)
        woken: list[float] = []
        seen: list[SharedBlob | None] = []

        async def waiter() -> bool:
            released = await peer.wait_released(KEY, TIMEOUT)
            woken.append(time.monotonic())
            seen.append(await peer.blob(A, "authenticated"))  # came with the lease's end
            return released

        waiters = [asyncio.create_task(waiter()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiters)

        assert await holder.complete_blob(KEY, lease.token, A, 9, MANIFEST, True) is True
        completed = time.monotonic()
        async with asyncio.timeout(TIMEOUT):
            assert await asyncio.gather(*waiters) == [True, True, True]
        assert max(woken) - completed < PROMPTLY
        assert seen == [SharedBlob(A, 9, MANIFEST, True, None)] * 3
        taken = await peer.take_lease(KEY, SECOND, LONG)
        assert taken.ours and taken.token > lease.token


async def test_release_wakes_the_waiters_only_under_the_current_token(
    database_url: str,
) -> None:
    async with opened(database_url) as holder, opened(database_url) as peer:
        lease = await holder.take_lease(KEY, FIRST, LONG)
        other = await holder.take_lease(f"blob:{B}", FIRST, LONG)
        await listening(peer, KEY)
        waiting = asyncio.create_task(peer.wait_released(KEY, TIMEOUT))
        await holder.release_lease(KEY, lease.token + 1000)  # not its token: nothing
        await holder.release_lease(f"blob:{B}", other.token)  # another key's end
        await asyncio.sleep(0.2)
        assert not waiting.done()

        await holder.release_lease(KEY, lease.token)
        released = time.monotonic()
        async with asyncio.timeout(TIMEOUT):
            assert await waiting is True
        assert time.monotonic() - released < PROMPTLY


async def test_a_waiter_without_a_notification_returns_false_at_its_timeout(
    index: SharedIndex,
) -> None:
    await index.take_lease(KEY, FIRST, LONG)
    for timeout in (SHORT, 0.0):
        started = time.monotonic()
        assert await index.wait_released(KEY, timeout) is False
        assert timeout <= time.monotonic() - started < timeout + SLACK


async def test_a_wait_for_a_lease_already_ended_returns_at_once(index: SharedIndex) -> None:
    lease = await index.take_lease(KEY, FIRST, EXPIRING)
    assert await index.wait_released(f"blob:{B}", TIMEOUT) is True  # never taken
    await index.release_lease(KEY, lease.token)  # before the wait began
    started = time.monotonic()
    assert await index.wait_released(KEY, TIMEOUT) is True
    await index.take_lease(KEY, FIRST, 0.1)
    await asyncio.sleep(0.2)
    assert await index.wait_released(KEY, TIMEOUT) is True  # expired: free to take over
    assert time.monotonic() - started < PROMPTLY + 0.2


async def notify(dsn: str, payload: str) -> None:
    """A notification on the leases' channel, as another replica would send it."""
    db = await asyncpg.connect(dsn, timeout=TIMEOUT)
    try:
        await db.execute("SELECT pg_notify($1, $2)", LEASE_CHANNEL, payload)
    finally:
        await db.close()


async def test_a_notification_wakes_the_waiters_of_its_key(
    database_url: str, index: SharedIndex
) -> None:
    await index.take_lease(KEY, FIRST, LONG)
    await listening(index, KEY)
    waiting = asyncio.create_task(index.wait_released(KEY, TIMEOUT))
    await asyncio.sleep(0)  # registered: the listener is up already
    await notify(database_url, KEY)
    async with asyncio.timeout(PROMPTLY):
        assert await waiting is True


async def test_a_long_key_is_announced_by_its_hash(database_url: str) -> None:
    key = "tag:registry-1.docker.io/" + "a/" * 5000 + ":latest"
    async with opened(database_url) as holder, opened(database_url) as peer:
        lease = await holder.take_lease(key, FIRST, LONG)
        await listening(peer, key)
        waiting = asyncio.create_task(peer.wait_released(key, TIMEOUT))
        await holder.release_lease(key, lease.token)
        async with asyncio.timeout(PROMPTLY):
            assert await waiting is True


async def test_closing_ends_the_waits(database_url: str) -> None:
    shared = SharedIndex(database_url, timeout=TIMEOUT)
    await shared.open()
    await shared.take_lease(KEY, FIRST, LONG)
    await listening(shared, KEY)
    waiting = asyncio.create_task(shared.wait_released(KEY, LONG))
    await asyncio.sleep(0)
    await shared.close()
    async with asyncio.timeout(PROMPTLY):
        assert await waiting is False
    assert await shared.wait_released(KEY, LONG) is False


async def test_expired_leases_are_dropped(database_url: str) -> None:
    async with opened(database_url) as leader:
        await leader.take_lease(KEY, FIRST, 0.1)
        await leader.take_lease(f"blob:{B}", FIRST, LONG)
        await asyncio.sleep(0.2)
        assert await leader.drop_expired_leases(60.0) == 0  # not expired for that long
        assert await leader.drop_expired_leases(0.0) == 1
        assert await leader.drop_expired_leases(0.0) == 0
        assert not (await leader.take_lease(f"blob:{B}", SECOND, LONG)).ours
        assert (await leader.take_lease(KEY, SECOND, LONG)).ours


async def test_waits_time_out_while_postgres_is_down_then_the_listener_reconnects(
    postgres: Postgres, database_url: str
) -> None:
    async with opened(database_url) as holder, opened(database_url, SHORT) as peer:
        lease = await holder.take_lease(KEY, FIRST, LONG)
        await listening(peer, KEY)
        postgres.stop()
        try:
            for timeout in (SHORT, SHORT):
                started = time.monotonic()
                assert await peer.wait_released(KEY, timeout) is False
                assert time.monotonic() - started < timeout + SLACK
            with pytest.raises(DatabaseUnavailable):
                await holder.take_lease(KEY, SECOND, LONG)
        finally:
            postgres.start()
        await listening(peer, KEY)  # reconnected: the lease is still held
        waiting = asyncio.create_task(peer.wait_released(KEY, TIMEOUT))
        await asyncio.sleep(0)
        await notify(database_url, KEY)  # only a notification can wake it
        async with asyncio.timeout(PROMPTLY):
            assert await waiting is True
        waiting = asyncio.create_task(peer.wait_released(KEY, TIMEOUT))
        await asyncio.sleep(0)
        await holder.release_lease(KEY, lease.token)
        async with asyncio.timeout(PROMPTLY):
            assert await waiting is True


# --------------------------------------------------------------------------- quota


async def test_the_quota_last_seen_is_shared(database_url: str) -> None:
    async with opened(database_url) as first, opened(database_url) as second:
        assert await first.quota("hub") is None
        before = time.time()
        await first.set_quota("hub", 76, 100, 21600, None)
        seen = await second.quota("hub")
        assert seen is not None
        assert seen == SharedQuota(76, 100, 21600, None, seen.observed_at)
        assert before - SLACK < seen.observed_at < time.time() + SLACK

        await second.set_quota("hub", 0, 100, 21600, before + 60)
        await first.set_quota("ecr", None, None, None, None)
        latest = await first.quota("hub")
        assert latest is not None
        assert latest == SharedQuota(0, 100, 21600, before + 60, latest.observed_at)
        assert latest.observed_at >= seen.observed_at
        ecr = await second.quota("ecr")
        assert ecr is not None and ecr == SharedQuota(None, None, None, None, ecr.observed_at)


# --------------------------------------------------------------------------- failures


async def test_postgres_stopped_then_started(postgres: Postgres, database_url: str) -> None:
    async with opened(database_url) as shared:
        await shared.add_blob(A, 7, None, False)
        assert await shared.lead() is True
        late = SharedIndex(database_url, timeout=TIMEOUT)
        postgres.stop()
        try:
            for call in (
                lambda: shared.blob(A, "public"),
                lambda: shared.add_blob(B, 1, None, False),
                lambda: shared.touch({A: time.time()}),
                shared.usage,
                shared.lead,
                late.open,
            ):
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailable):
                    await call()
                assert time.monotonic() - started < TIMEOUT + SLACK
        finally:
            postgres.start()
        assert await shared.blob(A, "public") == SharedBlob(A, 7, None, False, None)
        await shared.add_blob(B, 1, None, False)
        assert await shared.usage() == SharedUsage(8, 2)
        assert await shared.lead() is True
        try:
            assert await late.blob(B, "public") == SharedBlob(B, 1, None, False, None)
        finally:
            await late.close()


async def test_unreachable_database(database_url: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    shared = SharedIndex(with_port(database_url, port), timeout=TIMEOUT)
    with pytest.raises(DatabaseUnavailable):
        await shared.open()
    with pytest.raises(DatabaseUnavailable):
        await shared.blob(A, "public")
    await shared.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def test_a_silent_server_fails_within_the_timeout(
    database_url: str, silent_port: int
) -> None:
    shared = SharedIndex(with_port(database_url, silent_port), timeout=SHORT)
    for call in (shared.open, shared.usage, shared.lead):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await call()
        assert time.monotonic() - started < SHORT + SLACK
    await shared.close()


class StallingProxy:
    """Forwards loopback TCP to PostgreSQL until `stall()`; from then on it holds every
    byte (a network that stopped delivering), until `flow()`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.pumps: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for pump in self.pumps:
            pump.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        await asyncio.wait_for(self.server.wait_closed(), TIMEOUT)

    def stall(self) -> None:
        self.flowing.clear()

    def flow(self) -> None:
        self.flowing.set()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self.pumps.add(pump)
            pump.add_done_callback(self.pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()


async def test_a_stalled_connection_fails_within_the_timeout(database_url: str) -> None:
    proxy = StallingProxy(urlsplit(database_url).port or 5432)
    async with proxy as port, opened(with_port(database_url, port), SHORT) as shared:
        await shared.add_blob(A, 1, None, False)
        proxy.stall()
        for call in (lambda: shared.blob(A, "public"), shared.usage, shared.lead):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await call()
            assert time.monotonic() - started < SHORT + SLACK
        proxy.flow()
        assert await shared.blob(A, "public") == SharedBlob(A, 1, None, False, None)
        assert await shared.lead() is True


def hold_the_loop(seconds: float) -> None:
    """Block the event loop, so that a connection's end arrives unnoticed by asyncpg."""
    time.sleep(seconds)


async def test_a_connection_the_server_closed_is_replaced(
    postgres: Postgres, database_url: str, index: SharedIndex
) -> None:
    await index.add_blob(A, 3, None, False)
    ended = postgres.sql(  # psql, run while this loop waits: asyncpg sees nothing yet
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'mirror' AND datname = current_database()",
        database_of(database_url),
    )
    assert ended.split() == ["t"]
    hold_the_loop(0.2)  # the session's end reaches the socket, unread
    assert await index.usage() == SharedUsage(3, 1)
