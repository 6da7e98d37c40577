"""The shared tier's bucket: verified blob and manifest bytes in an S3-compatible store
(AWS S3, Ceph RGW, MinIO), under content-addressed keys, shared by every replica.

A key is written once and never overwritten: a small object goes up in one PUT with
`If-None-Match: *`; a big file in a multipart upload, which stays invisible until it is
completed and is aborted on any error or cancellation, so a replica killed mid-upload
leaves nothing under the key. Reads are streamed. Every call is bounded by the client's
connect and read timeouts and its retries. Failing to reach the bucket (refused, timed
out, 5xx) is a `BucketUnavailable`; a key with no object is an `ObjectMissing`. Neither
is a registry error: the caller decides what a client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import aiohttp
from botocore import exceptions as boto
from botocore.exceptions import BotoCoreError, ClientError

from mirror.errors import DigestInvalid
from mirror.reference import Digest, parse_digest

if TYPE_CHECKING:
    from aiobotocore.config import AioConfig
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

# Module constants rather than arguments: one setting for every bucket of the process,
# which tests lower.
CHUNK_SIZE = 1 << 20  # the most one chunk of a streamed read holds
MULTIPART_THRESHOLD = 64 << 20  # files larger than this go up in parts
PART_SIZE = 16 << 20  # S3 refuses parts under 5 MiB, but for the last
MAX_PARTS = 10_000  # S3's limit: bigger files get bigger parts
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0  # the longest silence within one request
MAX_ATTEMPTS = 3  # per call, the first included
# A streamed GET holds its connection until its body is read; replicas serve many at once.
MAX_CONNECTIONS = 100

_CONTENT_RANGE = re.compile(r"bytes (\d+)-")


class BucketError(Exception):
    """The bucket refused a request, or answered something this module cannot use."""


class BucketUnavailable(BucketError):
    """The bucket cannot be reached or is failing: refused, timed out, cut off, 5xx."""


class ObjectMissing(BucketError):
    """The bucket holds no object under a digest's key."""


@dataclass(frozen=True)
class BucketObject:
    """What a HEAD says of a key."""

    size: int
    media_type: str | None


class BucketBody:
    """One GET's body, streamed. Read it with `chunks()`; `close()` it in any case, which
    gives its connection back."""

    def __init__(self, stream: Any, *, key: str, start: int, length: int | None) -> None:
        self._stream = stream  # aiobotocore's StreamingBody: its stubs type it loosely
        self._key = key
        self.start = start  # offset of its first byte in the object
        self.length = length  # bytes it will send

    async def chunks(self) -> AsyncIterator[bytes]:
        """The bytes as they arrive, at most `CHUNK_SIZE` at a time; a body cut short
        raises `BucketUnavailable`."""
        while True:
            with _answers(f"GET {self._key}"):
                chunk: bytes = await self._stream.read(CHUNK_SIZE)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._stream.close()


class Bucket:
    """An S3-compatible bucket, addressed by digests. `open()` before use, `close()` after."""

    def __init__(
        self,
        name: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        self.name = name
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self._client: S3Client | None = None
        self._resources: AsyncExitStack | None = None
        self._aborts: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifetime

    async def open(self, create: bool = True) -> None:
        """Build the client, its credentials from the standard AWS chain (environment,
        ~/.aws, instance or task roles), and create the bucket if it is missing (and
        `create`). On failure nothing stays open and `open` may be called again."""
        if self._client is not None:
            return
        # Imported here: aiobotocore costs a replica without a shared tier 10 MiB and
        # 0.15 s at start for nothing.
        from aiobotocore.session import get_session

        resources = AsyncExitStack()
        try:
            creator = get_session().create_client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                config=self._config(),
            )
            self._client = await resources.enter_async_context(creator)
            await self._ensure_bucket(create)
        except BaseException:
            self._client = None
            await resources.aclose()
            raise
        self._resources = resources

    async def close(self) -> None:
        """Close the client, once the aborts of interrupted uploads have been sent."""
        if self._aborts:
            await asyncio.wait(self._aborts)
        resources, self._resources, self._client = self._resources, None, None
        if resources is not None:
            await resources.aclose()

    def _config(self) -> AioConfig:
        from aiobotocore.config import AioConfig

        https = self.endpoint_url is None or self.endpoint_url.startswith("https:")
        return AioConfig(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
            max_pool_connections=MAX_CONNECTIONS,
            signature_version="s3v4",
            s3={
                # radosgw and MinIO serve buckets under the path, not as host names.
                "addressing_style": "auto" if self.endpoint_url is None else "path",
                # TLS protects the body already; signing it would hash the whole file in
                # the event loop before sending. Over plain HTTP it is all there is.
                "payload_signing_enabled": not https,
            },
            # Only the checksums an operation requires, as botocore sent before 1.36: over
            # TLS it now sends them as aws-chunked trailers, which S3-compatible stores
            # older than that (Ceph's radosgw among them) refuse.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )

    async def _ensure_bucket(self, create: bool) -> None:
        try:
            with _answers(f"HEAD bucket {self.name}"):
                await self._s3.head_bucket(Bucket=self.name)
            return
        except BucketError as exc:
            if _status(exc.__cause__) != 404:
                raise
            if not create:
                raise BucketUnavailable(f"bucket {self.name!r} does not exist") from None
        try:
            with _answers(f"create bucket {self.name}"):
                await self._s3.create_bucket(Bucket=self.name, **self._location())
        except BucketError as exc:
            # Another replica created it first: that is what we wanted.
            if _code(exc.__cause__) != "BucketAlreadyOwnedByYou":
                raise

    def _location(self) -> dict[str, Any]:
        region = self._s3.meta.region_name
        if region in (None, "", "us-east-1"):  # us-east-1 refuses to be named
            return {}
        return {"CreateBucketConfiguration": {"LocationConstraint": region}}

    @property
    def _s3(self) -> S3Client:
        if self._client is None:
            raise RuntimeError(f"bucket {self.name!r} is not open")
        return self._client

    # ------------------------------------------------------------------ keys

    def key(self, digest: Digest) -> str:
        """The object key of a digest's bytes, blobs and manifests alike:

            <prefix>blobs/<algorithm>/<first two hex>/<hex>
            e.g. mirror/blobs/sha256/4f/4f6b...e2  (prefix "mirror")

        The two-character level spreads keys over the store's index partitions.
        """
        return f"{self.prefix}blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def _digest_of(self, key: str) -> Digest | None:
        """The digest `key` holds, or None for a key outside the layout."""
        parts = key.removeprefix(f"{self.prefix}blobs/").split("/")
        if len(parts) != 3 or parts[2][:2] != parts[1]:
            return None
        try:
            return parse_digest(f"{parts[0]}:{parts[2]}")
        except DigestInvalid:
            return None

    async def keys(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every blob key under the prefix, as its digest and size, in key order."""
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=f"{self.prefix}blobs/"
        )
        with _answers(f"list {self.name}/{self.prefix}blobs/"):
            async for page in pages:
                for item in page.get("Contents", []):
                    digest = self._digest_of(item["Key"])
                    if digest is not None:
                        yield digest, item["Size"]

    # ------------------------------------------------------------------ reads

    async def head(self, digest: Digest) -> BucketObject | None:
        """What the bucket holds under `digest`, or None."""
        try:
            return await self._head_key(self.key(digest))
        except ObjectMissing:
            return None

    async def _head_key(self, key: str) -> BucketObject:
        with _answers(f"HEAD {key}"):
            answer = await self._s3.head_object(Bucket=self.name, Key=key)
        return BucketObject(answer["ContentLength"], answer.get("ContentType"))

    async def _exists(self, key: str) -> bool:
        try:
            await self._head_key(key)
        except ObjectMissing:
            return False
        return True

    async def read(self, digest: Digest, start: int = 0) -> BucketBody:
        """A streamed GET of `digest`'s bytes from offset `start` on. A store may ignore
        the range: the body's `start` says where it begins."""
        key = self.key(digest)
        with _answers(f"GET {key}"):
            if start > 0:
                answer = await self._s3.get_object(
                    Bucket=self.name, Key=key, Range=f"bytes={start}-"
                )
            else:
                answer = await self._s3.get_object(Bucket=self.name, Key=key)
        match = _CONTENT_RANGE.match(answer.get("ContentRange", ""))
        first = int(match.group(1)) if match else 0
        return BucketBody(answer["Body"], key=key, start=first, length=answer.get("ContentLength"))

    async def presigned_get(self, digest: Digest, ttl: float) -> str:
        """A URL anyone may GET `digest`'s bytes with for `ttl` seconds (rounded down:
        never longer than the caller waits out)."""
        return await self._s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.name, "Key": self.key(digest)},
            ExpiresIn=max(1, int(ttl)),
        )

    # ------------------------------------------------------------------ writes

    async def put_bytes(self, digest: Digest, body: bytes, media_type: str) -> bool:
        """Store verified bytes under `digest`; False if the key held an object already."""
        return await self._put_once(self.key(digest), body, media_type)

    async def put_file(self, digest: Digest, path: Path, media_type: str) -> bool:
        """Store a verified local file under `digest`, streamed from the file; False if
        the key held an object already (which is left as it was)."""
        key = self.key(digest)
        file = await asyncio.to_thread(path.open, "rb")
        try:
            size = os.fstat(file.fileno()).st_size
            if size <= MULTIPART_THRESHOLD:
                return await self._put_once(key, file, media_type)
            return await self._put_in_parts(key, file.fileno(), size, media_type)
        finally:
            file.close()

    async def delete(self, digest: Digest) -> None:
        """Remove `digest`'s object; a missing one is no error."""
        key = self.key(digest)
        with _answers(f"DELETE {key}"):
            await self._s3.delete_object(Bucket=self.name, Key=key)

    async def _put_once(self, key: str, body: bytes | io.BufferedReader, media_type: str) -> bool:
        try:
            with _answers(f"PUT {key}"):
                await self._s3.put_object(
                    Bucket=self.name, Key=key, Body=body, ContentType=media_type, IfNoneMatch="*"
                )
        except BucketError as exc:
            if _lost_race(exc):
                return False
            raise
        return True

    async def _put_in_parts(self, key: str, fd: int, size: int, media_type: str) -> bool:
        """A multipart upload of `size` bytes of `fd`, completed only if the key is still
        free, aborted on any other way out (errors and cancellation included)."""
        if await self._exists(key):
            return False
        with _answers(f"start upload of {key}"):
            created = await self._s3.create_multipart_upload(
                Bucket=self.name, Key=key, ContentType=media_type
            )
        upload_id = created["UploadId"]
        completed = False
        try:
            parts = await self._upload_parts(key, upload_id, fd, size)
            # radosgw ignores If-None-Match on completion: look once more just before.
            if await self._exists(key):
                return False
            completed = await self._complete(key, upload_id, parts)
            return completed
        finally:
            if not completed:
                await self._abort(key, upload_id)

    async def _upload_parts(
        self, key: str, upload_id: str, fd: int, size: int
    ) -> list[CompletedPartTypeDef]:
        part_size = max(PART_SIZE, -(-size // MAX_PARTS))
        parts: list[CompletedPartTypeDef] = []
        for number, offset in enumerate(range(0, size, part_size), start=1):
            length = min(part_size, size - offset)
            with _answers(f"upload part {number} of {key}"):
                answer = await self._s3.upload_part(
                    Bucket=self.name,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    # A file to aiohttp and botocore, which read and seek it; not an IO to typeshed.
                    Body=cast("BinaryIO", _FileSlice(fd, offset, length)),
                    ContentLength=length,
                )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        return parts

    async def _complete(self, key: str, upload_id: str, parts: list[CompletedPartTypeDef]) -> bool:
        try:
            with _answers(f"complete upload of {key}"):
                await self._s3.complete_multipart_upload(
                    Bucket=self.name,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
        except BucketError as exc:
            if _lost_race(exc):
                return False
            raise
        return True

    async def _abort(self, key: str, upload_id: str) -> None:
        """Abort an upload, shielded from the caller's cancellation: left pending, its
        parts would stay in the bucket, unseen but stored, until a lifecycle rule."""
        task = asyncio.create_task(self._send_abort(key, upload_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        await asyncio.shield(task)

    async def _send_abort(self, key: str, upload_id: str) -> None:
        try:
            with _answers(f"abort upload of {key}"):
                await self._s3.abort_multipart_upload(Bucket=self.name, Key=key, UploadId=upload_id)
        except BucketError as exc:
            # The error that led here matters more; the pending parts wait for a lifecycle rule.
            log.warning("could not abort upload %s of %s: %s", upload_id, key, exc)


class _FileSlice(io.RawIOBase):
    """`length` bytes of an open file from `offset` on, as a file of their own: one part's
    body. It reads with pread, so the slices of one file need no position of the file's."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._offset = offset
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int = -1, /) -> bytes:
        left = self._length - self._position
        wanted = left if size < 0 else min(size, left)
        if wanted <= 0:
            return b""
        data = os.pread(self._fd, wanted, self._offset + self._position)
        self._position += len(data)
        return data

    def readall(self) -> bytes:
        return self.read()


# ---------------------------------------------------------------------- errors

# A request that never got a whole answer: refused, timed out, cut off.
_TRANSPORT_ERRORS = (
    boto.HTTPClientError,
    boto.ConnectionError,
    boto.IncompleteReadError,
    aiohttp.ClientError,
    TimeoutError,
)


@contextlib.contextmanager
def _answers(what: str) -> Iterator[None]:
    """Translate what botocore raises for `what` into this module's errors."""
    try:
        yield
    except ClientError as exc:
        raise _client_error(exc, what) from exc
    except _TRANSPORT_ERRORS as exc:
        raise BucketUnavailable(f"{what}: {exc}") from exc
    except BotoCoreError as exc:  # no credentials, a bad parameter: it will not get better
        raise BucketError(f"{what}: {exc}") from exc


def _client_error(exc: ClientError, what: str) -> BucketError:
    status, code = _status(exc), _code(exc)
    message = f"{what}: {status} {code}"
    if status >= 500:
        return BucketUnavailable(message)
    if code == "NoSuchBucket":
        return BucketUnavailable(f"{message}: the bucket does not exist")
    if status == 404:
        return ObjectMissing(message)
    return BucketError(message)


def _status(exc: BaseException | None) -> int:
    if not isinstance(exc, ClientError):
        return 0
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: BaseException | None) -> str:
    if not isinstance(exc, ClientError):
        return ""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _lost_race(exc: BucketError) -> bool:
    """A conditional write refused because the key is taken: 412 when it holds an object,
    409 when another writer's conditional write of it is under way (AWS)."""
    cause = exc.__cause__
    return _status(cause) == 412 or _code(cause) == "ConditionalRequestConflict"
