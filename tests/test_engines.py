"""The fleet engines work: each S3 store keeps objects and signs URLs."""

from __future__ import annotations

import urllib.error
import urllib.request

from engines import S3Endpoint, s3_client


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
