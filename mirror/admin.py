"""The admin commands: `du`, `gc`, `ls`, `verify`, `rm` on a storage directory, and `warm`
through a running mirror.

The storage commands work while the server runs: they go through the SQLite index (and
its locking) and never touch the temp files of downloads in progress. What a running
server holds in memory (blobs being sent) they cannot see; a file removed under a reader
keeps serving that reader (POSIX), so no client gets a short body.

With `--json` each prints the facts of its text as one JSON document on stdout (`warm`:
one JSON object per line, per image and a summary): sizes in bytes, times in seconds
since the epoch (null for never).

In fleet mode (`shared:` in the config) `du`, `ls`, `gc` and `verify` go on to the shared
tier once the local cache is done: its part of the text follows, and in JSON it is the
`shared` key (`ls`: `{"local": [...], "shared": [...]}`), null when the shared database or
bucket cannot be reached, which is one line on stderr naming it, and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO, TypeVar

import aiohttp

from mirror.config import Config, SharedConfig
from mirror.errors import ConfigError, DigestInvalid, RegistryError
from mirror.eviction import Evictor, pinned_images
from mirror.metrics import Metrics
from mirror.reference import MANIFEST_TYPES, Digest, parse_digest, parse_image_reference
from mirror.routing import Router
from mirror.shared.bucket import Bucket, BucketError, BucketUnavailable, ObjectMissing
from mirror.shared.database import DatabaseUnavailable, SharedIndex
from mirror.shared.eviction import SharedEvictor
from mirror.storage.blobs import BlobStore
from mirror.storage.budget import Budget
from mirror.storage.images import Skipped, content_of
from mirror.storage.index import INDEX_FILE, Index, TaggedImage

Command = Callable[[Config, argparse.Namespace], Coroutine[object, object, int]]
T = TypeVar("T")
# A shared part's JSON document and exit status.
Outcome = tuple[dict[str, object], int]

# Objects of the bucket `mirror verify` reads at once: one stream is far from what a bucket
# can send, and each hashes in this process's one thread.
VERIFY_READS = 8


async def disk_usage(config: Config, args: argparse.Namespace) -> int:
    """`mirror du`: the budget, bytes used, blob count, the oldest last use; in fleet mode,
    the shared tier's bytes and blobs against its budget."""
    fleet = _fleet(config)
    async with _storage(config) as cache:
        usage = await cache.index.usage()
        used = await cache.budget.used()
    storage = config.storage
    local: dict[str, object] = {
        "storage": str(storage.path),
        "max_size": storage.max_size,
        "high_watermark": storage.high_watermark,
        "low_watermark": storage.low_watermark,
        "max_age": storage.max_age,
        "used": used,
        "blobs": usage.blobs,
        "blob_bytes": usage.bytes,
        "oldest_use": usage.oldest_access or None,
    }
    if not args.json:
        _print_disk_usage(config, usage.blobs, usage.bytes, usage.oldest_access, used)
    if fleet is None:
        if args.json:
            _print_json(local)
        return 0
    shared = await _shared_part(fleet, lambda tier: _shared_usage(tier, args))
    return _finish(args, local, shared, 0)


def _print_disk_usage(
    config: Config, blobs: int, blob_bytes: int, oldest_access: float | None, used: int
) -> None:
    storage = config.storage
    print(f"storage     {storage.path}")
    print(
        f"budget      {_size(storage.max_size)}; eviction from "
        f"{storage.high_watermark:.0%} down to {storage.low_watermark:.0%}"
        + (f", and after {_age(storage.max_age)} unused" if storage.max_age else "")
    )
    print(f"used        {_size(used)} ({used / storage.max_size:.1%} of the budget)")
    print(f"blobs       {blobs} ({_size(blob_bytes)})")
    oldest = "-" if oldest_access is None else _when(oldest_access)
    print(f"oldest use  {oldest}")


async def _shared_usage(tier: _Shared, args: argparse.Namespace) -> Outcome:
    usage = await tier.index.usage()
    budget = tier.config.max_size
    if not args.json:
        print(f"shared      bucket {tier.config.bucket}/{tier.config.prefix}, "
              f"budget {_size(budget)}")  # fmt: skip
        print(f"shared use  {_size(usage.bytes)} ({_share(usage.bytes, budget)} of the budget)"
              f" in {usage.blobs} blobs")  # fmt: skip
    return {"bucket": tier.config.bucket, "prefix": tier.config.prefix, "max_size": budget,
            "used": usage.bytes, "blobs": usage.blobs}, 0  # fmt: skip


async def collect_garbage(config: Config, args: argparse.Namespace) -> int:
    """`mirror gc`: one eviction pass now, down to the low watermark, and max_age; in fleet
    mode, the shared tier's orphans recorded and one shared eviction pass, if no other
    replica leads."""
    fleet = _fleet(config)
    async with _storage(config) as cache:
        evicted = await cache.evictor.run_pass(force=True)
        # The shared pass keeps the pins as this cache knows them, as a serving replica does.
        pinned = await cache.evictor.pinned() if fleet is not None else set()
    local: dict[str, object] = {}
    status = 0
    if evicted.failure is not None:
        print(f"mirror: eviction pass failed: {evicted.failure}", file=sys.stderr)
        status = 1
    else:
        local = {
            "evicted_blobs": evicted.blobs,
            "evicted_bytes": evicted.bytes,
            "used": evicted.used,
            "max_size": config.storage.max_size,
        }
        if not args.json:
            print(
                f"evicted {evicted.blobs} blobs ({_size(evicted.bytes)}); "
                f"{_size(evicted.used)} of {_size(config.storage.max_size)} used"
            )
    if fleet is None:
        if args.json and not status:
            _print_json(local)
        return status
    shared = await _shared_part(fleet, lambda tier: _shared_gc(tier, pinned, args), bucket=True)
    return _finish(args, local, shared, status)


async def _shared_gc(tier: _Shared, pinned: set[str], args: argparse.Namespace) -> Outcome:
    # Orphans first: the pass then counts those recorded against the budget.
    recorded, deleted = await _record_orphans(tier, args)
    leading = await tier.index.lead()
    budget = tier.config.max_size
    facts: dict[str, object] = {"leader": leading, "marked": 0, "deleted": 0,
                                "deleted_bytes": 0, "orphans_recorded": recorded,
                                "orphans_deleted": deleted}  # fmt: skip
    if not leading:
        used = (await tier.index.usage()).bytes
        if not args.json:
            print(f"shared: another replica leads the shared tier's eviction: no pass run here; "
                  f"{_size(used)} of {_size(budget)} used")  # fmt: skip
        return facts | {"used": used, "max_size": budget}, 0
    evictor = SharedEvictor(
        tier.index, tier.bucket, budget, tier.config.presign_ttl, _const(pinned), Metrics()
    )
    evicted = await evictor.run_pass()
    if evicted.failure is not None:
        print(f"mirror: shared eviction pass failed: {evicted.failure}", file=sys.stderr)
        return facts | {"used": None, "max_size": budget}, 1
    if not args.json:
        print(f"shared: marked {evicted.marked} blobs for eviction; deleted {evicted.deleted} "
              f"objects marked earlier ({_size(evicted.bytes)}); {_size(evicted.used)} of "
              f"{_size(budget)} used")  # fmt: skip
    return facts | {"marked": evicted.marked, "deleted": evicted.deleted,
                    "deleted_bytes": evicted.bytes, "used": evicted.used,
                    "max_size": budget}, 0  # fmt: skip


async def _record_orphans(tier: _Shared, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Objects with no row (an upload whose row write failed) recorded if their bytes are
    their digest's, else deleted: what was recorded, what deleted.

    Recorded rather than deleted once old enough: a row written for verified bytes is
    right whenever it is written, so this needs no age, no clock of the bucket's, and
    races no replica writing the same row; deleting could take an object from under a
    row a replica writes just then. Keys are listed before rows: an object the evictor
    deletes in between has lost its row too, and is then not found when read."""
    keys = await _listed(tier.bucket)
    rows = {row.digest for row in await tier.index.blobs()}
    recorded: list[str] = []
    deleted: list[str] = []
    for digest in keys:
        if str(digest) in rows:
            continue
        outcome = await _record_orphan(tier, digest)
        if outcome is None:
            continue
        (recorded if outcome else deleted).append(str(digest))
        if not args.json:
            what = "recorded" if outcome else "not its digest's bytes, deleted"
            print(f"shared: orphan {what}: {digest}")
    return recorded, deleted


async def _record_orphan(tier: _Shared, digest: Digest) -> bool | None:
    """True: recorded; False: its bytes were wrong, deleted; None: gone meanwhile."""
    intact = await _intact(tier.bucket, digest)
    if intact is None:
        return None
    if not intact:
        await _discard(tier, digest)
        return False
    kept = await tier.bucket.head(digest)
    if kept is None:
        return None
    # Private: which upstream it came through is not known, and a public fetch of it
    # makes it public.
    await tier.index.add_blob(str(digest), kept.size, kept.media_type, True)
    return True


async def list_images(config: Config, args: argparse.Namespace) -> int:
    """`mirror ls [REPO]`: cached tags with their size (what of them is cached) and last use;
    in fleet mode, the shared tier's tags and whether it holds their manifests. Exit 1 for
    a REPO no tier has a tag of."""
    fleet = _fleet(config)
    async with _storage(config) as cache:
        index, store = cache.index, cache.store
        blobs = await index.blobs()
        rows = []
        skipped = Skipped()
        for image in await index.tagged():
            if not _chosen(args.repository, image.repository):
                continue
            content = await content_of(index, store, [image.digest], skipped)
            cached = [blobs[d] for d in content if d in blobs]
            size = sum(s for s, _ in cached)
            last = max((used for _, used in cached), default=0.0)
            rows.append((image, size, last))
    local = [
        {"upstream": image.upstream, "repository": image.repository, "tag": image.tag,
         "digest": image.digest, "size": size, "last_use": last or None}
        for image, size, last in rows
    ]  # fmt: skip
    if not args.json:
        _print_images(rows, args.repository)
    if fleet is None:
        if args.json:
            _print_json(local)
        return 1 if args.repository and not rows else 0
    shared = await _shared_part(fleet, lambda tier: _shared_tags(tier, args))
    if args.json:
        _print_json({"local": local, "shared": shared})
    if shared is None:
        return 1
    return 1 if args.repository and not rows and not shared else 0


def _chosen(wanted: str | None, repository: str) -> bool:
    return not wanted or wanted in (repository, repository.removeprefix("library/"))


def _print_images(rows: list[tuple[TaggedImage, int, float]], repository: str | None) -> None:
    if not rows:
        print("no cached images" + (f" of {repository}" if repository else ""))
        return
    print(f"{'UPSTREAM':<12} {'IMAGE':<48} {'DIGEST':<19} {'SIZE':>10}  LAST USE")
    for image, size, last in rows:
        name = f"{image.repository}:{image.tag}"
        print(f"{image.upstream:<12} {name:<48} {image.digest[:19]:<19} {_size(size):>10}  "
              f"{_when(last)}")  # fmt: skip


async def _shared_tags(tier: _Shared, args: argparse.Namespace) -> list[dict[str, object]]:
    """The shared tags, each with whether the tier holds its manifest (a row not marked
    for eviction: what a replica would find)."""
    kept = {row.digest for row in await tier.index.blobs() if row.marked_at is None}
    tags = [tag for tag in await tier.index.tags() if _chosen(args.repository, tag.repository)]
    if not args.json:
        print(f"\nshared tier (bucket {tier.config.bucket}/{tier.config.prefix}):")
        if not tags:
            print("no shared tags" + (f" of {args.repository}" if args.repository else ""))
        else:
            print(f"{'UPSTREAM':<12} {'IMAGE':<48} {'DIGEST':<19} {'MANIFEST':<8}  CHECKED")
        for tag in tags:
            name = f"{tag.repository}:{tag.tag}"
            held = "kept" if tag.digest in kept else "absent"
            print(f"{tag.upstream:<12} {name:<48} {tag.digest[:19]:<19} {held:<8}  "
                  f"{_when(tag.checked_at)}")  # fmt: skip
    return [
        {"upstream": tag.upstream, "repository": tag.repository, "tag": tag.tag,
         "digest": tag.digest, "checked_at": tag.checked_at, "kept": tag.digest in kept}
        for tag in tags
    ]  # fmt: skip


async def verify(config: Config, args: argparse.Namespace) -> int:
    """`mirror verify`: re-hash every blob; remove the corrupt ones, and the rows of
    missing ones. Exit 1 if any.

    A file gone since the listing is not corrupt: beside a running server, it was evicted
    meanwhile, and its row is gone too by the end of the walk. A row that stays has lost
    its file some other way.

    In fleet mode, then every object of the shared tier's bucket (or `--sample N` of them)
    too, and the rows whose objects are missing."""
    fleet = _fleet(config)
    async with _storage(config) as cache:
        index, store = cache.index, cache.store
        digests = sorted(await index.digests())
        corrupt, gone = [], []
        for text in digests:
            digest = Digest(*text.split(":", 1))
            try:
                intact = await asyncio.to_thread(store.verify, digest)
            except FileNotFoundError:
                gone.append(text)
                continue
            if not intact:
                corrupt.append(text)
                store.remove(digest)
                if not args.json:
                    print(f"corrupt, removed: {text}")
        missing = sorted(set(gone) & await index.digests())
        if not args.json:
            for text in missing:
                print(f"missing, forgotten: {text}")
        await index.remove_blobs(corrupt + missing)
    evicted = len(gone) - len(missing)
    status = 1 if corrupt or missing else 0
    local: dict[str, object] = {"verified": len(digests) - len(gone), "corrupt": corrupt,
                                "missing": missing, "evicted": evicted}  # fmt: skip
    if not args.json:
        print(
            f"verified {len(digests) - len(gone)} blobs: {len(corrupt)} corrupt"
            + (f", {len(missing)} missing" if missing else "")
            + (f"; {evicted} evicted while checking" if evicted else "")
        )
    if fleet is None:
        if args.json:
            _print_json(local)
        return status
    shared = await _shared_part(fleet, lambda tier: _shared_verify(tier, args), bucket=True)
    return _finish(args, local, shared, status)


async def _shared_verify(tier: _Shared, args: argparse.Namespace) -> Outcome:
    """Objects hashed, a corrupt one deleted with its row; rows with no object removed.

    Rows are listed before keys: the evictor deletes an object before its row, which is
    marked meanwhile, so a row not marked whose object is not listed after it has lost
    that object some other way, unless it went or came back meanwhile (looked at again)."""
    rows = [row.digest for row in await tier.index.blobs() if row.marked_at is None]
    objects = await _listed(tier.bucket)
    listed = {str(digest) for digest in objects}
    missing = [d for d in rows if d not in listed and await _lost(tier, parse_digest(d))]
    await tier.index.remove(missing)
    if not args.json:
        for text in missing:
            print(f"shared: missing, forgotten: {text}")
    chosen = (
        objects if args.sample is None else random.sample(objects, min(args.sample, len(objects)))
    )
    corrupt, gone = await _hash_all(tier, chosen, args)
    if not args.json:
        print(
            f"shared: verified {len(chosen) - len(gone)} of {len(objects)} objects: "
            f"{len(corrupt)} corrupt"
            + (f", {len(missing)} missing" if missing else "")
            + (f"; {len(gone)} evicted while checking" if gone else "")
        )
    facts: dict[str, object] = {"objects": len(objects), "verified": len(chosen) - len(gone),
                                "corrupt": sorted(corrupt), "missing": missing,
                                "evicted": len(gone)}  # fmt: skip
    return facts, 1 if corrupt or missing else 0


async def _lost(tier: _Shared, digest: Digest) -> bool:
    """Whether a row, not marked, still names an object that is not there."""
    row = await tier.index.blob(str(digest), "private")
    return row is not None and await tier.bucket.head(digest) is None


async def _hash_all(
    tier: _Shared, objects: list[Digest], args: argparse.Namespace
) -> tuple[list[str], list[str]]:
    """`objects` hashed, VERIFY_READS at a time; the corrupt ones deleted with their rows.
    The corrupt, and those gone (evicted) before they were read."""
    corrupt: list[str] = []
    gone: list[str] = []

    async def check(digest: Digest) -> None:
        intact = await _intact(tier.bucket, digest)
        if intact is None:
            gone.append(str(digest))
        elif not intact:
            await _discard(tier, digest)
            corrupt.append(str(digest))
            if not args.json:
                print(f"shared: corrupt, removed: {digest}")

    await _each(objects, check, VERIFY_READS)
    return corrupt, gone


async def remove_image(config: Config, args: argparse.Namespace) -> int:
    """`mirror rm IMAGE`: forget a tag and remove what no other cached tag or pin uses."""
    try:
        ref = parse_image_reference(args.image)
        route = Router(config.upstreams).route(ref.repository, ref.host)
    except RegistryError as exc:
        print(f"mirror: {args.image}: {exc.message}", file=sys.stderr)
        return 2
    async with _storage(config) as cache:
        index, store = cache.index, cache.store
        tagged = await index.tagged()
        mine = [
            t
            for t in tagged
            if t.upstream == route.upstream.name
            and t.repository == route.repository
            and (t.digest if isinstance(ref.reference, Digest) else t.tag) == str(ref.reference)
        ]
        if not mine and not isinstance(ref.reference, Digest):
            if args.json:
                _print_json({"image": args.image, "cached": False, "blobs": [], "freed": 0})
            else:
                print(f"{args.image}: not cached")
            return 1
        roots = [t.digest for t in mine] or [str(ref.reference)]
        others = [t.digest for t in tagged if t not in mine]
        skipped = Skipped()
        keep = await content_of(index, store, others, skipped) | await cache.evictor.pinned()
        victims = sorted(await content_of(index, store, roots, skipped) - keep)
        present = await index.blobs()
        victims = [v for v in victims if v in present]
        for image in mine:
            await index.remove_tag(image.upstream, image.repository, image.tag)
        for victim in victims:
            store.remove(Digest(*victim.split(":", 1)))
        await index.remove_blobs(victims)
    freed = sum(present[v][0] for v in victims)
    if args.json:
        _print_json({"image": args.image, "cached": True, "blobs": victims, "freed": freed})
    else:
        print(f"removed {args.image}: {len(victims)} blobs ({_size(freed)})")
    return 0


async def warm(config: Config, args: argparse.Namespace) -> int:
    """`mirror warm IMAGE...`: pull images through the running mirror into its cache."""
    progress = Progress(sys.stderr, lines=not args.json)
    failed = 0
    total = 0
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        for text in args.images:
            started = time.monotonic()
            try:
                warmed = await _warm_one(session, args.mirror.rstrip("/"), text, progress)
            except (RegistryError, aiohttp.ClientError, ValueError, KeyError) as exc:
                failed += 1
                progress.note(f"{text}: failed: {exc}")
                if args.json:
                    _print_json({"image": text, "ok": False, "error": str(exc)})
                continue
            total += warmed.bytes
            if args.json:
                _print_json({"image": text, "ok": True, "bytes": warmed.bytes,
                             "blobs": warmed.blobs, "manifests": warmed.manifests,
                             "skipped": warmed.skipped,
                             "seconds": round(time.monotonic() - started, 3)})  # fmt: skip
    took = time.monotonic() - began
    if args.json:
        _print_json({"warmed": len(args.images) - failed, "images": len(args.images),
                     "bytes": total, "seconds": round(took, 3)})  # fmt: skip
    else:
        print(f"warmed {len(args.images) - failed} of {len(args.images)} images, "
              f"{_size(total)} in {took:.1f}s")  # fmt: skip
    return 1 if failed else 0


@dataclass
class Warmed:
    """What warming one image fetched."""

    bytes: int = 0
    blobs: int = 0
    manifests: int = 0
    skipped: list[str] = field(default_factory=list)  # digests of no algorithm served


async def _warm_one(
    session: aiohttp.ClientSession, mirror: str, text: str, progress: Progress
) -> Warmed:
    """Every manifest and blob of one image (all platforms), with its progress line."""
    ref = parse_image_reference(text)
    base = f"{mirror}/v2/{ref.repository}"
    # `ns` only for a host the user wrote: a bare name goes where `docker pull
    # mirror/<name>` goes, to the mirror's default upstream, whichever registry that is.
    ns = {} if ref.host_implied else {"ns": ref.host}
    accept = {"Accept": ", ".join(MANIFEST_TYPES)}
    todo, blobs, warmed = [ref.reference], {}, Warmed()
    while todo:
        async with session.get(f"{base}/manifests/{todo.pop()}", params=ns, headers=accept) as r:
            if r.status != 200:
                raise ValueError(f"manifest answered {r.status}: {await r.text()}")
            manifest = json.loads(await r.read())
        warmed.manifests += 1
        for child in manifest.get("manifests", []):
            todo.extend(_servable(text, child["digest"], warmed, progress))
        for blob in [manifest.get("config"), *manifest.get("layers", [])]:
            for digest in _servable(text, blob["digest"], warmed, progress) if blob else []:
                blobs[digest] = int(blob["size"])
    size = sum(blobs.values())
    for digest in blobs:
        hasher = digest.hasher()
        async with session.get(f"{base}/blobs/{digest}", params=ns) as r:
            if r.status != 200:
                raise ValueError(f"blob {digest} answered {r.status}")
            async for chunk in r.content.iter_chunked(1024 * 1024):
                hasher.update(chunk)
                warmed.bytes += len(chunk)
                progress.update(text, warmed.bytes, size)
        if hasher.hexdigest() != digest.hex:
            raise ValueError(f"blob {digest} arrived with other bytes")
        warmed.blobs += 1
    progress.done(text, warmed)
    return warmed


def _servable(image: str, text: str, warmed: Warmed, progress: Progress) -> list[Digest]:
    """The digest a manifest names, unless it is none the mirror serves (an algorithm
    other than sha256 and sha512: allowed in manifests, cached nowhere)."""
    try:
        return [parse_digest(text)]
    except DigestInvalid as exc:
        warmed.skipped.append(text)
        progress.note(f"{image}: skipped: {exc.message}")
        return []


class Progress:
    """`mirror warm`'s line per image on `stream`. On a terminal it is redrawn as bytes
    arrive (at most every REDRAW seconds); anywhere else (a pipe, a log file) it is written
    once, when the image is done, so that nothing there fills up with redraws.

    `lines`: write the lines for images done, failed, skipped (not with --json, whose own
    lines on stdout say it all); the terminal's bar is drawn either way."""

    REDRAW = 0.1
    WIDTH = 30

    def __init__(self, stream: TextIO, lines: bool = True) -> None:
        self.stream = stream
        self.terminal = stream.isatty()
        self.lines = lines
        self._drawn_at = -math.inf
        self._drawn = False  # a bar is on the terminal's current line

    def update(self, name: str, done: int, size: int) -> None:
        now = time.monotonic()
        if not self.terminal or now - self._drawn_at < self.REDRAW:
            return
        self._drawn_at = now
        self._draw(name, done, size)

    def done(self, name: str, warmed: Warmed) -> None:
        if self.terminal:
            self._draw(name, warmed.bytes, warmed.bytes)
            self._end_line("\n")
        elif self.lines:
            print(f"{name}  {_size(warmed.bytes)} in {warmed.blobs} blobs, "
                  f"{warmed.manifests} manifests", file=self.stream, flush=True)  # fmt: skip

    def note(self, text: str) -> None:
        """A line of its own: under the bar, which is cleared first."""
        self._end_line("\r\x1b[K")  # back to the line's start, and erase it
        if self.lines:
            print(text, file=self.stream, flush=True)

    def _draw(self, name: str, done: int, size: int) -> None:
        filled = self.WIDTH * done // size if size else self.WIDTH
        bar = "#" * filled + " " * (self.WIDTH - filled)
        self.stream.write(f"\r{name}  [{bar}] {_size(done)} / {_size(size)}")
        self.stream.flush()
        self._drawn = True

    def _end_line(self, end: str) -> None:
        if self._drawn:
            self.stream.write(end)
            self.stream.flush()
            self._drawn = False
        self._drawn_at = -math.inf


COMMANDS: dict[str, Command] = {
    "du": disk_usage,
    "gc": collect_garbage,
    "ls": list_images,
    "verify": verify,
    "rm": remove_image,
    "warm": warm,
}


@dataclass(frozen=True)
class _Cache:
    index: Index
    store: BlobStore
    budget: Budget
    evictor: Evictor


@contextlib.asynccontextmanager
async def _storage(config: Config) -> AsyncIterator[_Cache]:
    """The cache in a storage directory a server may be using now."""
    path = config.storage.path / INDEX_FILE
    if not path.exists():
        raise ConfigError("storage.path", f"no cache index at {path}")
    index = Index(path)
    await index.open()
    try:
        # No BlobStore.open(): its temp files may be a running server's downloads.
        store = BlobStore(config.storage.path)
        budget = Budget(config.storage, index)
        pins = pinned_images(config)
        evictor = Evictor(budget, index, store, pins, config.storage.max_age)
        yield _Cache(index, store, budget, evictor)
    finally:
        await index.close()


@dataclass(frozen=True)
class _Fleet:
    """Fleet mode's settings, the DSN read (a missing variable is a config error before
    anything is done)."""

    config: SharedConfig
    dsn: str


@dataclass(frozen=True)
class _Shared:
    """The shared tier opened for a command: its bucket is opened only if asked for."""

    config: SharedConfig
    index: SharedIndex
    bucket: Bucket


def _fleet(config: Config) -> _Fleet | None:
    return None if config.shared is None else _Fleet(config.shared, config.shared.dsn())


async def _shared_part(
    fleet: _Fleet, part: Callable[[_Shared], Awaitable[T]], *, bucket: bool = False
) -> T | None:
    """`part`'s answer on the shared tier; None, once the line naming it is on stderr,
    when its database or bucket cannot be reached or fails."""
    try:
        async with _opened(fleet, bucket) as tier:
            return await part(tier)
    except DatabaseUnavailable as exc:
        print(f"mirror: shared.database unreachable: {exc}", file=sys.stderr)
    except BucketUnavailable as exc:
        print(f"mirror: shared.bucket unreachable: {exc}", file=sys.stderr)
    except BucketError as exc:  # refused (credentials, permissions): no retry will help
        print(f"mirror: shared.bucket: {exc}", file=sys.stderr)
    return None


@contextlib.asynccontextmanager
async def _opened(fleet: _Fleet, with_bucket: bool) -> AsyncIterator[_Shared]:
    config = fleet.config
    index = SharedIndex(fleet.dsn)
    bucket = Bucket(
        config.bucket, prefix=config.prefix, endpoint_url=config.endpoint_url, region=config.region
    )
    try:
        await index.open()
        if with_bucket:
            await bucket.open(create=False)  # a command that finds no bucket makes none
        yield _Shared(config, index, bucket)
    finally:
        await index.close()  # which gives up the lead, if taken
        await bucket.close()


def _finish(
    args: argparse.Namespace, local: dict[str, object], shared: Outcome | None, status: int
) -> int:
    """The JSON document, with the shared part's; the exit status of both."""
    document, shared_status = (None, 1) if shared is None else shared
    if args.json:
        _print_json({**local, "shared": document})
    return max(status, shared_status)


async def _listed(bucket: Bucket) -> list[Digest]:
    """The digest of every object in the bucket."""
    pages = bucket.keys()  # a bucket's, not a dict's: the lint's advice does not apply
    return [digest async for digest, _ in pages]


async def _intact(bucket: Bucket, digest: Digest) -> bool | None:
    """Whether the object's bytes hash to its digest; None if it is not there."""
    try:
        body = await bucket.read(digest)
    except ObjectMissing:
        return None
    hasher = digest.hasher()
    try:
        async for chunk in body.chunks():
            hasher.update(chunk)
    finally:
        body.close()
    return hasher.hexdigest() == digest.hex


async def _discard(tier: _Shared, digest: Digest) -> None:
    """A corrupt object gone: its row first, so that no replica finds it meanwhile."""
    await tier.index.remove([str(digest)])
    await tier.bucket.delete(digest)


async def _each(items: Iterable[T], work: Callable[[T], Awaitable[None]], at_once: int) -> None:
    """`work` on every item, `at_once` at a time; the first failure raised, the rest of
    the work cancelled."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:
            await work(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(at_once):
                group.create_task(worker())
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None


def _const(value: set[str]) -> Callable[[], Awaitable[set[str]]]:
    async def constant() -> set[str]:
        return value

    return constant


def _print_json(document: object) -> None:
    print(json.dumps(document), flush=True)


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    return f"{days}d" if days else f"{rest // 3600}h{rest % 3600 // 60:02d}m"


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{moment} ({_age(max(time.time() - timestamp, 0))} ago)"
