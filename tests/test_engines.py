"""The fleet engines work: each S3 store keeps objects and signs URLs, radosgw checks the
signatures, PostgreSQL keeps its data across a restart, and the gateway can be stopped."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
from engines import Postgres, Radosgw, S3Endpoint, s3_client


def fetch(url: str, timeout: float = 10.0) -> bytes:
    """GET without any proxy of the machine (loopback only)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def presigned_get(endpoint: S3Endpoint, bucket: str, key: str) -> str:
    url: str = s3_client(endpoint).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=60
    )
    return url


def put_and_get(endpoint: S3Endpoint, bucket: str) -> None:
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="blobs/a", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="blobs/a")["Body"].read() == b"hello"
    assert fetch(presigned_get(endpoint, bucket, "blobs/a")) == b"hello"


def test_moto_s3_keeps_objects_and_signs_urls(moto_s3: S3Endpoint, s3_bucket_name: str) -> None:
    put_and_get(moto_s3, s3_bucket_name)


def tampered(url: str) -> str:
    """`url` with one hex digit of its signature changed."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    signature = query["X-Amz-Signature"]
    query["X-Amz-Signature"] = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_radosgw_keeps_objects_and_checks_signatures(radosgw: Radosgw, s3_bucket_name: str) -> None:
    put_and_get(radosgw, s3_bucket_name)
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(tampered(presigned_get(radosgw, s3_bucket_name, "blobs/a")))
    assert refused.value.code == 403


def test_radosgw_gateway_stops_and_starts(radosgw: Radosgw, s3_bucket_name: str) -> None:
    client = s3_client(radosgw, timeout=5)
    client.create_bucket(Bucket=s3_bucket_name)
    client.put_object(Bucket=s3_bucket_name, Key="kept", Body=b"kept")
    radosgw.stop()
    try:
        with pytest.raises(urllib.error.URLError):
            fetch(presigned_get(radosgw, s3_bucket_name, "kept"), timeout=5)
    finally:
        radosgw.start()
    assert client.get_object(Bucket=s3_bucket_name, Key="kept")["Body"].read() == b"kept"


def test_buckets_are_per_test(moto_s3: S3Endpoint, s3_bucket_name: str) -> None:
    client = s3_client(moto_s3)
    names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert s3_bucket_name not in names


async def test_postgres_survives_a_restart(postgres: Postgres, database_url: str) -> None:
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        await connection.execute("CREATE TABLE seen (digest text PRIMARY KEY)")
        await connection.execute("INSERT INTO seen VALUES ('sha256:a')")
    finally:
        await connection.close(timeout=10)
    await asyncio.to_thread(postgres.stop)
    with pytest.raises(OSError):
        await asyncpg.connect(database_url, timeout=10)
    await asyncio.to_thread(postgres.start)
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        assert await connection.fetchval("SELECT digest FROM seen") == "sha256:a"
    finally:
        await connection.close(timeout=10)


async def test_each_test_has_its_own_database(postgres: Postgres, database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    assert name.startswith("test_")
    assert database_url == f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/{name}"
    listed = postgres.sql("SELECT datname FROM pg_database WHERE datname LIKE 'test_%'")
    assert name in listed.split()
