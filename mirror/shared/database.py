"""The PostgreSQL index of the shared tier: what the bucket holds, the tags, the leader,
the leases on upstream fetches and the Hub quota.

Many replicas share one database. Each holds a small pool; the schema is created or
migrated at open, one replica at a time (an advisory lock held for the migration's
transaction). Every call is bounded by `timeout` and any failure to reach or use the
database is a `DatabaseUnavailable`: the caller then serves from its local tier alone.
A connection that fails or is cut off mid-call is dropped, not reset (a reset would wait
on a server that may not answer); the pool connects afresh on the next call, so a
restarted server needs no reopening.

A lease names the one replica that fetches a key from the upstream for the whole fleet.
Its end (release, or completion with the blob's row) is announced by NOTIFY on one
channel; each index listens on one connection of its own for all of its waiters.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import Pool, PoolConnectionProxy

from mirror.errors import MirrorError

log = logging.getLogger(__name__)

T = TypeVar("T")
# asyncpg's classes are generic in its stubs only.
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

POOL_MIN = 1
POOL_MAX = 10
APPLICATION_NAME = "mirror"
# Advisory lock keys, database-wide: "mirror" in the high bytes keeps them apart from
# another application's keys in the same database.
MIGRATION_LOCK = 0x6D6972726F720001
LEADER_LOCK = 0x6D6972726F720002

# Schema steps, applied in order; the database records how many it has had. Append,
# never edit: a replica of an older release may still be running against the newer schema.
MIGRATIONS: tuple[str, ...] = (
    """
    -- Every verified blob (layers, configs, manifests) in the bucket, under its digest.
    CREATE TABLE blobs (
        digest      text PRIMARY KEY,
        size        bigint NOT NULL,
        media_type  text,                   -- set for manifests: their Content-Type
        private     boolean NOT NULL,       -- only ever fetched through authenticated upstreams
        created     double precision NOT NULL,
        last_access double precision NOT NULL,
        marked_at   double precision        -- set when eviction chose it; hidden from then on
    );
    -- The evictor's scan, least recently used first, and its sweep of marked rows.
    CREATE INDEX blobs_lru ON blobs (last_access, digest) WHERE marked_at IS NULL;
    CREATE INDEX blobs_marked ON blobs (marked_at, digest) WHERE marked_at IS NOT NULL;

    -- What a tag pointed to when the upstream last confirmed it.
    CREATE TABLE tags (
        upstream    text NOT NULL,
        repository  text NOT NULL,
        tag         text NOT NULL,
        digest      text NOT NULL,
        media_type  text,
        checked_at  double precision NOT NULL,
        PRIMARY KEY (upstream, repository, tag)
    );
    """,
    """
    -- Who fetches a key from the upstream for the fleet: one row per key, reused by the
    -- next taker once expired; the leader drops rows long expired.
    CREATE TABLE leases (
        key         text PRIMARY KEY,
        holder      text NOT NULL,          -- the holding replica's advertised URL
        token       bigint NOT NULL,        -- fencing token, from lease_tokens
        expires_at  timestamptz NOT NULL    -- on the database's clock, the only one trusted
    );
    CREATE INDEX leases_expiry ON leases (expires_at);
    -- One sequence for every key: no token is ever handed out twice, so a holder that
    -- lost its lease can never pass for the one that took it since.
    CREATE SEQUENCE lease_tokens;

    -- Docker Hub's pull quota per upstream, as a replica last saw it.
    CREATE TABLE quotas (
        upstream      text PRIMARY KEY,
        remaining     integer,
        quota_limit   integer,
        quota_window  integer,              -- seconds
        blocked_until double precision,     -- Unix time
        observed_at   double precision NOT NULL
    );
    """,
)

# Every lease's end is announced on this channel, its payload the key (see _payload).
LEASE_CHANNEL = "mirror_leases"
# Longer keys are announced by their hash: PostgreSQL refuses payloads of 8000 bytes.
PAYLOAD_MAX = 1000

# Raised by a database that cannot be reached or fails; everything else is a bug.
_FAILURES = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)
# A pooled connection the server closed (a restart, say), which asyncpg may not have
# noticed before sending on it (it then meets the server's goodbye mid-query and may be
# left in a state it reports as an internal error): the same call on a fresh connection
# may well succeed.
_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)

_BLOB_COLUMNS = "digest, size, media_type, private, marked_at"
_LEASE_COLUMNS = "key, holder, token, extract(epoch FROM expires_at)::float8 AS expires_at"

# A blob now in the bucket ($1 digest, $2 size, $3 media type, $4 private, $5 now). The
# first media type recorded stays (it belongs to the content); fetched once through a
# public upstream, it is public for good; and it is wanted again, so no longer marked.
_ADD_BLOB = (
    "INSERT INTO blobs (digest, size, media_type, private, created, last_access)"
    " VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (digest) DO UPDATE SET"
    " media_type = coalesce(blobs.media_type, excluded.media_type),"
    " private = blobs.private AND excluded.private,"
    " last_access = greatest(blobs.last_access, excluded.last_access),"
    " marked_at = NULL"
)
# $1 key, $2 holder, $3 ttl in seconds: the lease, unless another holds it unexpired.
# The token of a taking over is drawn once the old row is locked: greater than its token.
_TAKE_LEASE = (
    "INSERT INTO leases AS held (key, holder, token, expires_at)"
    " VALUES ($1, $2, nextval('lease_tokens'), now() + $3::float8 * interval '1 second')"
    " ON CONFLICT (key) DO UPDATE SET holder = excluded.holder,"
    " token = nextval('lease_tokens'), expires_at = excluded.expires_at"
    " WHERE held.expires_at < now()"
    f" RETURNING {_LEASE_COLUMNS}"
)
# $1 key, $2 token: the lease ended if still that token, and then only announced ($3
# channel, $4 payload), at commit. A row when it was ended.
_END_LEASE = (
    "WITH ended AS (DELETE FROM leases WHERE key = $1 AND token = $2 RETURNING key)"
    " SELECT pg_notify($3, $4) FROM ended"
)


class DatabaseUnavailable(MirrorError):
    """The shared index cannot be reached or failed; the shared tier is out of use."""


@dataclass(frozen=True)
class SharedBlob:
    digest: str
    size: int
    media_type: str | None
    private: bool
    marked_at: float | None  # Unix time eviction marked it, None if it is not marked


@dataclass(frozen=True)
class SharedTag:
    digest: str
    media_type: str | None
    checked_at: float  # Unix time the upstream last confirmed it


@dataclass(frozen=True)
class SharedTagged:
    """A tag as `tags()` lists it."""

    upstream: str
    repository: str
    tag: str
    digest: str
    checked_at: float


@dataclass(frozen=True)
class SharedUsage:
    bytes: int
    blobs: int


@dataclass(frozen=True)
class Lease:
    """Who fetches `key` from the upstream for the fleet.

    `ours` is True only for the call that took it, with a new token. A replica asking
    again for a lease it still holds gets `ours` False with its own `holder` and the
    current token: `holder` equal to the asker's URL is how "already yours" reads (an
    earlier call of this replica took it, or a retried call whose answer was lost).
    """

    key: str  # "blob:sha256:…", "tag:<upstream>/<repo>:<tag>", "manifest:sha256:…"
    holder: str  # the holding replica's advertised URL: peers stream from it
    token: int  # fencing token: greater at each taking of the key, never handed out twice
    expires_at: float  # Unix time, on the database's clock
    ours: bool


@dataclass(frozen=True)
class SharedQuota:
    """An upstream's pull quota as a replica last saw it (Docker Hub's headers)."""

    remaining: int | None
    limit: int | None
    window: int | None  # seconds
    blocked_until: float | None  # Unix time
    observed_at: float  # Unix time, on the database's clock


class SharedIndex:
    def __init__(self, dsn: str, *, timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._pool: Pool[asyncpg.Record] | None = None
        self._opening = asyncio.Lock()
        self._closed = False
        # The leader lock lives as long as this session: its own connection, never the
        # pool's, whose reset on release unlocks every advisory lock.
        self._leader: asyncpg.Connection[asyncpg.Record] | None = None
        self._leading = asyncio.Lock()
        # Notifications arrive on a connection of their own, for every waiter; a waiter
        # waits on a future under its key's payload.
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._listening = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}

    async def open(self) -> None:
        """Connect and bring the schema up to date. May be called again after a failure;
        a call on an index not yet open opens it too."""
        self._closed = False
        await self._guarded(self._ready())

    async def close(self) -> None:
        self._closed = True
        await self.resign()
        await self._stop_listening()
        async with self._opening:  # a pool being created now is closed too, not leaked
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await pool.close()
        except TimeoutError:
            pool.terminate()

    async def blob(self, digest: str, access: str) -> SharedBlob | None:
        """The blob, unless it is absent, marked for eviction, or private and asked for
        through a public upstream."""
        row = await self._run(
            lambda db: db.fetchrow(
                f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE digest = $1 AND marked_at IS NULL",
                digest,
            )
        )
        if row is None or (row["private"] and access == "public"):
            return None
        return _blob(row)

    async def add_blob(self, digest: str, size: int, media_type: str | None, private: bool) -> None:
        """A blob now in the bucket. The first media type recorded stays (it belongs to the
        content); fetched once through a public upstream, it is public for good; and it is
        wanted again, so no longer marked for eviction."""
        now = time.time()
        await self._run(lambda db: db.execute(_ADD_BLOB, digest, size, media_type, private, now))

    async def touch(self, accessed: Mapping[str, float]) -> None:
        """Record last accesses (Unix times); a time never moves back."""
        if not accessed:
            return
        digests = sorted(accessed)
        times = [accessed[digest] for digest in digests]
        # Rows are locked in digest order first: two replicas' batches sharing rows would
        # otherwise lock them in whatever order each join runs, and could deadlock.
        await self._run(
            lambda db: db.execute(
                "UPDATE blobs SET last_access = greatest(blobs.last_access, t.at)"
                f" FROM {_LOCKED_IN_ORDER} AS locked,"
                " unnest($1::text[], $2::float8[]) AS t (digest, at)"
                " WHERE blobs.digest = locked.digest AND t.digest = locked.digest",
                digests,
                times,
            )
        )

    async def tag(self, upstream: str, repository: str, tag: str) -> SharedTag | None:
        row = await self._run(
            lambda db: db.fetchrow(
                "SELECT digest, media_type, checked_at FROM tags"
                " WHERE upstream = $1 AND repository = $2 AND tag = $3",
                upstream,
                repository,
                tag,
            )
        )
        return (
            None if row is None else SharedTag(row["digest"], row["media_type"], row["checked_at"])
        )

    async def set_tag(
        self,
        upstream: str,
        repository: str,
        tag: str,
        digest: str,
        media_type: str | None,
        checked_at: float,
    ) -> None:
        """What the tag points to, as the upstream confirmed at `checked_at`. A replica
        whose check is older than the recorded one loses: the tag never goes back in time."""
        await self._run(
            lambda db: db.execute(
                "INSERT INTO tags (upstream, repository, tag, digest, media_type, checked_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (upstream, repository, tag) DO UPDATE SET"
                " digest = excluded.digest, media_type = excluded.media_type,"
                " checked_at = excluded.checked_at"
                " WHERE tags.checked_at <= excluded.checked_at",
                upstream,
                repository,
                tag,
                digest,
                media_type,
                checked_at,
            )
        )

    async def tags(self) -> list[SharedTagged]:
        """Every tag, by upstream, repository and tag."""
        rows = await self._run(
            lambda db: db.fetch(
                "SELECT upstream, repository, tag, digest, checked_at FROM tags"
                " ORDER BY upstream, repository, tag"
            )
        )
        return [
            SharedTagged(
                row["upstream"], row["repository"], row["tag"], row["digest"], row["checked_at"]
            )
            for row in rows
        ]

    async def blobs(self) -> list[SharedBlob]:
        """Every row, marked ones too (their objects are still in the bucket), by digest."""
        rows = await self._run(
            lambda db: db.fetch(f"SELECT {_BLOB_COLUMNS} FROM blobs ORDER BY digest")
        )
        return [_blob(row) for row in rows]

    async def usage(self) -> SharedUsage:
        """The blobs not marked for eviction: what counts against the shared budget."""
        row = await self._run(
            lambda db: db.fetchrow(
                "SELECT coalesce(sum(size), 0)::bigint AS bytes, count(*) AS blobs"
                " FROM blobs WHERE marked_at IS NULL"
            )
        )
        assert row is not None
        return SharedUsage(row["bytes"], row["blobs"])

    async def least_recently_used(
        self, limit: int, exclude: Collection[str] = ()
    ) -> list[SharedBlob]:
        """Unmarked blobs, least recently used first, leaving out `exclude` (pins)."""
        rows = await self._run(
            lambda db: db.fetch(
                f"SELECT {_BLOB_COLUMNS} FROM blobs"
                " WHERE marked_at IS NULL AND digest <> ALL($2::text[])"
                " ORDER BY last_access, digest LIMIT $1",
                limit,
                list(exclude),
            )
        )
        return [_blob(row) for row in rows]

    async def mark(self, digests: Collection[str], at: float) -> None:
        """Chosen for eviction at `at`: hidden from now on. A row marked already keeps
        its first mark, so the wait before its object is deleted does not start over."""
        await self._run_on(
            digests,
            "UPDATE blobs SET marked_at = $2"
            f" FROM {_LOCKED_IN_ORDER} AS locked"
            " WHERE blobs.digest = locked.digest AND blobs.marked_at IS NULL",
            at,
        )

    async def marked_before(self, at: float, limit: int) -> list[SharedBlob]:
        """Blobs marked before `at`, earliest mark first."""
        rows = await self._run(
            lambda db: db.fetch(
                f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE marked_at < $1"
                " ORDER BY marked_at, digest LIMIT $2",
                at,
                limit,
            )
        )
        return [_blob(row) for row in rows]

    async def remove(self, digests: Collection[str]) -> None:
        """Forget blobs whose objects are deleted. Tags pointing at them stay: a tag whose
        manifest is gone is a miss, and the next pull fetches it again."""
        await self._run_on(
            digests,
            f"DELETE FROM blobs USING {_LOCKED_IN_ORDER} AS locked"
            " WHERE blobs.digest = locked.digest",
        )

    async def remove_marked(
        self,
        digests: Collection[str],
        before: float,
        delete: Callable[[list[str]], Awaitable[None]],
    ) -> list[str]:
        """Forget those of `digests` still marked before `before`, once `delete` has removed
        their objects; what was removed. Their rows stay locked meanwhile: a blob added
        again before this call keeps its object, one added during it waits, then is added
        anew. If `delete` fails, every row stays as it was."""
        if not digests:
            return []
        ordered = sorted(set(digests))

        async def removal(db: Connection) -> list[str]:
            async with db.transaction():
                rows = await db.fetch(
                    f"DELETE FROM blobs USING {_LOCKED_IN_ORDER} AS locked"
                    " WHERE blobs.digest = locked.digest AND blobs.marked_at < $2"
                    " RETURNING blobs.digest",
                    ordered,
                    before,
                )
                removed = [row["digest"] for row in rows]
                await delete(removed)
                return removed

        return await self._run(removal)

    # ---- leases

    async def take_lease(self, key: str, holder: str, ttl: float) -> Lease:
        """The lease on `key` for `ttl` seconds: taken by `holder` (`ours`) if no one holds
        it or its holder let it expire, else the current holder's."""

        async def taking(db: Connection) -> Lease:
            while True:
                row = await db.fetchrow(_TAKE_LEASE, key, holder, ttl)
                if row is not None:
                    return _lease(row, ours=True)
                row = await db.fetchrow(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE key = $1", key)
                if row is not None:
                    return _lease(row, ours=False)
                # Ended between the two statements: free again (the timeout bounds this).

        return await self._run(taking)

    async def renew_lease(self, key: str, token: int, ttl: float) -> bool:
        """Extend the lease to `ttl` seconds from now; False if it was lost (taken over
        under another token, or gone). Renewed in time, an expired lease is still ours."""
        renewed = await self._run(
            lambda db: db.fetchval(
                "UPDATE leases SET expires_at = now() + $3::float8 * interval '1 second'"
                " WHERE key = $1 AND token = $2 RETURNING true",
                key,
                token,
                ttl,
            )
        )
        return bool(renewed)

    async def release_lease(self, key: str, token: int) -> None:
        """End the lease, if still `token`, and announce it to the waiters."""
        await self._run(
            lambda db: db.fetchrow(_END_LEASE, key, token, LEASE_CHANNEL, _payload(key))
        )

    async def complete_blob(
        self,
        key: str,
        token: int,
        digest: str,
        size: int,
        media_type: str | None,
        private: bool,
    ) -> bool:
        """The fetch under the lease succeeded: in one transaction, the blob's row (as
        `add_blob`) and the lease's end; whether the lease was still `token`.

        Its bytes are verified and in the bucket, so the row is written even when the lease
        was lost, and the waiters are told in either case: what they wait for is there."""
        payload = _payload(key)
        now = time.time()

        async def completion(db: Connection) -> bool:
            async with db.transaction():
                await db.execute(_ADD_BLOB, digest, size, media_type, private, now)
                ended = await db.fetchrow(_END_LEASE, key, token, LEASE_CHANNEL, payload)
                if ended is None:
                    await db.execute("SELECT pg_notify($1, $2)", LEASE_CHANNEL, payload)
            return ended is not None

        return await self._run(completion)

    async def drop_expired_leases(self, older_than: float) -> int:
        """Forget leases expired more than `older_than` seconds ago; how many. (A lease
        taken over reuses its row: only keys no one asked for since pile up.)"""
        dropped: int = await self._run(
            lambda db: db.fetchval(
                "WITH dropped AS (DELETE FROM leases"
                " WHERE expires_at < now() - $1::float8 * interval '1 second' RETURNING key)"
                " SELECT count(*) FROM dropped",
                older_than,
            )
        )
        return dropped

    async def wait_released(
        self,
        key: str,
        timeout: float,  # noqa: ASYNC109 - its end is an answer (False), not an error
    ) -> bool:
        """Wait until the lease on `key` ends, at most `timeout` seconds: True when its end
        was announced, or when, once listening, no unexpired lease on `key` is left (it
        ended before the wait began); False at the timeout. Never raises for an unreachable
        database: the wait then times out (another waiter may reconnect the listener, and
        its notifications reach this one too)."""
        if self._closed:
            return False
        payload = _payload(key)
        released: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(payload, set())
        waiters.add(released)
        try:
            async with asyncio.timeout(timeout):
                if await self._listening_while_free(key):
                    return True
                return await released
        except TimeoutError:
            return False
        finally:
            waiters.discard(released)
            if not waiters and self._waiters.get(payload) is waiters:
                del self._waiters[payload]

    async def _listening_while_free(self, key: str) -> bool:
        """Listen (connecting the listener if it is not); then whether `key` has no
        unexpired lease. False, as if held, when the database cannot be reached."""
        try:
            async with self._listening:
                for attempt in (1, 2):
                    listener = await self._listener_connection()
                    try:
                        held = await listener.fetchval(
                            "SELECT EXISTS (SELECT FROM leases"
                            " WHERE key = $1 AND expires_at >= now())",
                            key,
                            timeout=self._timeout,
                        )
                        return not held
                    except _LOST:
                        self._drop_listener()
                        if attempt == 2:
                            raise
                    except BaseException:
                        self._drop_listener()  # cut off mid-query: in an unknown state
                        raise
        except _FAILURES as exc:
            log.info("shared index: cannot listen for leases (%s)", _describe(exc))
        return False

    async def _listener_connection(self) -> asyncpg.Connection[asyncpg.Record]:
        if self._closed:
            raise asyncpg.InterfaceError("shared index is closed")
        if self._listener is None or self._listener.is_closed():
            self._drop_listener()
            listener = await self._connect()
            try:
                await listener.add_listener(LEASE_CHANNEL, self._notified)
            except BaseException:
                listener.terminate()
                raise
            self._listener = listener
        return self._listener

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        for released in self._waiters.pop(str(payload), ()):
            if not released.done():
                released.set_result(True)

    def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()

    async def _stop_listening(self) -> None:
        """Close the listener (once a connection under way is made) and end every wait."""
        async with self._listening:
            listener, self._listener = self._listener, None
        waiters, self._waiters = self._waiters, {}
        for released in (future for futures in waiters.values() for future in futures):
            if not released.done():
                released.set_result(False)
        if listener is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await listener.close()
        except _FAILURES:
            listener.terminate()

    # ---- Hub quota

    async def set_quota(
        self,
        upstream: str,
        remaining: int | None,
        limit: int | None,
        window: int | None,
        blocked_until: float | None,
    ) -> None:
        """The upstream's quota as seen just now; a write older than the recorded one (by
        the database's clock) loses."""
        await self._run(
            lambda db: db.execute(
                "INSERT INTO quotas (upstream, remaining, quota_limit, quota_window,"
                " blocked_until, observed_at)"
                " VALUES ($1, $2, $3, $4, $5, extract(epoch FROM now()))"
                " ON CONFLICT (upstream) DO UPDATE SET remaining = excluded.remaining,"
                " quota_limit = excluded.quota_limit, quota_window = excluded.quota_window,"
                " blocked_until = excluded.blocked_until, observed_at = excluded.observed_at"
                " WHERE quotas.observed_at <= excluded.observed_at",
                upstream,
                remaining,
                limit,
                window,
                blocked_until,
            )
        )

    async def quota(self, upstream: str) -> SharedQuota | None:
        row = await self._run(
            lambda db: db.fetchrow(
                "SELECT remaining, quota_limit, quota_window, blocked_until, observed_at"
                " FROM quotas WHERE upstream = $1",
                upstream,
            )
        )
        if row is None:
            return None
        return SharedQuota(
            row["remaining"],
            row["quota_limit"],
            row["quota_window"],
            row["blocked_until"],
            row["observed_at"],
        )

    # ---- leader

    async def lead(self) -> bool:
        """Whether this replica leads (holds the leader lock) now, taking the lock if it is
        free. The lock lasts as long as its connection: once that is lost, this is False
        until a later call takes it again."""
        async with self._leading:
            if self._closed:
                raise DatabaseUnavailable("shared index is closed")
            try:
                return await self._guarded(self._hold_lead())
            except DatabaseUnavailable:
                self._drop_leader()
                raise

    async def resign(self) -> None:
        async with self._leading:
            leader, self._leader = self._leader, None
            if leader is None:
                return
            try:
                async with asyncio.timeout(self._timeout):
                    await leader.close()  # ending the session releases the lock
            except _FAILURES:
                leader.terminate()

    async def _hold_lead(self) -> bool:
        for attempt in (1, 2):
            if self._leader is None or self._leader.is_closed():
                self._drop_leader()
                self._leader = await self._connect()
            try:
                # Taken again by the session that holds it, it is simply still held.
                leading = await self._leader.fetchval(
                    "SELECT pg_try_advisory_lock($1)", LEADER_LOCK
                )
            except _LOST:
                self._drop_leader()
                if attempt == 2:
                    raise
                continue
            if not leading:
                # A follower keeps no connection open between its tries.
                self._drop_leader()
            return bool(leading)
        raise AssertionError("unreachable")

    def _drop_leader(self) -> None:
        leader, self._leader = self._leader, None
        if leader is not None:
            leader.terminate()

    async def _connect(self) -> asyncpg.Connection[asyncpg.Record]:
        return await asyncpg.connect(
            self._dsn,
            timeout=self._timeout,
            server_settings={"application_name": APPLICATION_NAME},
        )

    async def _run_on(self, digests: Collection[str], statement: str, *args: object) -> None:
        """`statement` on the rows of `digests` ($1, sorted), which it locks in order."""
        if not digests:
            return
        ordered = sorted(set(digests))
        await self._run(lambda db: db.execute(statement, ordered, *args))

    async def _run(self, operation: Callable[[Connection], Awaitable[T]]) -> T:
        """`operation` on a pooled connection, once more on a fresh one if the server had
        closed the first (every statement here may safely run twice)."""

        async def attempts() -> T:
            pool = await self._ready()
            try:
                return await _on_connection(pool, operation, self._timeout)
            except _LOST as exc:
                log.info("shared index connection lost (%s); trying a new one", exc)
                return await _on_connection(pool, operation, self._timeout)

        return await self._guarded(attempts())

    async def _guarded(self, call: Awaitable[T]) -> T:
        """`call`, bounded by the timeout, its failures as DatabaseUnavailable."""
        try:
            async with asyncio.timeout(self._timeout):
                return await call
        except _FAILURES as exc:
            raise DatabaseUnavailable(f"shared index: {_describe(exc)}") from exc

    async def _ready(self) -> Pool[asyncpg.Record]:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._closed:
                raise DatabaseUnavailable("shared index is closed")
            if self._pool is None:
                self._pool = await self._create_pool()
            return self._pool

    async def _create_pool(self) -> Pool[asyncpg.Record]:
        pool: Pool[asyncpg.Record] = asyncpg.create_pool(
            self._dsn,
            min_size=POOL_MIN,
            max_size=POOL_MAX,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings={"application_name": APPLICATION_NAME},
        )
        try:
            await pool
            await _on_connection(pool, _migrate, self._timeout)
        except BaseException:
            pool.terminate()
            raise
        return pool


# The rows of the digests in $1, locked in digest order (as a FROM item).
_LOCKED_IN_ORDER = (
    "(SELECT digest FROM blobs WHERE digest = ANY($1::text[]) ORDER BY digest FOR UPDATE)"
)


async def _on_connection(
    pool: Pool[asyncpg.Record],
    operation: Callable[[Connection], Awaitable[T]],
    release_within: float,
) -> T:
    connection = await pool.acquire()
    try:
        result = await operation(connection)
    except BaseException:
        connection.terminate()  # in an unknown state: not worth a reset that may hang
        raise
    finally:
        await pool.release(connection, timeout=release_within)
    return result


async def _migrate(db: Connection) -> None:
    """Bring the schema to the last of MIGRATIONS, one replica at a time."""
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " id boolean PRIMARY KEY DEFAULT true CHECK (id), version integer NOT NULL);"
            " INSERT INTO schema_version (version) VALUES (0) ON CONFLICT DO NOTHING"
        )
        version: int = await db.fetchval("SELECT version FROM schema_version")
        if version > len(MIGRATIONS):
            log.warning(
                "shared index schema is at version %d, newer than this release's %d",
                version,
                len(MIGRATIONS),
            )
            return
        for step in MIGRATIONS[version:]:
            await db.execute(step)
        await db.execute("UPDATE schema_version SET version = $1", len(MIGRATIONS))


def _blob(row: asyncpg.Record) -> SharedBlob:
    return SharedBlob(
        row["digest"], row["size"], row["media_type"], row["private"], row["marked_at"]
    )


def _lease(row: asyncpg.Record, *, ours: bool) -> Lease:
    return Lease(row["key"], row["holder"], row["token"], row["expires_at"], ours)


def _payload(key: str) -> str:
    """What announces the end of `key`'s lease: the key, or a hash of a key too long for a
    payload (no key starts with "hashed:")."""
    encoded = key.encode()
    if len(encoded) <= PAYLOAD_MAX:
        return key
    return "hashed:sha256:" + hashlib.sha256(encoded).hexdigest()


def _describe(exc: BaseException) -> str:
    # A timeout's message is empty; an OSError's is the useful part.
    return str(exc) or type(exc).__name__
