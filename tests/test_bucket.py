"""mirror/shared/bucket.py against moto's S3 server (and radosgw, when it is there)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from engines import S3Endpoint, StallingProxy, s3_client
from moto_ecr import MotoServer, apply_aws_env

import mirror.shared.bucket as bucket_module
from mirror.reference import Digest, digest_of, parse_digest
from mirror.shared.bucket import (
    Bucket,
    BucketBody,
    BucketObject,
    BucketUnavailable,
    ObjectMissing,
)

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
MiB = 1 << 20
WAIT = 10.0  # the longest any step of these tests may take
# Keys for a store that takes any (moto) or is never reached.
DUMMY_KEYS = S3Endpoint("http://127.0.0.1:9", "AKIAMOTOTESTING00000", "secret", "us-east-1")


def use_credentials(monkeypatch: pytest.MonkeyPatch, endpoint: S3Endpoint, home: Path) -> None:
    """The endpoint's keys in the environment, where the standard chain finds them first;
    no file, profile or metadata service of the machine is consulted."""
    apply_aws_env(monkeypatch, endpoint.url, home, region=endpoint.region)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoint.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoint.secret_key)


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files over 1 MiB go up in parts of 5 MiB, S3's smallest."""
    monkeypatch.setattr(bucket_module, "MULTIPART_THRESHOLD", 1 * MiB)
    monkeypatch.setattr(bucket_module, "PART_SIZE", 5 * MiB)


@pytest.fixture
def quick_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeouts and one retry: an unreachable bucket is known within seconds."""
    monkeypatch.setattr(bucket_module, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(bucket_module, "READ_TIMEOUT", 1.0)
    monkeypatch.setattr(bucket_module, "MAX_ATTEMPTS", 2)


@pytest.fixture(params=["moto_s3", "radosgw"])
def engine(request: pytest.FixtureRequest) -> S3Endpoint:
    """Each S3 store in turn: moto, fast, and radosgw, which is what operators run (it
    ignores If-None-Match when a multipart upload completes)."""
    endpoint: S3Endpoint = request.getfixturevalue(request.param)
    return endpoint


@pytest.fixture
async def bucket(
    engine: S3Endpoint, s3_bucket_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[Bucket]:
    use_credentials(monkeypatch, engine, tmp_path)
    store = Bucket(s3_bucket_name, prefix="fleet", endpoint_url=engine.url)
    await store.open()
    yield store
    await store.close()


async def read_all(body: BucketBody) -> bytes:
    try:
        async with asyncio.timeout(WAIT):
            return b"".join([chunk async for chunk in body.chunks()])
    finally:
        body.close()


async def listing(bucket: Bucket) -> list[tuple[Digest, int]]:
    keys = bucket.keys()
    async with asyncio.timeout(WAIT):
        return [item async for item in keys]


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def pending_uploads(endpoint: S3Endpoint, name: str) -> list[Any]:
    uploads: list[Any] = s3_client(endpoint).list_multipart_uploads(Bucket=name).get("Uploads", [])
    return uploads


def stored(endpoint: S3Endpoint, name: str, key: str) -> bytes:
    body: bytes = s3_client(endpoint).get_object(Bucket=name, Key=key)["Body"].read()
    return body


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """A loopback port that accepts connections and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def closed_port() -> str:
    """A loopback port nothing listens on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return f"http://127.0.0.1:{listener.getsockname()[1]}"


# --------------------------------------------------------------------------- layout


def test_key_layout_is_prefix_algorithm_fanout_hex() -> None:
    digest = digest_of(b"layer")
    assert (
        Bucket("b", prefix="/fleet/").key(digest)
        == f"fleet/blobs/sha256/{digest.hex[:2]}/{digest.hex}"
    )
    assert Bucket("b").key(digest) == f"blobs/sha256/{digest.hex[:2]}/{digest.hex}"


# --------------------------------------------------------------------------- opening


async def test_open_creates_a_missing_bucket(
    engine: S3Endpoint, s3_bucket_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_credentials(monkeypatch, engine, tmp_path)
    absent = Bucket(s3_bucket_name, endpoint_url=engine.url)
    with pytest.raises(BucketUnavailable, match="does not exist"):
        await absent.open(create=False)

    store = Bucket(s3_bucket_name, endpoint_url=engine.url)
    await store.open()
    try:
        s3_client(engine).head_bucket(Bucket=s3_bucket_name)
        again = Bucket(s3_bucket_name, endpoint_url=engine.url)  # it exists now: no error
        await again.open()
        await again.close()
    finally:
        await store.close()


# --------------------------------------------------------------------------- put, head, read


async def test_put_bytes_then_head_and_read_whole_and_from_an_offset(bucket: Bucket) -> None:
    data = b'{"schemaVersion":2}' * 100
    digest = digest_of(data)
    assert await bucket.head(digest) is None

    assert await bucket.put_bytes(digest, data, MANIFEST) is True

    assert await bucket.head(digest) == BucketObject(len(data), MANIFEST)
    whole = await bucket.read(digest)
    assert (whole.start, whole.length) == (0, len(data))
    assert await read_all(whole) == data
    tail = await bucket.read(digest, 1000)
    assert (tail.start, tail.length) == (1000, len(data) - 1000)
    assert await read_all(tail) == data[1000:]


async def test_put_file_then_read(bucket: Bucket, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    digest = digest_of(data)

    assert await bucket.put_file(digest, write_file(tmp_path / "blob", data), LAYER) is True

    assert await bucket.head(digest) == BucketObject(len(data), LAYER)
    body = await bucket.read(digest)
    chunks = [chunk async for chunk in body.chunks()]
    body.close()
    assert b"".join(chunks) == data
    assert max(len(chunk) for chunk in chunks) <= bucket_module.CHUNK_SIZE
    assert await read_all(await bucket.read(digest, 2 * MiB)) == data[2 * MiB :]


async def test_an_existing_key_is_never_overwritten(bucket: Bucket, tmp_path: Path) -> None:
    first = b"the verified bytes"
    digest = digest_of(first)
    assert await bucket.put_bytes(digest, first, LAYER) is True

    assert await bucket.put_bytes(digest, b"other bytes", MANIFEST) is False
    assert (
        await bucket.put_file(digest, write_file(tmp_path / "other", b"other"), MANIFEST) is False
    )

    assert await bucket.head(digest) == BucketObject(len(first), LAYER)
    assert await read_all(await bucket.read(digest)) == first


async def test_a_missing_key_raises_object_missing(bucket: Bucket) -> None:
    with pytest.raises(ObjectMissing):
        await bucket.read(digest_of(b"never stored"))


async def test_delete(bucket: Bucket) -> None:
    data = b"to be evicted"
    digest = digest_of(data)
    await bucket.put_bytes(digest, data, LAYER)

    await bucket.delete(digest)

    assert await bucket.head(digest) is None
    with pytest.raises(ObjectMissing):
        await bucket.read(digest)
    await bucket.delete(digest)  # gone already: no error


# --------------------------------------------------------------------------- multipart


@pytest.mark.usefixtures("small_parts")
async def test_a_big_file_goes_up_in_parts(
    bucket: Bucket, engine: S3Endpoint, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    digest = digest_of(data)

    assert await bucket.put_file(digest, write_file(tmp_path / "big", data), LAYER) is True

    head = s3_client(engine).head_object(Bucket=bucket.name, Key=bucket.key(digest))
    assert head["ETag"].strip('"').endswith("-2")  # a multipart object's ETag counts its parts
    assert await bucket.head(digest) == BucketObject(len(data), LAYER)
    assert await read_all(await bucket.read(digest)) == data
    assert await read_all(await bucket.read(digest, 5 * MiB + 7)) == data[5 * MiB + 7 :]
    assert pending_uploads(engine, bucket.name) == []


@pytest.mark.usefixtures("small_parts")
async def test_a_big_file_under_an_existing_key_is_not_uploaded(
    bucket: Bucket, engine: S3Endpoint, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    digest = digest_of(data)
    assert await bucket.put_bytes(digest, b"first", LAYER) is True

    assert await bucket.put_file(digest, write_file(tmp_path / "big", data), LAYER) is False

    assert await read_all(await bucket.read(digest)) == b"first"
    assert pending_uploads(engine, bucket.name) == []


@pytest.mark.usefixtures("small_parts")
async def test_a_key_written_during_a_multipart_upload_is_kept(
    engine: S3Endpoint, s3_bucket_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another replica completes the same key while this one uploads parts: this one
    sees it before completing, aborts and answers False; the other's object stays."""
    use_credentials(monkeypatch, engine, tmp_path)
    data = os.urandom(6 * MiB)
    digest = digest_of(data)
    source = write_file(tmp_path / "big", data)
    async with StallingProxy(engine.url, limit=5 * MiB + MiB // 2) as proxy:
        store = Bucket(s3_bucket_name, endpoint_url=proxy.url)
        await store.open()
        try:
            upload = asyncio.create_task(store.put_file(digest, source, LAYER))
            async with asyncio.timeout(WAIT):
                await proxy.stalled.wait()
            s3_client(engine).put_object(Bucket=s3_bucket_name, Key=store.key(digest), Body=b"won")
            proxy.release()
            async with asyncio.timeout(WAIT):
                assert await upload is False
        finally:
            await store.close()

    assert stored(engine, s3_bucket_name, store.key(digest)) == b"won"
    assert pending_uploads(engine, s3_bucket_name) == []


@pytest.mark.usefixtures("small_parts")
async def test_a_cancelled_multipart_upload_leaves_nothing(
    engine: S3Endpoint, s3_bucket_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_credentials(monkeypatch, engine, tmp_path)
    data = os.urandom(6 * MiB)
    digest = digest_of(data)
    source = write_file(tmp_path / "big", data)
    async with StallingProxy(engine.url, limit=5 * MiB + MiB // 2) as proxy:
        store = Bucket(s3_bucket_name, endpoint_url=proxy.url)
        await store.open()
        try:
            upload = asyncio.create_task(store.put_file(digest, source, LAYER))
            async with asyncio.timeout(WAIT):
                await proxy.stalled.wait()
            assert len(pending_uploads(engine, s3_bucket_name)) == 1  # caught mid-upload

            upload.cancel()
            async with asyncio.timeout(WAIT):
                with pytest.raises(asyncio.CancelledError):
                    await upload
        finally:
            await store.close()

    assert pending_uploads(engine, s3_bucket_name) == []
    assert "Contents" not in s3_client(engine).list_objects_v2(Bucket=s3_bucket_name)


# --------------------------------------------------------------------------- URLs, listing


async def test_a_presigned_url_serves_the_bytes(bucket: Bucket) -> None:
    data = b"served around the mirror"
    digest = digest_of(data)
    await bucket.put_bytes(digest, data, LAYER)

    url = await bucket.presigned_get(digest, ttl=60)

    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url) as response,
    ):
        assert response.status == 200
        assert await response.read() == data


async def test_keys_lists_every_blob_under_the_prefix(
    bucket: Bucket, engine: S3Endpoint, tmp_path: Path
) -> None:
    blobs = {digest_of(data): len(data) for data in (b"a", b"bb", b"ccc")}
    for digest, size in blobs.items():
        await bucket.put_bytes(digest, b"x" * size, LAYER)
    other = Bucket(bucket.name, prefix="elsewhere", endpoint_url=engine.url)
    await other.open()
    try:
        await other.put_bytes(digest_of(b"not ours"), b"not ours", LAYER)
    finally:
        await other.close()
    stray = f"{bucket.prefix}blobs/sha256/zz/not-a-digest"
    s3_client(engine).put_object(Bucket=bucket.name, Key=stray, Body=b"?")

    listed = await listing(bucket)

    assert dict(listed) == blobs
    assert len(listed) == len(blobs)


async def test_keys_reads_back_sha512_digests(bucket: Bucket) -> None:
    digest = parse_digest("sha512:" + "ab" * 64)
    await bucket.put_bytes(digest, b"x", LAYER)

    assert await listing(bucket) == [(digest, 1)]


# --------------------------------------------------------------------------- unavailable


@pytest.mark.usefixtures("quick_failure")
async def test_a_stopped_store_is_unavailable_within_seconds(
    s3_bucket_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "moto").mkdir()
    with MotoServer(tmp_path / "moto") as server:
        use_credentials(monkeypatch, DUMMY_KEYS, tmp_path)
        store = Bucket(s3_bucket_name, endpoint_url=server.url)
        await store.open()
        try:
            digest = digest_of(b"kept")
            await store.put_bytes(digest, b"kept", LAYER)
            await asyncio.to_thread(server.stop)

            for call in (
                store.head(digest),
                store.read(digest),
                store.put_bytes(digest_of(b"new"), b"new", LAYER),
            ):
                await assert_unavailable_soon(call)
        finally:
            await store.close()


@pytest.mark.usefixtures("quick_failure")
async def test_a_refused_or_silent_endpoint_is_unavailable_within_seconds(
    s3_bucket_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_credentials(monkeypatch, DUMMY_KEYS, tmp_path)
    await assert_unavailable_soon(Bucket(s3_bucket_name, endpoint_url=closed_port()).open())
    with silent_listener() as url:
        await assert_unavailable_soon(Bucket(s3_bucket_name, endpoint_url=url).open())


async def assert_unavailable_soon(call: Any) -> None:
    started = time.monotonic()
    with pytest.raises(BucketUnavailable):
        async with asyncio.timeout(WAIT):
            await call
    assert time.monotonic() - started < WAIT
