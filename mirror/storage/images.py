"""What a cached image consists of: its manifest, an index's children, configs and layers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from mirror.reference import Digest, manifest_references, parse_digest
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index


async def content_of(index: Index, store: BlobStore, roots: Iterable[str]) -> set[str]:
    """Every digest reachable from the manifests `roots`, through the cached manifests."""
    found: set[str] = set()
    todo = list(roots)
    while todo:
        digest = parse_digest(todo.pop())
        if str(digest) in found:
            continue
        found.add(str(digest))
        row = await index.blob(digest)
        if row is not None and row.media_type is not None:  # a manifest: follow it
            todo.extend(await asyncio.to_thread(_referenced, store, digest))
    return found


def _referenced(store: BlobStore, digest: Digest) -> list[str]:
    try:
        return manifest_references(store.path(digest).read_bytes())
    except OSError:
        return []
