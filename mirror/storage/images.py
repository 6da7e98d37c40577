"""What a cached image consists of: its manifest, an index's children, configs and layers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from mirror.errors import DigestInvalid
from mirror.reference import Digest, manifest_references, parse_digest
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index

log = logging.getLogger(__name__)


class Skipped:
    """Digests that walks could not read, each logged once by its owner (a command, or
    the evictor, whose walks repeat every pass); bounded, as manifests are upstream
    content."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._logged: set[str] = set()

    def note(self, text: str) -> None:
        shown = text if len(text) <= 200 else text[:200] + "..."
        if shown in self._logged:
            return
        if len(self._logged) >= self.LIMIT:
            self._logged.clear()
        self._logged.add(shown)
        log.warning(
            "a cached manifest names %r, no digest this mirror can store (sha256 or sha512):"
            " skipped (logged once)",
            shown,
        )


async def content_of(
    index: Index, store: BlobStore, roots: Iterable[str], skipped: Skipped
) -> set[str]:
    """Every digest reachable from the manifests `roots`, through the cached manifests.

    A manifest may name digests of algorithms this mirror never stores (sha384, md5:
    other algorithms are allowed there) or malformed ones: those are skipped, as nothing
    can be cached under them."""
    found: set[str] = set()
    todo = list(roots)
    while todo:
        digest = _readable(todo.pop(), skipped)
        if digest is None or str(digest) in found:
            continue
        found.add(str(digest))
        row = await index.blob(digest)
        if row is not None and row.media_type is not None:  # a manifest: follow it
            todo.extend(await asyncio.to_thread(_referenced, store, digest))
    return found


@dataclass(frozen=True)
class PinnedImage:
    """An image the evictor must keep: a tag (or digest) of a repository of an upstream."""

    upstream: str
    repository: str
    reference: str | Digest


async def pinned_content(
    index: Index, store: BlobStore, pins: Iterable[PinnedImage], skipped: Skipped
) -> set[str]:
    """Every digest of the pinned images that is cached: manifests, children, blobs."""
    roots: list[str] = []
    for pin in pins:
        if isinstance(pin.reference, Digest):
            roots.append(str(pin.reference))
            continue
        tag = await index.tag(pin.upstream, pin.repository, pin.reference)
        if tag is not None:
            roots.append(tag.digest)
    return await content_of(index, store, roots, skipped)


def _readable(text: str, skipped: Skipped) -> Digest | None:
    try:
        return parse_digest(text)
    except DigestInvalid:
        skipped.note(text)
        return None


def _referenced(store: BlobStore, digest: Digest) -> list[str]:
    try:
        return manifest_references(store.path(digest).read_bytes())
    except OSError:
        return []
