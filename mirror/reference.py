"""Pure parsing and validation of what clients send: names, tags, digests, Range, Accept.

No I/O here; every function raises a `RegistryError` subclass with the OCI code a client
should see.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from mirror.errors import DigestInvalid, ManifestUnknown, NameInvalid, RangeInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")
# The distribution grammar's domain (lowercased): DNS labels or a bracketed IPv6, a port.
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_REGISTRY_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:]+\])(?::[0-9]+)?")
MAX_NAME_LENGTH = 255
# What clients send again and again (a digest, a name, an Accept) is parsed once: on a
# cached answer, parsing was a tenth of the time. Errors are never cached.
PARSED = 4096

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES: tuple[str, ...] = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


@lru_cache(maxsize=PARSED)
def parse_digest(text: str) -> Digest:
    algorithm, sep, hex_part = text.partition(":")
    if not sep:
        raise DigestInvalid(f"invalid digest {text!r}: expected algorithm:hex")
    length = _HEX_LENGTH.get(algorithm)
    if length is None:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}: use sha256 or sha512")
    if len(hex_part) != length or not _HEX.fullmatch(hex_part):
        raise DigestInvalid(f"invalid digest {text!r}: {algorithm} needs {length} lowercase hex")
    return Digest(algorithm, hex_part)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


@lru_cache(maxsize=PARSED)
def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise NameInvalid(
            f"invalid repository name {name!r}: lowercase letters, digits and separators only"
        )
    return name


def parse_reference(text: str) -> str | Digest:
    """A manifest reference: a `Digest` if it contains a colon, else a validated tag."""
    if ":" in text:
        return parse_digest(text)
    if not _TAG.fullmatch(text):
        raise TagInvalid(f"invalid tag {text!r}")
    return text


def parse_manifest_reference(text: str) -> str | Digest:
    """The reference of a manifest request: a tag or a digest. Anything else names no
    manifest there can be, so it is unknown (404), as registries answer it, rather than
    a bad request; a client probing with `.INVALID_MANIFEST_NAME` expects just that."""
    try:
        return parse_reference(text)
    except (TagInvalid, DigestInvalid) as exc:
        raise ManifestUnknown(f"no manifest is named {text!r}: {exc.message}") from None


@dataclass(frozen=True)
class ImageReference:
    """`docker.io/library/alpine:3.20`, `ghcr.io/owner/app@sha256:...`, as users write them."""

    host: str  # the registry, as containerd's `ns` would name it
    repository: str  # as written: Docker Hub's `library/` is the router's to add
    reference: str | Digest
    # No host was written (`library/alpine:3`): docker.io by Docker's rule, and to a
    # mirror, its default upstream (as `docker pull mirror:5000/library/alpine:3` goes).
    host_implied: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        sep = "@" if isinstance(self.reference, Digest) else ":"
        return f"{self.host}/{self.repository}{sep}{self.reference}"


def is_registry_host(text: str) -> bool:
    """Whether a name's first path component names a registry host, by Docker's rule: it
    has a `.` or a `:` or is `localhost` (and is a host name or `[v6]`, with a port or not)."""
    looks_so = "." in text or ":" in text or text == "localhost"
    return looks_so and _REGISTRY_HOST.fullmatch(text) is not None


def parse_image_reference(text: str) -> ImageReference:
    """Docker's rules: the first path component is a registry host if it has a `.` or a
    `:` or is `localhost`, else the image is on docker.io; no tag means `latest`. A host
    outside the distribution grammar (`ex ample.com`, `[::1`) is NAME_INVALID."""
    rest, _, digest = text.strip().partition("@")
    first, slash, path = rest.partition("/")
    implied = not (slash and ("." in first or ":" in first or first == "localhost"))
    if implied:
        host, path = "docker.io", rest
    else:
        host = first.lower()
        if not _REGISTRY_HOST.fullmatch(host):
            raise NameInvalid(f"invalid registry host {first!r} in {text!r}")
    repository, colon, tag = path.rpartition(":")
    if not colon:
        repository, tag = path, "latest"
    reference = parse_digest(digest) if digest else parse_reference(tag)
    return ImageReference(host, validate_name(repository), reference, host_implied=implied)


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range, resolved against a known size."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


# RFC 9110 §14.1: the unit is case-insensitive and a DIGIT is ASCII 0-9 only, as aiohttp
# reads them (`\d` would take Arabic-Indic digits, and IGNORECASE without
# ASCII a long s, U+017F, for the s of bytes).
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII | re.IGNORECASE)
_UNIT = re.compile(r"([-!#$%&'*+.^_`|~0-9a-z]+)=", re.ASCII | re.IGNORECASE)  # a token


def parse_range(header: str, size: int) -> ByteRange | None:
    """The one `bytes=` range of `size` a Range header asks for; None for the whole.

    A unit the mirror does not know (`items=0-1`) must be ignored, HTTP says; several
    ranges may be, and are: a multipart answer is more than image pullers ever ask for.
    A malformed or unsatisfiable `bytes=` range is answered 416, as aiohttp's
    FileResponse does; cached and growing blobs are both answered through this.
    """
    text = header.strip(" \t")
    unit = _UNIT.match(text)
    if unit is not None and (unit.group(1).lower() != "bytes" or "," in text):
        return None
    match = _RANGE.fullmatch(text)
    if match is None:
        raise RangeInvalid(f"unsupported Range {header!r}: use one bytes=start-end", size)
    first, last = match.groups()
    if not first and not last:
        raise RangeInvalid(f"invalid Range {header!r}", size)
    try:
        start = int(first) if first else None
        stop = int(last) if last else None
    except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits)
        raise RangeInvalid(f"invalid Range {header!r}: number too long", size) from None
    if start is None:  # bytes=-N: the last N bytes
        suffix = stop or 0
        if suffix == 0 or size == 0:
            raise RangeInvalid(f"Range {header!r} selects no bytes of {size}", size)
        return ByteRange(max(size - suffix, 0), size - 1)
    if start >= size or (stop is not None and stop < start):
        raise RangeInvalid(f"Range {header!r} is outside the blob's {size} bytes", size)
    return ByteRange(start, size - 1 if stop is None else min(stop, size - 1))


def parse_accept(values: Iterable[str]) -> tuple[str, ...]:
    """Media types from any number of Accept lines, each possibly comma-joined.

    Parameters (`;q=0.5`) are dropped and duplicates removed, keeping first-seen order.
    """
    return _parse_accept(tuple(values))


# Accept lines are long (a header may be kilobytes): fewer of them are kept.
@lru_cache(maxsize=256)
def _parse_accept(values: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for line in values:
        for part in line.split(","):
            media_type = part.split(";", 1)[0].strip().lower()
            if media_type:
                seen.setdefault(media_type, None)
    return tuple(seen)


def accepts(accepted: tuple[str, ...], media_type: str) -> bool:
    """Whether a client sending `accepted` takes `media_type` (no Accept takes anything)."""
    return not accepted or media_type in accepted or "*/*" in accepted


def manifest_references(body: bytes) -> list[str]:
    """The digests a manifest names: its config and layers, or an index's manifests.
    Unreadable content names nothing."""
    try:
        manifest = json.loads(body)
    except ValueError:
        return []
    if not isinstance(manifest, dict):
        return []
    entries = [manifest.get("config"), *_list(manifest.get("layers"))]
    entries += _list(manifest.get("manifests"))
    return [
        e["digest"] for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)
    ]


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []
