"""The cache as the proxies use it: what a route may see, and how verified content is kept.

A blob fetched through an `authenticated` upstream is private: a route to a `public`
upstream does not see it (`Index.hidden`), so a client without a login never gets what
only logins could fetch. Committing is one sequence for blobs and manifests alike: mark
the content private first (so that a crash cannot leave it public), put the file in place,
then index it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO

from mirror.reference import Digest
from mirror.storage.blobs import BlobStore, BlobWriter
from mirror.storage.index import Index

log = logging.getLogger(__name__)


class Cache:
    def __init__(self, store: BlobStore, index: Index) -> None:
        self.store = store
        self.index = index

    def open_blob(self, digest: Digest, access: str) -> tuple[BinaryIO, int] | None:
        """The blob's file, open, and its size, recording the use; None when it is not
        cached or `access` may not see it."""
        if self.index.hidden(digest, access):
            return None
        try:
            opened = self.store.open_blob(digest)
        except FileNotFoundError:
            return None
        self.index.touch(digest)
        return opened

    async def manifest(self, digest: Digest, access: str) -> tuple[bytes, str] | None:
        """A cached manifest's bytes and recorded media type, recording the use."""
        if self.index.hidden(digest, access):
            return None
        row = await self.index.blob(digest)
        if row is None or row.media_type is None:
            return None
        try:
            body = self.store.path(digest).read_bytes()
        except FileNotFoundError:
            return None
        self.index.touch(digest)
        return body, row.media_type

    def path(self, digest: Digest) -> Path:
        """Where a committed blob's file is (read it only while it is held open)."""
        return self.store.path(digest)

    def seen(self, digest: Digest, access: str) -> bool:
        """Still cached and visible to `access` (for copies kept in memory); a use."""
        if self.index.hidden(digest, access) or self.store.size(digest) is None:
            return False
        self.index.touch(digest)
        return True

    def writer(self, digest: Digest) -> BlobWriter:
        return self.store.writer(digest)

    async def commit_file(self, writer: BlobWriter, *, private: bool) -> bool:
        """Keep a download's verified file; whether it is kept."""
        kept, _ = await self._commit(writer.digest, writer.written, writer.commit, private, None)
        return kept

    async def commit_bytes(
        self, digest: Digest, body: bytes, media_type: str, *, private: bool
    ) -> str | None:
        """Keep a verified manifest; the media type its row holds (the first recorded for
        the digest), or None when it could not be kept."""
        place = partial(self.store.write, digest, body)
        kept, recorded = await self._commit(digest, len(body), place, private, media_type)
        return recorded if kept else None

    async def _commit(
        self,
        digest: Digest,
        size: int,
        place: Callable[[], object],
        private: bool,
        media_type: str | None,
    ) -> tuple[bool, str | None]:
        """`place` puts the file where `store.path(digest)` says. A failure (a full disk, a
        locked index) is logged: the content was served, only not cached."""
        try:
            if private:
                await self.index.mark_private(digest)
            await asyncio.to_thread(place)
            kept = await self.index.add_blob(digest, size, media_type, public=not private)
        except (OSError, sqlite3.Error) as exc:
            log.warning("%s was served but could not be cached: %s", digest, exc)
            return False, None
        return True, kept
