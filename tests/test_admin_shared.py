"""`mirror du`, `ls`, `gc` and `verify` in fleet mode: the local cache's part, then the
shared tier's, against a real PostgreSQL (a database per test) and moto's S3 server (a
bucket per test); the tier is seeded directly, through Bucket and SharedIndex."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from engines import S3Endpoint
from upstream_registry import free_loopback_port

from mirror.cli import main
from mirror.reference import digest_of, parse_digest
from mirror.shared.bucket import Bucket
from mirror.shared.database import SharedBlob, SharedIndex
from mirror.storage.index import INDEX_FILE, Index

LAYER = "application/vnd.oci.image.layer.v1.tar"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BUDGET = 1000  # shared.max_size: eviction from 900 bytes down to 800
TIMEOUT = 5.0  # of the test's own index calls
WAIT = 60.0  # the longest one command may take


@dataclass
class Tier:
    """The shared tier of the test, and the config of a replica using it."""

    root: Path
    shared: dict[str, Any]
    bucket: Bucket
    index: SharedIndex

    def flags(self, **changes: Any) -> tuple[str, str]:
        """`--config` of a config file whose `shared:` block has `changes`."""
        path = self.root / "mirror.yaml"
        config = {"storage": {"path": str(self.root / "cache")}, "shared": self.shared | changes}
        path.write_text(yaml.safe_dump(config))
        return ("--config", str(path))

    async def put(
        self, data: bytes, media_type: str = LAYER, *, row: bool = True, private: bool = False
    ) -> str:
        """`data` in the bucket, and its row unless not `row`; its digest."""
        digest = digest_of(data)
        await self.bucket.put_bytes(digest, data, media_type)
        if row:
            await self.index.add_blob(str(digest), len(data), media_type, private)
        return str(digest)

    async def objects(self) -> list[str]:
        return [str(digest) async for digest, _ in self.bucket.keys()]  # noqa: SIM118


@pytest.fixture
async def tier(
    moto_s3: S3Endpoint,
    s3_bucket_name: str,
    database_url: str,
    aws_credentials: Callable[[S3Endpoint], None],
    tmp_path: Path,
) -> AsyncIterator[Tier]:
    aws_credentials(moto_s3)  # the standard AWS chain the command reads: the endpoint's keys
    (tmp_path / "cache").mkdir()
    local = Index(tmp_path / "cache" / INDEX_FILE)  # an empty local cache
    await local.open()
    await local.close()
    shared = {
        "bucket": s3_bucket_name,
        "endpoint_url": moto_s3.url,
        "region": moto_s3.region,
        "database": database_url,
        "prefix": "fleet",
        "max_size": BUDGET,
        "presign_ttl": 0,  # objects marked by one pass are deleted by the next
    }
    bucket = Bucket(s3_bucket_name, prefix="fleet", endpoint_url=moto_s3.url, region=moto_s3.region)
    await bucket.open()
    index = SharedIndex(database_url, timeout=TIMEOUT)
    await index.open()
    try:
        yield Tier(tmp_path, shared, bucket, index)
    finally:
        await index.close()
        await bucket.close()


async def cli(*args: str) -> int:
    async with asyncio.timeout(WAIT):
        return await asyncio.to_thread(main, list(args))


async def json_of(capsys: pytest.CaptureFixture[str], code: int, *args: str) -> Any:
    """The one JSON document a command prints, checking its exit code and a quiet stderr."""
    assert await cli(*args, "--json") == code, args
    out, err = capsys.readouterr()
    assert err == "", err
    return json.loads(out)


async def text_of(capsys: pytest.CaptureFixture[str], code: int, *args: str) -> list[str]:
    assert await cli(*args) == code, args
    out, err = capsys.readouterr()
    assert err == "", err
    return out.splitlines()


def closed_port(dsn: str) -> str:
    """`dsn` pointed at a loopback port nothing listens on."""
    parts = urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0]
    host = f"127.0.0.1:{free_loopback_port()}"
    return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))


async def test_du_shows_the_shared_tier_after_the_local_cache(
    tier: Tier, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await tier.put(b"a" * 100)
    await tier.put(b"b" * 200)
    await tier.index.mark([first], time.time())  # on its way out: no longer counted
    flags = tier.flags()

    lines = await text_of(capsys, 0, "du", *flags)
    assert lines[0] == f"storage     {tier.root / 'cache'}"
    assert lines[-2:] == [
        f"shared      bucket {tier.shared['bucket']}/fleet/, budget 1000 B",
        "shared use  200 B (20.0% of the budget) in 1 blobs",
    ]
    du = await json_of(capsys, 0, "du", *flags)
    assert (du["storage"], du["blobs"]) == (str(tier.root / "cache"), 0)
    assert du["shared"] == {
        "bucket": tier.shared["bucket"], "prefix": "fleet/", "max_size": BUDGET, "used": 200,
        "blobs": 1,
    }  # fmt: skip


async def test_ls_lists_the_shared_tags_and_whether_their_manifests_are_kept(
    tier: Tier, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = await tier.put(b'{"a": 1}', MANIFEST)
    marked = await tier.put(b'{"c": 3}', MANIFEST)
    await tier.index.mark([marked], time.time())
    never = str(digest_of(b'{"b": 2}'))
    await tier.index.set_tag("up", "adm/a", "v1", kept, MANIFEST, 100.0)
    await tier.index.set_tag("up", "adm/b", "v2", never, MANIFEST, 200.0)
    await tier.index.set_tag("up", "adm/c", "v3", marked, MANIFEST, 300.0)
    flags = tier.flags()

    lines = await text_of(capsys, 0, "ls", *flags)
    assert lines[0] == "no cached images"  # the local part first
    assert lines[1:3] == ["", f"shared tier (bucket {tier.shared['bucket']}/fleet/):"]
    assert lines[3].split() == ["UPSTREAM", "IMAGE", "DIGEST", "MANIFEST", "CHECKED"]
    assert [line.split()[:4] for line in lines[4:]] == [
        ["up", "adm/a:v1", kept[:19], "kept"],
        ["up", "adm/b:v2", never[:19], "absent"],
        ["up", "adm/c:v3", marked[:19], "absent"],
    ]
    assert "1970-01-01 00:01:40 UTC" in lines[4]

    listed = await json_of(capsys, 0, "ls", *flags)
    assert listed == {"local": [], "shared": [
        {"upstream": "up", "repository": "adm/a", "tag": "v1", "digest": kept,
         "checked_at": 100.0, "kept": True},
        {"upstream": "up", "repository": "adm/b", "tag": "v2", "digest": never,
         "checked_at": 200.0, "kept": False},
        {"upstream": "up", "repository": "adm/c", "tag": "v3", "digest": marked,
         "checked_at": 300.0, "kept": False},
    ]}  # fmt: skip
    # A repository one tier has is found; one neither has is not.
    only_b = await json_of(capsys, 0, "ls", "adm/b", *flags)
    assert [row["tag"] for row in only_b["shared"]] == ["v2"]
    assert await json_of(capsys, 1, "ls", "adm/none", *flags) == {"local": [], "shared": []}
    lines = await text_of(capsys, 1, "ls", "adm/none", *flags)
    assert lines[0] == "no cached images of adm/none"
    assert lines[-1] == "no shared tags of adm/none"


async def test_gc_records_orphans_whose_bytes_verify_and_deletes_the_others(
    tier: Tier, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded = await tier.put(b"uploaded, its row never written", MANIFEST, row=False)
    wrong = digest_of(b"what the key says")
    await tier.bucket.put_bytes(wrong, b"other bytes", LAYER)
    known = await tier.put(b"a blob with its row", private=False)
    flags = tier.flags()

    gc = await json_of(capsys, 0, "gc", *flags)
    assert gc["evicted_blobs"] == 0  # the local part first
    assert gc["shared"] == {
        "leader": True, "marked": 0, "deleted": 0, "deleted_bytes": 0,
        "orphans_recorded": [recorded], "orphans_deleted": [str(wrong)], "used": 31 + 19,
        "max_size": BUDGET,
    }  # fmt: skip
    # Recorded as what the object says, and private: nobody knows which upstream it came
    # through.
    assert await tier.index.blob(recorded, "public") is None
    row = SharedBlob(recorded, 31, MANIFEST, True, None)
    assert await tier.index.blob(recorded, "private") == row
    assert sorted(await tier.objects()) == sorted([recorded, known])

    lines = await text_of(capsys, 0, "gc", *flags)  # nothing left to do
    assert lines[-1] == (
        "shared: marked 0 blobs for eviction; deleted 0 objects marked earlier (0 B); "
        "50 B of 1000 B used"
    )
    assert not any("orphan" in line for line in lines)

    orphan = await tier.put(b"another orphan", row=False)
    lines = await text_of(capsys, 0, "gc", *flags)
    assert f"shared: orphan recorded: {orphan}" in lines


async def test_gc_runs_one_shared_pass_unless_another_replica_leads(
    tier: Tier, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    digests = [await tier.put(bytes([n]) * 250) for n in range(4)]  # 1000 bytes: over 900
    later = time.time() + 100
    await tier.index.touch({digest: later + n for n, digest in enumerate(digests)})
    flags = tier.flags()

    leader = SharedIndex(database_url, timeout=TIMEOUT)
    try:
        assert await leader.lead()
        lines = await text_of(capsys, 0, "gc", *flags)
        assert lines[-1] == (
            "shared: another replica leads the shared tier's eviction: no pass run here; "
            "1000 B of 1000 B used"
        )
        gc = await json_of(capsys, 0, "gc", *flags)
        assert (gc["shared"]["leader"], gc["shared"]["marked"]) == (False, 0)
        assert await tier.index.marked_before(time.time() + 1, 10) == []
    finally:
        await leader.close()

    # Leading now: the least recently used blob is marked (down to 800 bytes)...
    lines = await text_of(capsys, 0, "gc", *flags)
    assert lines[-1] == (
        "shared: marked 1 blobs for eviction; deleted 0 objects marked earlier (0 B); "
        "750 B of 1000 B used"
    )
    assert [blob.digest for blob in await tier.index.marked_before(time.time() + 1, 10)] == [
        digests[0]
    ]
    assert digests[0] in await tier.objects()  # a presigned URL may still be in use
    # ...and its object deleted by the next pass (presign_ttl 0), which let go of the lead.
    gc = await json_of(capsys, 0, "gc", *flags)
    assert gc["shared"] == {
        "leader": True, "marked": 0, "deleted": 1, "deleted_bytes": 250, "used": 750,
        "max_size": BUDGET, "orphans_recorded": [], "orphans_deleted": [],
    }  # fmt: skip
    assert sorted(await tier.objects()) == sorted(digests[1:])
    assert await tier.index.blob(digests[0], "private") is None
    after = SharedIndex(database_url, timeout=TIMEOUT)
    try:
        assert await after.lead()
    finally:
        await after.close()


async def test_verify_hashes_every_object_and_forgets_rows_without_one(
    tier: Tier, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [await tier.put(bytes([n]) * 10) for n in range(3)]
    corrupt = digest_of(b"what the key says")
    await tier.bucket.put_bytes(corrupt, b"other bytes", LAYER)
    await tier.index.add_blob(str(corrupt), 11, LAYER, False)
    lost = str(digest_of(b"its object deleted by someone"))
    await tier.index.add_blob(lost, 29, LAYER, False)
    # Marked, its object deleted by the evictor, its row not yet removed: the evictor's.
    evicting = str(digest_of(b"being evicted"))
    await tier.index.add_blob(evicting, 13, LAYER, False)
    await tier.index.mark([evicting], time.time())
    flags = tier.flags()

    lines = await text_of(capsys, 1, "verify", *flags)
    assert lines == [
        "verified 0 blobs: 0 corrupt",
        f"shared: missing, forgotten: {lost}",
        f"shared: corrupt, removed: {corrupt}",
        "shared: verified 4 of 4 objects: 1 corrupt, 1 missing",
    ]
    assert sorted(await tier.objects()) == sorted(good)
    assert await tier.index.blob(str(corrupt), "private") is None
    assert await tier.index.blob(lost, "private") is None
    assert [blob.digest for blob in await tier.index.marked_before(time.time() + 1, 10)] == [
        evicting
    ]

    assert await json_of(capsys, 0, "verify", *flags) == {
        "verified": 0, "corrupt": [], "missing": [], "evicted": 0,
        "shared": {"objects": 3, "verified": 3, "corrupt": [], "missing": [], "evicted": 0},
    }  # fmt: skip
    sampled = await json_of(capsys, 0, "verify", "--sample", "2", *flags)
    assert (sampled["shared"]["objects"], sampled["shared"]["verified"]) == (3, 2)
    lines = await text_of(capsys, 0, "verify", "--sample", "9", *flags)
    assert lines[-1] == "shared: verified 3 of 3 objects: 0 corrupt"

    # Found corrupt in JSON too, with the exit status.
    await tier.bucket.delete(parse_digest(good[0]))
    await tier.bucket.put_bytes(parse_digest(good[0]), b"rotten", LAYER)
    shared = (await json_of(capsys, 1, "verify", *flags))["shared"]
    assert shared == {"objects": 3, "verified": 3, "corrupt": [good[0]], "missing": [],
                      "evicted": 0}  # fmt: skip


@pytest.mark.parametrize("command", ["du", "ls", "gc", "verify"])
async def test_an_unreachable_database_is_one_line_after_the_local_part(
    tier: Tier, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = tier.flags(database=closed_port(tier.shared["database"]))
    assert await cli(command, *flags) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith(("storage ", "no cached images", "evicted ", "verified "))
    assert len(err.splitlines()) == 1 and err.startswith("mirror: shared.database unreachable: ")

    assert await cli(command, "--json", *flags) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["shared"] is None
    assert len(err.splitlines()) == 1 and err.startswith("mirror: shared.database unreachable: ")


@pytest.mark.parametrize("command", ["gc", "verify"])
async def test_an_unreachable_bucket_is_one_line_after_the_local_part(
    tier: Tier, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stopped = f"http://127.0.0.1:{free_loopback_port()}"
    for flags in (tier.flags(endpoint_url=stopped), tier.flags(bucket="no-such-bucket-here")):
        assert await cli(command, *flags) == 1
        out, err = capsys.readouterr()
        assert out.splitlines()[0].startswith(("evicted ", "verified "))
        assert len(err.splitlines()) == 1 and err.startswith("mirror: shared.bucket unreachable: ")
    assert "does not exist" in err
    # What needs no bucket does not look for one.
    assert await cli("du", *tier.flags(endpoint_url=stopped)) == 0
