"""What a cached image consists of: its manifest, an index's children, configs and layers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from mirror.errors import DigestInvalid
from mirror.reference import Digest, manifest_references, parse_digest
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index

log = logging.getLogger(__name__)

# Digests already logged as unreadable, so that walks repeated every eviction pass log
# each one once; bounded, as manifests are upstream content.
_UNREADABLE_LOGGED: set[str] = set()
UNREADABLE_LOGGED_MAX = 1024


async def content_of(index: Index, store: BlobStore, roots: Iterable[str]) -> set[str]:
    """Every digest reachable from the manifests `roots`, through the cached manifests.

    A manifest may name digests of algorithms this mirror never stores (sha384, md5:
    other algorithms are allowed there) or malformed ones: those are skipped, as nothing
    can be cached under them."""
    found: set[str] = set()
    todo = list(roots)
    while todo:
        digest = _readable(todo.pop())
        if digest is None or str(digest) in found:
            continue
        found.add(str(digest))
        row = await index.blob(digest)
        if row is not None and row.media_type is not None:  # a manifest: follow it
            todo.extend(await asyncio.to_thread(_referenced, store, digest))
    return found


def _readable(text: str) -> Digest | None:
    try:
        return parse_digest(text)
    except DigestInvalid:
        shown = text if len(text) <= 200 else text[:200] + "..."
        if shown not in _UNREADABLE_LOGGED:
            if len(_UNREADABLE_LOGGED) >= UNREADABLE_LOGGED_MAX:
                _UNREADABLE_LOGGED.clear()
            _UNREADABLE_LOGGED.add(shown)
            log.warning(
                "a cached manifest names %r, no digest this mirror can store (sha256 or"
                " sha512): skipped (logged once)",
                shown,
            )
        return None


def _referenced(store: BlobStore, digest: Digest) -> list[str]:
    try:
        return manifest_references(store.path(digest).read_bytes())
    except OSError:
        return []
