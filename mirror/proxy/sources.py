"""Where a download reads a blob from: an object behind one interface, so that a new place
(the shared bucket, a peer replica) is a new class and the `Fetch` stays the same.

A source gives the blob's body from a byte offset (for resuming after a cut); the body
says where it really starts (a source may ignore the offset and start again from 0) and
the blob's whole length, when known.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from mirror.reference import Digest
from mirror.upstream.client import Upstream


class Body(Protocol):
    start: int  # the blob's byte the first chunk begins at
    length: int | None  # the whole blob's, when declared

    def chunks(self) -> AsyncIterator[bytes]:
        """The bytes as they arrive; raises UpstreamCut when the connection breaks."""
        ...


class Source(Protocol):
    name: str  # in logs and metrics
    retries: int  # cuts resumed at most, per download
    patience: float  # seconds a pass-through waits for its slowest reader

    def body(self, digest: Digest, offset: int) -> AbstractAsyncContextManager[Body]: ...


class UpstreamSource:
    """The blob from its upstream registry, under the repository the client asked for."""

    def __init__(self, upstream: Upstream, repository: str) -> None:
        self.upstream = upstream
        self.repository = repository
        self.name = upstream.name
        self.retries = upstream.config.retries
        self.patience = upstream.config.timeouts.idle

    def body(self, digest: Digest, offset: int) -> AbstractAsyncContextManager[Body]:
        return self.upstream.blob(self.repository, digest, offset)
