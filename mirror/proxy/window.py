"""The memory window of a blob passing through uncached.

When a blob cannot be cached (no room in the budget, or the disk filled up mid-way), its
bytes from `origin` on are kept in memory only until every reader has taken them. Bytes
before `origin` (written before the disk filled up) stay readable from the temp file.
"""

from __future__ import annotations

import hashlib


class Window:
    """Bytes `start` to `end` of a blob, in memory; `origin` is where the window began."""

    def __init__(self, origin: int, hashed: hashlib._Hash) -> None:
        self.origin = origin
        self.start = origin
        self.end = origin
        self.hash = hashed  # of every byte of the blob up to `end`
        self._bytes = bytearray()

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, chunk: bytes) -> None:
        self._bytes += chunk
        self.hash.update(chunk)
        self.end += len(chunk)

    def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset`, which must lie in the window."""
        if not self.start <= offset <= self.end:
            raise ValueError(f"byte {offset} is outside the window {self.start}-{self.end}")
        first = offset - self.start
        return bytes(self._bytes[first : first + size])

    def drop_before(self, offset: int) -> None:
        """Forget the bytes before `offset` (clamped to what the window holds)."""
        offset = min(max(offset, self.start), self.end)
        del self._bytes[: offset - self.start]
        self.start = offset
