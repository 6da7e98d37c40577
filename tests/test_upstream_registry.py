"""Tests for the test helper itself: a real docker-registry, real pushes, real skopeo."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from upstream_registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryError,
    RegistryProcess,
    dir_digests,
    parse_access_line,
    push_image,
    push_index,
    require_tool,
    skopeo_copy_async,
)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path / "upstream") as reg:
        yield reg


async def get_manifest(url: str, name: str, ref: str, accept: str) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v2/{name}/manifests/{ref}", headers={"Accept": accept}) as resp,
    ):
        return resp.status, resp.headers.get("Docker-Content-Digest", ""), await resp.read()


def test_parse_access_line() -> None:
    line = (
        '127.0.0.1 - - [22/Nov/2026:18:08:47 +0000] "GET /v2/a/b/blobs/sha256:'
        + "0" * 64
        + '?x=1 HTTP/1.1" 200 65536 "" "skopeo/1.9.3"\n'
    )
    req = parse_access_line(line)
    assert req is not None
    assert (req.method, req.path, req.query) == ("GET", f"/v2/a/b/blobs/sha256:{'0' * 64}", "x=1")
    assert (req.status, req.size, req.user_agent) == (200, 65536, "skopeo/1.9.3")
    assert parse_access_line('time="2026-11-22T18:08:45Z" level=warning msg="x"') is None


async def test_push_pull_count_restart(registry: RegistryProcess, tmp_path: Path) -> None:
    img = await push_image(registry.url, "lib/small", "v1", [64 * 1024, 200 * 1024])
    assert img.layer_sizes == [64 * 1024, 200 * 1024]

    status, digest, body = await get_manifest(registry.url, "lib/small", "v1", OCI_MANIFEST)
    assert (status, digest, body) == (200, img.manifest_digest, img.manifest_bytes)

    await registry.settle()
    registry.reset_counts()
    await skopeo_copy_async(f"{registry.host}/{img.reference}", tmp_path / "pulled")
    assert img.blob_digests() | {img.manifest_digest} <= dir_digests(tmp_path / "pulled")

    await registry.settle()
    # skopeo 1.9 makes one GET per blob (two layers + config) and no HEADs.
    assert registry.blob_gets("lib/small") == 3
    assert registry.blob_gets("other") == 0
    assert registry.count("GET", "/manifests/") == 1
    assert registry.count("HEAD", "/v2/") == 0

    registry.restart()
    status, digest, _ = await get_manifest(registry.url, "lib/small", "v1", OCI_MANIFEST)
    assert (status, digest) == (200, img.manifest_digest)


async def test_stopped_registry_refuses_connections(registry: RegistryProcess) -> None:
    registry.stop()
    assert not registry.running
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_manifest(registry.url, "x", "y", OCI_MANIFEST)
    registry.start()
    status, _, _ = await get_manifest(registry.url, "x", "y", OCI_MANIFEST)
    assert status == 404


async def test_index_all_platforms(registry: RegistryProcess, tmp_path: Path) -> None:
    idx = await push_index(registry.url, "lib/multi", "latest")
    assert len(idx.child_digests) == 2

    status, digest, body = await get_manifest(registry.url, "lib/multi", "latest", OCI_INDEX)
    assert (status, digest) == (200, idx.manifest_digest)
    platforms = [m["platform"]["architecture"] for m in json.loads(body)["manifests"]]
    assert platforms == ["amd64", "arm64"]

    await skopeo_copy_async(f"{registry.host}/{idx.reference}", tmp_path / "all", all_images=True)
    assert idx.blob_digests() | idx.manifest_digests() <= dir_digests(tmp_path / "all")


async def test_docker_schema2_image(registry: RegistryProcess, tmp_path: Path) -> None:
    # Two chunks plus a remainder exercises the streaming upload path.
    img = await push_image(registry.url, "lib/docker", "v1", [2 * 1024 * 1024 + 3], "docker")
    assert img.media_type == DOCKER_MANIFEST
    await skopeo_copy_async(f"{registry.host}/{img.reference}", tmp_path / "pulled")
    assert img.blob_digests() <= dir_digests(tmp_path / "pulled")


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        reg = RegistryProcess(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(RegistryError, match="address already in use"):
            reg.start()
    assert not reg.running


def test_dir_digests_detects_corrupt_blob(tmp_path: Path) -> None:
    (tmp_path / ("a" * 64)).write_bytes(b"not the content named")
    with pytest.raises(AssertionError, match="has content"):
        dir_digests(tmp_path)


def test_require_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_tool("sh").endswith("/sh")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        require_tool("no-such-tool-xyz")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install"):
        require_tool("no-such-tool-xyz")
