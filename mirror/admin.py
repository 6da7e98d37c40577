"""The admin commands: `du`, `gc`, `ls`, `verify`, `rm` on a storage directory, and `warm`
through a running mirror.

The storage commands work while the server runs: they go through the SQLite index (and
its locking) and never touch the temp files of downloads in progress. What a running
server holds in memory (blobs being sent) they cannot see; a file removed under a reader
keeps serving that reader (POSIX), so no client gets a short body.

With `--json` each prints the facts of its text as one JSON document on stdout (`warm`:
one JSON object per line, per image and a summary): sizes in bytes, times in seconds
since the epoch (null for never).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import aiohttp

from mirror.config import Config
from mirror.errors import ConfigError, DigestInvalid, RegistryError
from mirror.eviction import Evictor, pinned_images
from mirror.reference import MANIFEST_TYPES, Digest, parse_digest, parse_image_reference
from mirror.routing import Router
from mirror.storage.blobs import BlobStore
from mirror.storage.budget import Budget
from mirror.storage.images import Skipped, content_of
from mirror.storage.index import INDEX_FILE, Index

Command = Callable[[Config, argparse.Namespace], Coroutine[object, object, int]]


async def disk_usage(config: Config, args: argparse.Namespace) -> int:
    """`mirror du`: the budget, bytes used, blob count, the oldest last use."""
    async with _storage(config) as cache:
        usage = await cache.index.usage()
        used = await cache.budget.used()
    storage = config.storage
    if args.json:
        _print_json({
            "storage": str(storage.path),
            "max_size": storage.max_size,
            "high_watermark": storage.high_watermark,
            "low_watermark": storage.low_watermark,
            "max_age": storage.max_age,
            "used": used,
            "blobs": usage.blobs,
            "blob_bytes": usage.bytes,
            "oldest_use": usage.oldest_access or None,
        })  # fmt: skip
        return 0
    print(f"storage     {storage.path}")
    print(
        f"budget      {_size(storage.max_size)}; eviction from "
        f"{storage.high_watermark:.0%} down to {storage.low_watermark:.0%}"
        + (f", and after {_age(storage.max_age)} unused" if storage.max_age else "")
    )
    print(f"used        {_size(used)} ({used / storage.max_size:.1%} of the budget)")
    print(f"blobs       {usage.blobs} ({_size(usage.bytes)})")
    oldest = "-" if usage.oldest_access is None else _when(usage.oldest_access)
    print(f"oldest use  {oldest}")
    return 0


async def collect_garbage(config: Config, args: argparse.Namespace) -> int:
    """`mirror gc`: one eviction pass now, down to the low watermark, and max_age."""
    async with _storage(config) as cache:
        evicted = await cache.evictor.run_pass(force=True)
    if evicted.failure is not None:
        print(f"mirror: eviction pass failed: {evicted.failure}", file=sys.stderr)
        return 1
    if args.json:
        _print_json({
            "evicted_blobs": evicted.blobs,
            "evicted_bytes": evicted.bytes,
            "used": evicted.used,
            "max_size": config.storage.max_size,
        })  # fmt: skip
        return 0
    print(
        f"evicted {evicted.blobs} blobs ({_size(evicted.bytes)}); "
        f"{_size(evicted.used)} of {_size(config.storage.max_size)} used"
    )
    return 0


async def list_images(config: Config, args: argparse.Namespace) -> int:
    """`mirror ls [REPO]`: cached tags with their size (what of them is cached) and last use."""
    async with _storage(config) as cache:
        index, store = cache.index, cache.store
        blobs = await index.blobs()
        rows = []
        skipped = Skipped()
        for image in await index.tagged():
            if args.repository and args.repository not in (
                image.repository,
                image.repository.removeprefix("library/"),
            ):
                continue
            content = await content_of(index, store, [image.digest], skipped)
            cached = [blobs[d] for d in content if d in blobs]
            size = sum(s for s, _ in cached)
            last = max((used for _, used in cached), default=0.0)
            rows.append((image, size, last))
    if args.json:
        _print_json([
            {"upstream": image.upstream, "repository": image.repository, "tag": image.tag,
             "digest": image.digest, "size": size, "last_use": last or None}
            for image, size, last in rows
        ])  # fmt: skip
        return 1 if args.repository and not rows else 0
    if not rows:
        print("no cached images" + (f" of {args.repository}" if args.repository else ""))
        return 1 if args.repository else 0
    print(f"{'UPSTREAM':<12} {'IMAGE':<48} {'DIGEST':<19} {'SIZE':>10}  LAST USE")
    for image, size, last in rows:
        name = f"{image.repository}:{image.tag}"
        print(f"{image.upstream:<12} {name:<48} {image.digest[:19]:<19} {_size(size):>10}  "
              f"{_when(last)}")  # fmt: skip
    return 0


async def verify(config: Config, args: argparse.Namespace) -> int:
    """`mirror verify`: re-hash every blob; remove the corrupt ones, and the rows of
    missing ones. Exit 1 if any.

    A file gone since the listing is not corrupt: beside a running server, it was evicted
    meanwhile, and its row is gone too by the end of the walk. A row that stays has lost
    its file some other way."""
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
    if args.json:
        _print_json({"verified": len(digests) - len(gone), "corrupt": corrupt,
                     "missing": missing, "evicted": evicted})  # fmt: skip
        return 1 if corrupt or missing else 0
    print(
        f"verified {len(digests) - len(gone)} blobs: {len(corrupt)} corrupt"
        + (f", {len(missing)} missing" if missing else "")
        + (f"; {evicted} evicted while checking" if evicted else "")
    )
    return 1 if corrupt or missing else 0


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


def _print_json(document: object) -> None:
    print(json.dumps(document), flush=True)


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
