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
    MIGRATIONS,
    DatabaseUnavailable,
    SharedBlob,
    SharedIndex,
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
