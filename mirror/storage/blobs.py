"""Content-addressed blob files: the only place that knows where a digest lives on disk.

A file is visible under its digest only once complete and verified: writers fill a
temp file while hashing it, `BlobWriter.check` compares digest and length, and
`BlobWriter.commit` fsyncs and `os.replace`s it into place.

A blob open for reading is held with a shared `flock`, which the evictor's exclusive
`flock` cannot take: so no process (a worker, `mirror gc`) evicts a blob another is
reading, and a crashed reader's holds go with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from mirror.errors import RegistryError, UpstreamError
from mirror.reference import Digest, parse_digest


class DigestMismatch(UpstreamError):
    """The bytes received do not hash to the digest (or length) they were fetched as."""


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self._blobs = str(root / "blobs")  # hits build names as strings: pathlib is slow

    def open(self) -> None:
        """Create the layout; drop temp files of downloads a crash interrupted."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, digest: Digest) -> Path:
        """Where the blob `digest` lives. The whole on-disk layout:

            <root>/
              blobs/<algorithm>/<first two hex>/<hex>   complete, verified blobs
              tmp/<random>                              downloads in progress
              index.db                                  the SQLite index (storage/index.py)

        The two-hex fan-out keeps directories small at 100,000s of blobs.
        """
        return Path(self._name(digest))

    def _name(self, digest: Digest) -> str:
        return f"{self._blobs}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def size(self, digest: Digest) -> int | None:
        """The size of a complete blob, or None when it is not cached."""
        try:
            return os.stat(self._name(digest)).st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest) -> tuple[BinaryIO, int]:
        """A complete blob open for reading, held from eviction until closed, and its size;
        raises FileNotFoundError when it is not cached (or being evicted)."""
        file = open(self._name(digest), "rb", buffering=0)  # noqa: SIM115 (the caller closes)
        try:
            hold(file.fileno())
            stat = os.fstat(file.fileno())
        except BlockingIOError:  # the evictor has it
            stat = None
        if stat is None or stat.st_nlink == 0:  # evicted between the open and the hold
            file.close()
            raise FileNotFoundError(self._name(digest))
        return file, stat.st_size

    def evict(self, digest: Digest) -> bool:
        """Remove a blob unless someone holds it open; False when it is in use."""
        try:
            fd = os.open(self._name(digest), os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            self.remove(digest)
            return True
        finally:
            os.close(fd)

    def remove(self, digest: Digest) -> None:
        self.path(digest).unlink(missing_ok=True)

    def scan(self) -> dict[Digest, os.stat_result]:
        """Every file under blobs/ named like a digest, with its stat; others are removed."""
        found: dict[Digest, os.stat_result] = {}
        root = self.root / "blobs"
        for algorithm in _subdirs(root):
            for fan in _subdirs(algorithm):
                with os.scandir(fan) as entries:
                    for entry in entries:
                        digest = _digest_named(algorithm.name, fan.name, entry.name)
                        if digest is not None and entry.is_file(follow_symlinks=False):
                            found[digest] = entry.stat()
                        else:
                            _remove_tree(Path(entry.path))
        return found

    def verify(self, digest: Digest) -> bool:
        """Whether the file under `digest` hashes to it."""
        hasher = digest.hasher()
        with self.path(digest).open("rb") as f:
            while chunk := f.read(1024 * 1024):
                hasher.update(chunk)
        return hasher.hexdigest() == digest.hex

    def writer(self, digest: Digest) -> BlobWriter:
        return BlobWriter(self, digest)

    def write(self, digest: Digest, data: bytes) -> Path:
        """Store small content (a manifest) that is already in memory."""
        writer = self.writer(digest)
        try:
            writer.write(data)
            writer.check(len(data))
            return writer.commit()
        finally:
            writer.close()


class BlobWriter:
    """A temp file being filled for one digest; readers may follow it as it grows."""

    def __init__(self, store: BlobStore, digest: Digest) -> None:
        self.store = store
        self.digest = digest
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix=digest.hex[:12] + ".")
        self.temp_path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._hash = digest.hasher()
        self.written = 0
        self.verified = False  # the bytes hash to the digest, with the expected length

    def write(self, chunk: bytes) -> None:
        """All of `chunk`; on an OSError (a full disk) `written` still counts every byte
        that did reach the file."""
        view = memoryview(chunk)
        while view:
            count = self._file.write(view) or 0
            self._hash.update(view[:count])
            self.written += count
            view = view[count:]

    def hasher(self) -> hashlib._Hash:
        """A copy of the hash of what was written so far."""
        return self._hash.copy()

    def check(self, expected_length: int | None) -> None:
        """Whether the bytes written are the blob; raises DigestMismatch and removes the
        temp file when they are not."""
        try:
            verify(self.digest, self._hash, self.written, expected_length)
        except DigestMismatch:
            self.close()
            raise
        self.verified = True

    def commit(self) -> Path:
        """Fsync a checked file and move it into place."""
        if not self.verified:
            raise RuntimeError(f"{self.digest} was not checked before its commit")
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.store.path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, final)
        _fsync_dir(final.parent)
        return final

    def close(self) -> None:
        """Drop the temp file unless it was committed (idempotent)."""
        if not self._file.closed:
            self._file.close()
        self.temp_path.unlink(missing_ok=True)


def verify(digest: Digest, hashed: hashlib._Hash, received: int, expected: int | None) -> None:
    """Raises DigestMismatch unless `received` bytes hashing to `hashed` are the blob."""
    actual = hashed.hexdigest()
    if actual != digest.hex or expected not in (None, received):
        raise DigestMismatch(
            f"upstream sent {received} bytes hashing to {digest.algorithm}:{actual}"
            f" for {digest} (expected length {expected}); not cached"
        )


def hold(fd: int) -> None:
    """Keep the evictor off the file open as `fd` (and every duplicate of it) until the
    last of them is closed; raises BlockingIOError while the evictor has it."""
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _digest_named(algorithm: str, fan: str, name: str) -> Digest | None:
    try:
        digest = parse_digest(f"{algorithm}:{name}")
    except RegistryError:
        return None
    return digest if digest.hex[:2] == fan else None


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable, so a crash cannot lose a blob the index lists.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
