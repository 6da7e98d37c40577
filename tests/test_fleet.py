"""Fleet mode end to end: real `mirror serve` replicas sharing one bucket and one PostgreSQL
database, over a real docker-registry, pulled from with skopeo."""

from __future__ import annotations

import asyncio
import base64
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
from conftest import write_htpasswd
from containerd import ContainerdProcess
from engines import Postgres, Radosgw, S3Endpoint, StallingProxy, s3_client
from fleet import (
    Fleet,
    expected,
    get_blob,
    metric,
    readyz,
    shared_block,
    wait_until,
    wait_uploaded,
)
from podman import podman_pull_async, push_tar_image
from upstream_registry import (
    RegistryProcess,
    dir_digests,
    push_image,
    sha256_digest,
    skopeo_copy_async,
)

from mirror.reference import parse_digest
from mirror.shared.bucket import Bucket
from mirror.shared.database import SharedIndex

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

KIB = 1024


@pytest.fixture
def moto_fleet(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    moto_s3: S3Endpoint,
    s3_bucket_name: str,
    database_url: str,
    aws_credentials: Callable[[S3Endpoint], None],
    tmp_path: Path,
) -> Iterator[Fleet]:
    aws_credentials(moto_s3)
    shared = shared_block(moto_s3, s3_bucket_name, database_url)
    yield Fleet(start_mirror_process, tmp_path, registry.url, shared)


async def test_what_one_replica_fetched_the_others_serve_without_the_upstream(
    moto_fleet: Fleet, registry: RegistryProcess, tmp_path: Path
) -> None:
    image = await push_image(registry.url, "fleet/app", "v1", [300 * KIB, 40 * KIB, 5 * KIB])
    replicas = [await moto_fleet.add() for _ in range(3)]
    await registry.settle()
    registry.reset_counts()

    await skopeo_copy_async(f"{replicas[0].host}/{image.reference}", tmp_path / "r0")
    assert dir_digests(tmp_path / "r0") == expected(image)
    await registry.settle()
    assert registry.blob_gets(image.name) == len(image.blob_digests())
    await wait_uploaded(replicas[0], len(image.blob_digests()) + 1)  # and the manifest

    registry.reset_counts()
    for n, replica in enumerate(replicas[1:], 1):
        await skopeo_copy_async(f"{replica.host}/{image.reference}", tmp_path / f"r{n}")
        assert dir_digests(tmp_path / f"r{n}") == expected(image)
    await registry.settle()
    # Not a blob, not a manifest, not even a HEAD of the tag: replica 0 checked it just
    # now, within tag_ttl, for the whole fleet.
    assert registry.requests() == [], replicas[1].log()
    for replica in replicas[1:]:
        assert metric(replica, "mirror_cache_requests_total", kind="blob", result="shared") == len(
            image.blob_digests()
        )
        assert readyz(replica) == {"ready": True, "problems": []}


async def test_a_replicas_own_hits_keep_the_shared_copy_in_use(
    moto_fleet: Fleet, registry: RegistryProcess, database_url: str
) -> None:
    """Served from a replica's own cache, a blob and a manifest are still in use for the
    fleet: the shared tier's eviction, least recently used first, must not take what
    every replica serves itself."""
    image = await push_image(registry.url, "fleet/hot", "v1", [20 * KIB])
    replica = await moto_fleet.add()
    layer = image.layer_digests[0]
    assert await asyncio.to_thread(get_blob, replica, image.name, layer) is not None
    url = f"{replica.url}/v2/{image.name}/manifests/{image.manifest_digest}"

    def get_manifest() -> None:
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()

    await asyncio.to_thread(get_manifest)
    await wait_uploaded(replica, 2)  # the layer and the manifest
    db = await asyncpg.connect(database_url)
    try:
        query = "SELECT last_access FROM blobs WHERE digest = $1"
        before = [await db.fetchval(query, d) for d in (layer, image.manifest_digest)]
        await asyncio.sleep(1.1)
        for _ in range(2):  # local hits, from disk and from memory
            assert await asyncio.to_thread(get_blob, replica, image.name, layer) is not None
            await asyncio.to_thread(get_manifest)
        hits = [
            metric(replica, "mirror_cache_requests_total", kind=k, result="hit")
            for k in ("blob", "manifest")
        ]
        assert hits == [2, 2], replica.log()[-3000:]
        replica.stop()  # its last accesses are written as it closes
        after = [await db.fetchval(query, d) for d in (layer, image.manifest_digest)]
    finally:
        await db.close()
    assert after[0] > before[0] + 1 and after[1] > before[1] + 1, (before, after)


async def test_without_its_database_a_replica_serves_alone_then_shares_again(
    moto_fleet: Fleet, registry: RegistryProcess, postgres: Postgres, tmp_path: Path
) -> None:
    alone = await push_image(registry.url, "fleet/alone", "v1", [64 * KIB, 3 * KIB])
    later = await push_image(registry.url, "fleet/later", "v1", [32 * KIB, 2 * KIB])
    replicas = [await moto_fleet.add() for _ in range(2)]
    postgres.stop()
    try:
        await skopeo_copy_async(f"{replicas[0].host}/{alone.reference}", tmp_path / "alone")
        assert dir_digests(tmp_path / "alone") == expected(alone)
        status = readyz(replicas[0])
        assert status["ready"] is True
        assert any("database" in note for note in status["degraded"]), status
        assert metric(replicas[0], "mirror_shared_degraded", part="database") == 1
    finally:
        postgres.start()
    await wait_until(lambda: "degraded" not in readyz(replicas[0]), "recovered")
    assert metric(replicas[0], "mirror_shared_degraded", part="database") == 0

    await skopeo_copy_async(f"{replicas[0].host}/{later.reference}", tmp_path / "later0")
    await wait_uploaded(replicas[0], len(later.blob_digests()) + 1)
    await registry.settle()
    registry.reset_counts()
    await skopeo_copy_async(f"{replicas[1].host}/{later.reference}", tmp_path / "later1")
    assert dir_digests(tmp_path / "later1") == expected(later)
    await registry.settle()
    assert registry.requests() == [], replicas[1].log()
    assert "unreachable" in replicas[0].log() and "answers again" in replicas[0].log()


async def test_a_tampered_shared_object_is_never_served_and_is_fetched_again(
    moto_fleet: Fleet, registry: RegistryProcess, moto_s3: S3Endpoint, s3_bucket_name: str
) -> None:
    image = await push_image(registry.url, "fleet/tampered", "v1", [200 * KIB])
    layer = image.layer_digests[0]
    first, second = [await moto_fleet.add() for _ in range(2)]
    good = await asyncio.to_thread(get_blob, first, image.name, layer)
    assert good is not None and sha256_digest(good) == layer
    await wait_uploaded(first, 1)
    bucket = Bucket(s3_bucket_name)  # for its key layout alone
    bad = bytearray(good)
    bad[1000] ^= 0xFF  # one bit flipped by rot, or a byte by someone else
    s3_client(moto_s3).put_object(
        Bucket=s3_bucket_name, Key=bucket.key(parse_digest(layer)), Body=bytes(bad)
    )
    await registry.settle()
    registry.reset_counts()

    served = await asyncio.to_thread(get_blob, second, image.name, layer)
    assert served is None or served == good  # never the wrong bytes whole
    again = await asyncio.to_thread(get_blob, second, image.name, layer)
    assert again == good
    await registry.settle()
    assert registry.blob_gets(image.name) == 1  # the bucket's copy was dropped, refetched
    assert "do not match the digest" in second.log()


@pytest.fixture
def rgw_fleet(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    radosgw: Radosgw,
    s3_bucket_name: str,
    database_url: str,
    aws_credentials: Callable[[S3Endpoint], None],
    tmp_path: Path,
) -> Iterator[Fleet]:
    aws_credentials(radosgw)
    shared = shared_block(radosgw, s3_bucket_name, database_url)
    yield Fleet(start_mirror_process, tmp_path, registry.url, shared)


def access_lines(replica: MirrorProcess, digest: str) -> list[str]:
    return [
        line for line in replica.log().splitlines() if "mirror.access" in line and digest in line
    ]


async def test_with_redirect_shared_hits_go_to_the_bucket_for_every_client(
    rgw_fleet: Fleet, registry: RegistryProcess, radosgw: Radosgw, tmp_path: Path
) -> None:
    """skopeo, podman and containerd follow the 307 to radosgw, which checks the
    presigned signature; the replica sends none of the blobs' bytes itself."""
    rgw_fleet.shared["redirect"] = True
    image = await push_tar_image(registry.url, "fleet/redirect", "v1", [6 * KIB, 9 * KIB])
    first, second = [await rgw_fleet.add() for _ in range(2)]
    await skopeo_copy_async(f"{first.host}/{image.reference}", tmp_path / "warm")
    await wait_uploaded(first, len(image.blob_digests()) + 1)
    await registry.settle()
    registry.reset_counts()

    await skopeo_copy_async(f"{second.host}/{image.reference}", tmp_path / "skopeo")
    assert dir_digests(tmp_path / "skopeo") == expected(image)
    podman = await podman_pull_async(
        f"{registry.host}/{image.reference}",
        second.host,
        tmp_path / "podman",
        registry=registry.host,
    )
    assert podman.returncode == 0
    hosts = tmp_path / "certs.d" / registry.host
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        f'[host."{second.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    with ContainerdProcess(tmp_path / "containerd") as containerd:
        pulled = await containerd.pull_async(
            f"{registry.host}/{image.reference}", tmp_path / "certs.d"
        )
    assert image.manifest_digest in pulled, pulled

    await registry.settle()
    assert registry.blob_gets() == 0, second.log()
    for blob in image.blob_digests():
        answers = access_lines(second, blob)
        assert answers and all(" 307 " in line for line in answers), answers
    # Of what the shared tier holds, the replica sent the manifest alone (once: then a hit).
    served = metric(second, "mirror_served_bytes_total", source="shared")
    assert served == len(image.manifest_bytes)


async def test_the_shared_tier_keeps_private_blobs_private(
    moto_fleet: Fleet, registry: RegistryProcess, tmp_path: Path
) -> None:
    """A blob fetched through an authenticated upstream is not a shared hit for a route to
    a public one (which fetches it itself), and is one for an authenticated route."""
    moto_fleet.settings = {
        "auth": {"htpasswd": str(write_htpasswd(tmp_path / "htpasswd"))},
        "upstreams": [
            {"name": "pub", "url": registry.url, "default": True},
            {
                "name": "priv",
                "url": registry.url,
                "prefix": "priv",
                "access": "authenticated",
                "hosts": ["priv.invalid"],
            },
        ],
    }
    image = await push_image(registry.url, "fleet/private", "v1", [50 * KIB])
    layer = image.layer_digests[0]
    first, second = [await moto_fleet.add() for _ in range(2)]
    login = "Basic " + base64.b64encode(b"alice:alice-secret").decode()
    body = await asyncio.to_thread(get_blob, first, f"priv/{image.name}", layer, login)
    assert body is not None and sha256_digest(body) == layer
    await wait_uploaded(first, 1)
    await registry.settle()
    registry.reset_counts()

    public = await asyncio.to_thread(get_blob, second, image.name, layer)
    assert public is not None and sha256_digest(public) == layer
    await registry.settle()
    assert registry.blob_gets(image.name) == 1  # fetched for the public route itself
    assert metric(second, "mirror_shared_lookups_total", result="hit") == 0

    third = await moto_fleet.add()
    private = await asyncio.to_thread(get_blob, third, f"priv/{image.name}", layer, login)
    assert private == body
    assert metric(third, "mirror_cache_requests_total", kind="blob", result="shared") == 1


async def test_without_its_bucket_a_replica_serves_alone_then_shares_again(
    rgw_fleet: Fleet, registry: RegistryProcess, radosgw: Radosgw, tmp_path: Path
) -> None:
    kept = await push_image(registry.url, "fleet/kept", "v1", [40 * KIB])
    alone = await push_image(registry.url, "fleet/nobucket", "v1", [64 * KIB, 3 * KIB])
    later = await push_image(registry.url, "fleet/rgwback", "v1", [32 * KIB])
    first, second = [await rgw_fleet.add() for _ in range(2)]
    await skopeo_copy_async(f"{first.host}/{kept.reference}", tmp_path / "kept0")
    await wait_uploaded(first, len(kept.blob_digests()) + 1)
    radosgw.stop()
    try:
        # A shared hit the bucket cannot serve, and a cold pull: both served all the same.
        await skopeo_copy_async(f"{second.host}/{kept.reference}", tmp_path / "kept1")
        assert dir_digests(tmp_path / "kept1") == expected(kept)
        await skopeo_copy_async(f"{second.host}/{alone.reference}", tmp_path / "alone")
        assert dir_digests(tmp_path / "alone") == expected(alone)
        status = readyz(second)
        assert status["ready"] is True
        assert any("bucket" in note for note in status["degraded"]), status
    finally:
        radosgw.start()
    await wait_until(lambda: "degraded" not in readyz(second), "recovered")
    await wait_until(lambda: "degraded" not in readyz(first), "recovered")

    await skopeo_copy_async(f"{second.host}/{later.reference}", tmp_path / "later1")
    await wait_uploaded(second, len(later.blob_digests()) + 1)
    await registry.settle()
    registry.reset_counts()
    await skopeo_copy_async(f"{first.host}/{later.reference}", tmp_path / "later0")
    assert dir_digests(tmp_path / "later0") == expected(later)
    await registry.settle()
    assert registry.requests() == [], first.log()


def leaders(replicas: list[MirrorProcess]) -> list[MirrorProcess]:
    alive = [r for r in replicas if r.proc.poll() is None]
    return [r for r in alive if metric(r, "mirror_shared_leader") == 1]


async def test_one_leader_keeps_the_shared_budget_and_another_takes_over_when_it_dies(
    moto_fleet: Fleet, registry: RegistryProcess, database_url: str
) -> None:
    max_size = 600 * KIB
    moto_fleet.shared.update(max_size=max_size, eviction_interval="300ms", presign_ttl="1s")
    replicas = [await moto_fleet.add() for _ in range(3)]
    await wait_until(lambda: len(leaders(replicas)) == 1, "one leader")
    index = SharedIndex(database_url)
    await index.open()
    try:
        sampled: list[int] = []
        uploads = dict.fromkeys(range(len(replicas)), 0)
        for n in range(12):
            if n == 5:
                leader = leaders(replicas)[0]
                leader.proc.kill()  # SIGKILL: its session ends, and the lock with it
                leader.proc.wait(timeout=10)
                await wait_until(lambda: len(leaders(replicas)) == 1, "a new leader")
            image = await push_image(registry.url, f"fleet/stream{n}", "v1", [100 * KIB])
            replica = [r for r in replicas if r.proc.poll() is None][n % 2]
            body = await asyncio.to_thread(get_blob, replica, image.name, image.layer_digests[0])
            assert body is not None and sha256_digest(body) == image.layer_digests[0]
            uploads[replicas.index(replica)] += 1
            await wait_uploaded(replica, uploads[replicas.index(replica)])
            await asyncio.sleep(0.4)  # a pass or more
            sampled.append((await index.usage()).bytes)
        # Over by at most what was uploaded between two passes: one blob here.
        assert max(sampled) <= max_size + 100 * KIB, sampled
        survivor = leaders(replicas)[0]
        assert metric(survivor, "mirror_shared_evictions_total") > 0, survivor.log()
    finally:
        await index.close()


async def test_a_replica_killed_mid_upload_leaves_no_object_and_the_next_pull_works(
    moto_fleet: Fleet, registry: RegistryProcess, moto_s3: S3Endpoint, s3_bucket_name: str
) -> None:
    image = await push_image(registry.url, "fleet/killed", "v1", [2048 * KIB])
    layer = image.layer_digests[0]
    key = Bucket(s3_bucket_name).key(parse_digest(layer))
    async with StallingProxy(moto_s3.url, limit=1024 * KIB) as proxy:
        moto_fleet.shared["endpoint_url"] = proxy.url
        doomed = await moto_fleet.add()
        body = await asyncio.to_thread(get_blob, doomed, image.name, layer)
        assert body is not None and sha256_digest(body) == layer  # served; uploading now
        await asyncio.wait_for(proxy.stalled.wait(), 20)
        doomed.proc.kill()
        doomed.proc.wait(timeout=10)
        proxy.release()
    s3 = s3_client(moto_s3)
    listed = s3.list_objects_v2(Bucket=s3_bucket_name).get("Contents", [])
    assert [o["Key"] for o in listed] == [], listed  # nothing, not even part of it

    moto_fleet.shared["endpoint_url"] = moto_s3.url
    survivor = await moto_fleet.add()
    await registry.settle()
    registry.reset_counts()
    again = await asyncio.to_thread(get_blob, survivor, image.name, layer)
    assert again == body
    await wait_uploaded(survivor, 1)
    assert s3.head_object(Bucket=s3_bucket_name, Key=key)["ContentLength"] == len(body)
