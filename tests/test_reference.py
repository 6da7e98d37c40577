"""Table-driven tests of what clients send: names, tags, digests, Range, Accept."""

from __future__ import annotations

import pytest

from mirror.errors import (
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    RangeInvalid,
    RegistryError,
    TagInvalid,
)
from mirror.reference import (
    ByteRange,
    Digest,
    accepts,
    digest_of,
    parse_accept,
    parse_digest,
    parse_image_reference,
    parse_manifest_reference,
    parse_range,
    parse_reference,
    validate_name,
)

HEX64 = "a" * 64


@pytest.mark.parametrize(
    "name",
    ["alpine", "library/alpine", "a/b/c", "my-app", "my__app", "my.app", "a--b", "x0/y_1.z-2"],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Alpine", "a//b", "/a", "a/", "-a", "a-", "a_", "a___b", "a..b", "a b", "a:b", "../x",
     "a" * 256],
)  # fmt: skip
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid) as caught:
        validate_name(name)
    assert (caught.value.code, caught.value.status) == ("NAME_INVALID", 400)


@pytest.mark.parametrize("tag", ["latest", "3.20", "v1_2-rc.3", "_x", "A" * 128])
def test_valid_tags(tag: str) -> None:
    assert parse_reference(tag) == tag


@pytest.mark.parametrize("tag", [".x", "-x", "a/b", "a" * 129, "tag!", "ü"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(TagInvalid) as caught:
        parse_reference(tag)
    assert (caught.value.code, caught.value.status) == ("TAG_INVALID", 400)


@pytest.mark.parametrize(
    "text",
    [".INVALID_MANIFEST_NAME", "-x", "a" * 129, "ü", "sha256:abc", "sha256:" + "A" * 64,
     "md5:" + "a" * 32],
)  # fmt: skip
def test_a_manifest_reference_neither_tag_nor_digest_names_nothing(text: str) -> None:
    with pytest.raises(ManifestUnknown) as caught:
        parse_manifest_reference(text)
    assert (caught.value.code, caught.value.status) == ("MANIFEST_UNKNOWN", 404)


@pytest.mark.parametrize("text", ["latest", "_x", "A" * 128, f"sha256:{HEX64}"])
def test_a_manifest_reference_is_a_tag_or_a_digest(text: str) -> None:
    assert parse_manifest_reference(text) == parse_reference(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sha256:{HEX64}", Digest("sha256", HEX64)),
        (f"sha512:{'0' * 128}", Digest("sha512", "0" * 128)),
    ],
)
def test_valid_digests(text: str, expected: Digest) -> None:
    assert parse_digest(text) == expected
    assert parse_reference(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "sha256",
        f"sha256:{'A' * 64}",  # uppercase hex
        f"sha256:{'a' * 63}",
        f"sha256:{'a' * 65}",
        f"sha256:{'g' * 64}",
        f"md5:{'a' * 32}",
        f"sha512:{'a' * 64}",
        f":{HEX64}",
        f"sha256:{HEX64}:x",
    ],
)
def test_invalid_digests(text: str) -> None:
    with pytest.raises(DigestInvalid) as caught:
        parse_digest(text)
    assert (caught.value.code, caught.value.status) == ("DIGEST_INVALID", 400)
    if ":" in text:  # a reference with a colon is a digest, never a tag
        with pytest.raises(DigestInvalid):
            parse_reference(text)


def test_digest_of_matches_hashlib() -> None:
    assert digest_of(b"") == Digest(
        "sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert digest_of(b"x", "sha512").algorithm == "sha512"


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 10, ByteRange(0, 0)),
        ("bytes=0-9", 10, ByteRange(0, 9)),
        ("bytes=2-", 10, ByteRange(2, 9)),
        ("bytes=5-100", 10, ByteRange(5, 9)),  # end past the size is clamped (RFC 9110)
        ("bytes=-3", 10, ByteRange(7, 9)),
        ("bytes=-30", 10, ByteRange(0, 9)),
        (" bytes=1-2 ", 10, ByteRange(1, 2)),
    ],
)
def test_valid_ranges(header: str, size: int, expected: ByteRange) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=10-", 10),  # starts at the end
        ("bytes=5-2", 10),  # backwards
        ("bytes=-0", 10),
        ("bytes=-", 10),
        ("bytes=a-b", 10),
        ("bytes =0-1", 10),  # no unit: a unit is a token, before the "="
        ("0-1", 10),
        ("bytes=0-", 0),
        ("bytes=-1", 0),
    ],
)
def test_invalid_ranges(header: str, size: int) -> None:
    with pytest.raises(RangeInvalid) as caught:
        parse_range(header, size)
    error = caught.value
    assert (error.code, error.status) == ("RANGE_INVALID", 416)
    assert error.headers() == {"Content-Range": f"bytes */{size}"}


@pytest.mark.parametrize(
    "header",
    ["items=0-1", "ITEMS=0-1", "bytes=0-1,3-4", "Bytes=0-1, 5-", "bytes=50-60,70-80", "bytes=0-1,"],
)
def test_other_units_and_several_ranges_ask_for_the_whole_blob(header: str) -> None:
    assert parse_range(header, 10) is None


def test_byte_range_helpers() -> None:
    assert ByteRange(100, 199).length == 100
    assert ByteRange(100, 199).content_range(1000) == "bytes 100-199/1000"


def test_accept_lines_and_comma_joined_are_the_same() -> None:
    skopeo = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
    containerd = [", ".join(skopeo) + ", */*;q=0.8"]
    assert parse_accept(skopeo) == tuple(skopeo)
    assert parse_accept(containerd) == (*skopeo, "*/*")
    assert parse_accept(["A/B, a/b", ""]) == ("a/b",)
    assert parse_accept([]) == ()


@pytest.mark.parametrize(
    ("accepted", "media_type", "expected"),
    [
        ((), "application/x", True),
        (("*/*",), "application/x", True),
        (("application/x",), "application/x", True),
        (("application/y",), "application/x", False),
    ],
)
def test_accepts(accepted: tuple[str, ...], media_type: str, expected: bool) -> None:
    assert accepts(accepted, media_type) is expected


def test_every_registry_error_has_code_and_status() -> None:
    for error in (NameInvalid("x"), TagInvalid("x"), DigestInvalid("x"), RangeInvalid("x")):
        assert isinstance(error, RegistryError)
        assert error.code and 400 <= error.status < 500


@pytest.mark.parametrize(
    ("text", "host", "repository", "reference"),
    [
        ("alpine", "docker.io", "alpine", "latest"),
        ("library/alpine:3.20", "docker.io", "library/alpine", "3.20"),
        ("docker.io/library/alpine:3.20", "docker.io", "library/alpine", "3.20"),
        ("ghcr.io/owner/app:v1", "ghcr.io", "owner/app", "v1"),
        ("localhost/app", "localhost", "app", "latest"),
        ("127.0.0.1:5000/team/app:2", "127.0.0.1:5000", "team/app", "2"),
        ("Quay.IO/org/x", "quay.io", "org/x", "latest"),
        ("bitnami/redis@sha256:" + "b" * 64, "docker.io", "bitnami/redis", "sha256:" + "b" * 64),
    ],
)
def test_image_references(text: str, host: str, repository: str, reference: str) -> None:
    parsed = parse_image_reference(text)
    assert (parsed.host, parsed.repository, str(parsed.reference)) == (host, repository, reference)


@pytest.mark.parametrize("text", ["", "UPPER/case", "a:b:c", "x@sha256:123", "ghcr.io/"])
def test_bad_image_references(text: str) -> None:
    with pytest.raises(RegistryError):
        parse_image_reference(text)
