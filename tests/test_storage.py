"""The blob store (verified atomic commit) and the SQLite index (batched access times)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import aiosqlite
import pytest

from mirror.errors import ConfigError
from mirror.reference import Digest, digest_of
from mirror.storage.blobs import BlobStore, DigestMismatch
from mirror.storage.index import BlobRow, Index
from mirror.storage.lock import LOCK_FILE, storage_locked
from mirror.storage.reconcile import reconcile


def make_store(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path / "cache")
    store.open()
    return store


def test_layout(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    digest = Digest("sha256", "ab" + "0" * 62)
    assert store.path(digest) == tmp_path / "cache" / "blobs" / "sha256" / "ab" / digest.hex


def test_write_commit_and_size(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = os.urandom(100_000)
    digest = digest_of(data)
    assert store.size(digest) is None
    writer = store.writer(digest)
    for start in range(0, len(data), 4096):
        writer.write(data[start : start + 4096])
    assert not store.path(digest).exists()  # invisible until committed
    writer.check(len(data))
    path = writer.commit()
    writer.close()
    assert path.read_bytes() == data
    assert store.size(digest) == len(data)
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("kind", ["wrong bytes", "wrong length"])
def test_mismatch_caches_nothing(tmp_path: Path, kind: str) -> None:
    store = make_store(tmp_path)
    data = os.urandom(10_000)
    digest = digest_of(data)
    writer = store.writer(digest)
    writer.write(os.urandom(10_000) if kind == "wrong bytes" else data)
    with pytest.raises(DigestMismatch) as caught:
        writer.check(len(data) if kind == "wrong bytes" else len(data) + 1)
    assert caught.value.status == 502
    writer.close()
    assert store.size(digest) is None
    assert list(store.tmp.iterdir()) == []


def test_sha512(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = b"hello"
    digest = Digest("sha512", hashlib.sha512(data).hexdigest())
    assert store.write(digest, data).read_bytes() == data


def test_open_removes_interrupted_downloads(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = store.writer(digest_of(b"x"))
    writer.write(b"partial")
    assert len(list(store.tmp.iterdir())) == 1
    make_store(tmp_path)  # a restart after a crash
    assert list(store.tmp.iterdir()) == []


async def test_index_blobs_tags_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    index = Index(path)
    await index.open()
    digest = digest_of(b"manifest")
    assert await index.blob(digest) is None
    await index.add_blob(digest, 8, "application/vnd.oci.image.manifest.v1+json")
    await index.add_blob(digest, 8)  # a later plain-blob write keeps the media type
    row = await index.blob(digest)
    assert row is not None
    assert (row.size, row.media_type) == (8, "application/vnd.oci.image.manifest.v1+json")
    await index.set_tag("hub", "library/alpine", "3.20", digest, "application/x")
    await index.close()

    reopened = Index(path)
    await reopened.open()
    tag = await reopened.tag("hub", "library/alpine", "3.20")
    assert tag is not None
    assert (tag.digest, tag.media_type) == (str(digest), "application/x")
    assert time.time() - tag.checked_at < 60
    assert await reopened.tag("other", "library/alpine", "3.20") is None  # keyed per upstream
    await reopened.close()


class BusyReader:
    """A reader connection that finds the database busy, as during a WAL recovery."""

    def execute(self, *args: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    def close(self) -> None:
        pass


async def test_a_read_that_finds_the_database_busy_goes_through_aiosqlite(
    tmp_path: Path,
) -> None:
    index = Index(tmp_path / "index.db")
    await index.open()
    digest = digest_of(b"manifest")
    await index.add_blob(digest, 8, "application/x")
    await index.set_tag("hub", "library/alpine", "3", digest, "application/x")
    reader, index._reader = index._reader, BusyReader()  # type: ignore[assignment]
    try:
        assert await index.blob(digest) == BlobRow(str(digest), 8, "application/x")
        tag = await index.tag("hub", "library/alpine", "3")
        assert tag is not None and tag.digest == str(digest)
        assert (await index.usage()).blobs == 1
    finally:
        index._reader = reader
    await index.close()


async def test_the_first_media_type_recorded_for_a_digest_stays(tmp_path: Path) -> None:
    """The type belongs to the content: a later write, through whatever upstream, keeps it
    and says which type the row holds."""
    index = Index(tmp_path / "index.db")
    await index.open()
    digest = digest_of(b"manifest")
    oci = "application/vnd.oci.image.manifest.v1+json"
    try:
        assert await index.add_blob(digest, 8) is None  # first fetched as a plain blob
        assert await index.add_blob(digest, 8, oci) == oci
        assert await index.add_blob(digest, 8, "application/octet-stream") == oci
        row = await index.blob(digest)
        assert row is not None and row.media_type == oci
    finally:
        await index.close()  # its thread would keep the test process alive


async def test_touch_is_batched_and_flushed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    index = Index(path)
    await index.open()
    digest = digest_of(b"blob")
    await index.add_blob(digest, 4)
    before = await _last_access(path, digest)
    await asyncio.sleep(0.01)
    index.touch(digest)  # synchronous: a hit never waits for SQLite
    assert await _last_access(path, digest) == before
    await index.close()
    assert await _last_access(path, digest) > before


async def test_index_uses_wal(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.db")
    await index.open()
    async with index.db.execute("PRAGMA journal_mode") as cursor:
        assert await cursor.fetchone() == ("wal",)
    await index.close()


async def _last_access(path: Path, digest: Digest) -> float:
    async with (
        aiosqlite.connect(path) as db,
        db.execute("SELECT last_access FROM blobs WHERE digest = ?", (str(digest),)) as cursor,
    ):
        row = await cursor.fetchone()
    assert row is not None
    return float(row[0])


async def test_reconcile_makes_index_and_files_agree(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    index = Index(tmp_path / "cache" / "index.db")
    await index.open()
    kept, lost, stray, corrupt = (os.urandom(1000 + n) for n in range(4))
    for data in (kept, lost):
        store.write(digest_of(data), data)
        await index.add_blob(digest_of(data), len(data))
    store.remove(digest_of(lost))  # a row with no file
    store.write(digest_of(stray), stray)  # a file with no row, intact: adopted
    bad = store.path(digest_of(corrupt))  # a file with no row, wrong bytes: removed
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not what the name says")
    (bad.parent / "junk.txt").write_text("foreign")
    (store.tmp / "half-a-download").write_bytes(b"x" * 10)
    await index.db.execute("UPDATE totals SET bytes = 1, blobs = 99")  # a lost update
    await index.db.commit()

    store.open()  # as at start: temp files go
    result = await reconcile(store, index)
    assert (result.blobs, result.dropped_rows, result.adopted_files, result.removed_files) == (
        2,
        1,
        1,
        1,
    )
    assert await index.digests() == {str(digest_of(kept)), str(digest_of(stray))}
    files = {p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "blobs" in p.parts}
    assert files == {store.path(digest_of(kept)), store.path(digest_of(stray))}
    assert list(store.tmp.iterdir()) == []
    usage = await index.usage()
    assert (usage.bytes, usage.blobs) == (len(kept) + len(stray), 2)
    await index.close()


async def test_totals_follow_every_change(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.db")
    await index.open()
    a, b = digest_of(b"a"), digest_of(b"b")
    await index.add_blob(a, 100)
    await index.add_blob(b, 50)
    await index.add_blob(a, 120)  # rewritten: its size changes, it is not counted twice
    assert (await index.usage()).bytes == 170
    await index.remove_blobs([str(b)])
    usage = await index.usage()
    assert (usage.bytes, usage.blobs) == (120, 1)
    await index.close()
    reopened = Index(tmp_path / "index.db")
    await reopened.open()
    assert (await reopened.usage()).bytes == 120  # exact across restarts
    await reopened.close()


def test_the_storage_lock_admits_one_holder_at_a_time(tmp_path: Path) -> None:
    root = tmp_path / "new" / "cache"  # created by the lock, as by a first start
    with storage_locked(root):
        assert (root / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError) as caught, storage_locked(root):
            pass
        assert str(caught.value) == (
            f"storage.path: {root} is in use by another mirror serve (pid {os.getpid()})"
        )
        assert (root / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the holder's, still
    with storage_locked(root):  # released with the block
        pass
    (tmp_path / "file").write_text("")
    refused = pytest.raises(ConfigError, match=r"^storage.path: cannot use .*: Not a directory")
    with refused, storage_locked(tmp_path / "file" / "cache"):
        pass
