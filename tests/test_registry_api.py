"""The /v2/ API surface: routes, bad input, push refusal, error JSON, stray TLS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from upstream_registry import free_loopback_port

DIGEST = "sha256:" + "a" * 64
# A TLS 1.2 ClientHello prefix, as podman sends before falling back to plain HTTP.
CLIENT_HELLO = bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\x00\x00\x02\x00\x2f\x01\x00"


@pytest.fixture
async def mirror(make_mirror: Callable[..., Any]) -> Any:
    """A mirror whose upstream (standing in for docker.io) is a closed loopback port:
    nothing can come from upstream."""
    return await make_mirror(f"http://127.0.0.1:{free_loopback_port()}", hosts=("docker.io",))


async def test_ping(mirror: Any) -> None:
    resp = await mirror.get("/v2/")
    assert resp.status == 200
    assert await resp.json() == {}
    assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/manifests/latest", 400, "NAME_INVALID"),
        ("GET", f"/v2/{'a' * 256}/manifests/latest", 400, "NAME_INVALID"),
        # A reference that is neither tag nor digest names no manifest, and is not asked
        # upstream (which would answer 502 here).
        ("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
        ("GET", f"/v2/a/manifests/{'t' * 129}", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/sha256:abc", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/md5:" + "a" * 32, 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/blobs/sha256:ABC", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/latest", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/referrers/latest", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/tags/list?n=ten", 400, "PAGINATION_NUMBER_INVALID"),
        ("PUT", "/v2/a/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/a/manifests/{DIGEST}", 405, "UNSUPPORTED"),
        ("POST", "/v2/a/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/a/blobs/uploads/some-uuid", 405, "UNSUPPORTED"),
        ("PUT", f"/v2/a/blobs/uploads/some-uuid?digest={DIGEST}", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/a/blobs/{DIGEST}", 405, "UNSUPPORTED"),
        ("GET", "/v2/a/nothing-here", 404, "UNSUPPORTED"),
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
        ("GET", "/v2/a/manifests/latest", 502, "UPSTREAM_UNAVAILABLE"),
        ("GET", f"/v2/a/blobs/{DIGEST}", 502, "UPSTREAM_UNAVAILABLE"),
        ("GET", "/v2/a/tags/list", 502, "UPSTREAM_UNAVAILABLE"),
        ("GET", f"/v2/a/referrers/{DIGEST}", 502, "UPSTREAM_UNAVAILABLE"),
    ],
)
async def test_errors_are_oci_json(
    mirror: Any, tmp_path: Path, method: str, path: str, status: int, code: str
) -> None:
    resp = await mirror.request(method, path, data=b"x" if method in ("PUT", "PATCH") else None)
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    body = await resp.json()
    (error,) = body["errors"]
    assert error["code"] == code
    assert error["message"]
    if status == 502:
        assert "unreachable" in error["message"]
    assert not (tmp_path / "cache" / "blobs").exists()  # bad input changes nothing
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_head_errors_have_status_and_no_body(mirror: Any) -> None:
    resp = await mirror.head("/v2/UPPER/manifests/latest")
    assert resp.status == 400
    assert await resp.read() == b""


async def test_unknown_query_parameters_are_ignored(mirror: Any) -> None:
    resp = await mirror.get("/v2/?ns=docker.io&whatever=1")
    assert resp.status == 200
    # Reaches the (closed) upstream rather than failing on the query: 502, not 400.
    resp = await mirror.get("/v2/library/alpine/manifests/latest?ns=docker.io&x=y")
    assert resp.status == 502
    assert resp.headers["OCI-Namespace"] == "docker.io"


async def test_a_namespace_no_upstream_serves_is_named(mirror: Any) -> None:
    resp = await mirror.get("/v2/library/alpine/manifests/latest?ns=quay.io")
    assert resp.status == 404
    [error] = (await resp.json())["errors"]
    assert error["code"] == "NAME_UNKNOWN"
    assert "quay.io" in error["message"]
    assert "OCI-Namespace" not in resp.headers


async def test_stray_tls_handshake_does_not_disturb(mirror: Any) -> None:
    port = mirror.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CLIENT_HELLO)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), timeout=5)
    assert answer == b"" or answer.startswith(b"HTTP/1.")  # a 400 or a close, nothing worse
    writer.close()
    await writer.wait_closed()
    for _ in range(3):
        resp = await mirror.get("/v2/")
        assert resp.status == 200
