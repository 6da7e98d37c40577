"""The fleet engines work: each S3 store keeps objects and signs URLs."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import asyncpg
import pytest
from engines import Postgres, S3Endpoint, s3_client


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
