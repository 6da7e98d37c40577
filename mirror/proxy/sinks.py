"""Where a download's bytes go, and where its readers find them.

A `FileSink` writes the blob's temp file, which readers follow with sendfile and which is
committed into the cache once verified. A `WindowSink` keeps the bytes of a blob that is
not being cached (no room in the budget, or a full disk) in memory, from `origin` on, only
until every reader has taken them; bytes before `origin` (written to the file before the
room ran out) stay readable from the file. A download starts with a file and may switch to
a window; the `Fetch` sees both through the same few methods.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from mirror.reference import Digest
from mirror.storage.blobs import BlobWriter, verify

READ_CHUNK = 256 * 1024  # bytes a reader takes from memory at a time
WINDOW_SIZE = 4 * 1024 * 1024  # bytes a window holds before it waits for its readers


@dataclass(frozen=True)
class Span:
    """`count` bytes of `file` from `offset`, for the web layer to send with sendfile."""

    file: BinaryIO
    offset: int
    count: int


class Sink(Protocol):
    keeps: bool  # whether the blob is cached once verified

    @property
    def written(self) -> int: ...

    @property
    def full(self) -> bool:
        """Whether the writer must wait for readers before it adds more."""
        ...

    @property
    def start(self) -> int:
        """The first byte still readable from memory (`written` when nothing is held)."""
        ...

    def write(self, chunk: bytes) -> None: ...

    def read(self, file: BinaryIO, size: int, offset: int) -> Span | bytes:
        """Up to `size` bytes from `offset`; `file` is the reader's own descriptor."""
        ...

    def drop_before(self, offset: int) -> None: ...

    def check(self, length: int | None) -> None:
        """Raises DigestMismatch unless the bytes are the blob (of `length`, if known)."""
        ...


class FileSink:
    keeps = True

    def __init__(self, writer: BlobWriter) -> None:
        self.writer = writer

    @property
    def written(self) -> int:
        return self.writer.written

    @property
    def full(self) -> bool:
        return False

    @property
    def start(self) -> int:
        return self.writer.written

    def write(self, chunk: bytes) -> None:
        """All of `chunk`; on an OSError (a full disk) `written` counts what did land."""
        self.writer.write(chunk)

    def read(self, file: BinaryIO, size: int, offset: int) -> Span | bytes:
        return Span(file, offset, size)

    def drop_before(self, offset: int) -> None:
        pass  # the file keeps every byte

    def check(self, length: int | None) -> None:
        self.writer.check(length)


class WindowSink:
    keeps = False

    def __init__(self, digest: Digest, origin: int, hashed: hashlib._Hash) -> None:
        self.digest = digest
        self.origin = origin
        self._start = origin
        self._end = origin
        self._hash = hashed  # of every byte of the blob up to `written`
        self._bytes = bytearray()

    @property
    def written(self) -> int:
        return self._end

    @property
    def full(self) -> bool:
        return self._end - self._start > WINDOW_SIZE

    @property
    def start(self) -> int:
        return self._start

    def write(self, chunk: bytes) -> None:
        self._bytes += chunk
        self._hash.update(chunk)
        self._end += len(chunk)

    def read(self, file: BinaryIO, size: int, offset: int) -> Span | bytes:
        if offset < self.origin:  # written to the file before the room ran out
            return Span(file, offset, min(size, self.origin - offset))
        if not self._start <= offset <= self._end:
            raise ValueError(f"byte {offset} is outside the window {self._start}-{self._end}")
        first = offset - self._start
        return bytes(self._bytes[first : first + min(size, READ_CHUNK)])

    def drop_before(self, offset: int) -> None:
        """Forget the bytes before `offset` (clamped to what the window holds)."""
        offset = min(max(offset, self._start), self._end)
        del self._bytes[: offset - self._start]
        self._start = offset

    def check(self, length: int | None) -> None:
        verify(self.digest, self._hash, self._end, length)
