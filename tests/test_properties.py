"""Property tests (hypothesis) of everything the mirror parses from outside.

Image references, repository names, tags, digests, `Range` headers and the config. The
one property everywhere: for any input (arbitrary text, decoded bytes, valid input with
one character changed, huge numbers, other scripts' digits, nested YAML shapes), a parser
returns a value or raises one of the mirror's own errors (a `RegistryError` subclass, a
`ConfigError` naming its key), never a bare ValueError, TypeError, RecursionError...
Where a grammar says what the answer must be, the answer is checked too: references
round-trip, ranges follow RFC 9110 (and agree with aiohttp's own Range parser, a second
reading of it), generated configs load with the values written.

The config inputs these properties first broke on are kept in `CONFIG_REGRESSIONS`.
"""

from __future__ import annotations

import copy
import math
import re
import string
import sys
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp.test_utils import make_mocked_request
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from mirror.config import (
    DEFAULT_TAG_TTL,
    Config,
    Listen,
    config_from_dict,
    default_hosts,
    load_config,
    parse_duration,
    parse_listen,
    parse_size,
    parse_url,
)
from mirror.errors import ConfigError, DigestInvalid, NameInvalid, RangeInvalid, TagInvalid
from mirror.reference import (
    MAX_NAME_LENGTH,
    ByteRange,
    Digest,
    ImageReference,
    parse_digest,
    parse_image_reference,
    parse_range,
    parse_reference,
    validate_name,
)

# No example database (hypothesis still keeps caches in .hypothesis/).
FAST = settings(max_examples=200, deadline=None, database=None)
SLOW = settings(FAST, max_examples=100)  # for the costlier examples: the file stays < 20 s
# On a failure hypothesis imports libcst to suggest a patch; libcst 1.0 warns on import.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

REFERENCE_ERRORS = (NameInvalid, TagInvalid, DigestInvalid)
# The grammars, written again here from the distribution spec, not imported.
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", re.ASCII)
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:]+\])(?::[0-9]+)?", re.ASCII)
DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", re.ASCII)


# --- inputs from anywhere -------------------------------------------------------------

any_text: st.SearchStrategy[str] = st.one_of(
    st.text(),
    st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.text(string.printable),
)
# Characters a mutation puts in: anything, and the ones the grammars give a meaning to.
mutation_chars = st.one_of(
    st.characters(),
    st.sampled_from(list(":/@.-_ =,AZaz09\x00\t\n\u0130\u017f\u212a\u0663\u00b2")),
)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[str]) -> str:
    """A valid input with one character replaced, inserted or deleted."""
    text = draw(valid)
    i = draw(st.integers(0, len(text)))
    match draw(st.sampled_from(["replace", "insert", "delete"])):
        case "insert":
            return text[:i] + draw(mutation_chars) + text[i:]
        case "replace":
            return text[:i] + draw(mutation_chars) + text[i + 1 :]
        case _:
            return text[:i] + text[i + 1 :]


# --- references: names, tags, digests --------------------------------------------------

_alnum = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def components(draw: st.DrawFn) -> str:
    """`[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*`"""
    parts = [draw(_alnum)]
    for _ in range(draw(st.integers(0, 2))):
        parts += [draw(_separator), draw(_alnum)]
    return "".join(parts)


names = st.lists(components(), min_size=1, max_size=4).map("/".join)
long_names = st.lists(components(), min_size=1, max_size=40).map("/".join)
tags = st.builds(
    str.__add__,
    st.sampled_from(string.ascii_letters + string.digits + "_"),
    st.text(string.ascii_letters + string.digits + "._-", max_size=127),
)
digests = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: f"sha256:{b.hex()}"),
    st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}"),
)
# DNS labels: `[a-z0-9]([a-z0-9-]*[a-z0-9])?`
_labels = st.builds(
    lambda a, hyphens, b: a + hyphens + b if b else a,
    _alnum,
    st.sampled_from(["", "-", "--"]),
    st.sampled_from(["", "0", "x9"]),
)


@st.composite
def registry_hosts(draw: st.DrawFn) -> str:
    """A host the parser must take as a registry: it has a `.` or a `:`, or is localhost."""
    kind = draw(st.sampled_from(["dns", "single", "localhost", "ipv4", "ipv6"]))
    port = draw(st.none() | st.integers(1, 65535))
    if kind == "dns":
        host = ".".join(draw(st.lists(_labels, min_size=2, max_size=4)))
    elif kind == "single":
        host, port = draw(_labels), draw(st.integers(1, 65535))  # `myregistry:5000`
    elif kind == "localhost":
        host = "localhost"
    elif kind == "ipv4":
        host = ".".join(str(draw(st.integers(0, 255))) for _ in range(4))
    else:
        host = "[" + draw(st.sampled_from(["::1", "fe80::1", "2001:db8::42"])) + "]"
    if kind != "localhost" and draw(st.booleans()):
        host = host.upper()  # case-insensitive (a bare LOCALHOST is no host: it has no . or :)
    return host if port is None else f"{host}:{port}"


@st.composite
def image_references(draw: st.DrawFn) -> tuple[str, ImageReference]:
    """A valid reference as users write it, and what it must parse to."""
    host = draw(st.none() | registry_hosts())
    name = draw(names)
    first, slash, _ = name.partition("/")
    if host is None:
        # Without a host, the first component must not look like one.
        assume(not slash or ("." not in first and first != "localhost"))
    tag = draw(st.none() | tags)
    digest = draw(st.none() | digests)
    text = (f"{host}/" if host else "") + name
    text += (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    reference: str | Digest = tag or "latest"
    if digest:  # `name:tag@digest` pulls by digest, as docker does
        algorithm, _, hex_part = digest.partition(":")
        reference = Digest(algorithm, hex_part)
    return text, ImageReference(host.lower() if host else "docker.io", name, reference)


reference_texts = image_references().map(lambda pair: pair[0])


def _check_reference(ref: ImageReference) -> None:
    """What `parse_image_reference` accepted is valid by the grammar, and re-parses."""
    assert HOST.fullmatch(ref.host), ref
    assert validate_name(ref.repository) == ref.repository
    if isinstance(ref.reference, Digest):
        assert DIGEST.fullmatch(str(ref.reference)), ref
    else:
        assert TAG.fullmatch(ref.reference), ref
    assert parse_image_reference(str(ref)) == ref


@SLOW
@given(image_references())
def test_valid_references_parse_to_their_parts(pair: tuple[str, ImageReference]) -> None:
    text, expected = pair
    parsed = parse_image_reference(text)
    assert parsed == expected
    _check_reference(parsed)


@SLOW
@given(st.one_of(any_text, mutated(reference_texts), mutated(mutated(reference_texts))))
@example("ex ample.com/app:1")
@example("Quay.IO:99/org/app@sha256:" + "0" * 64)
@example("[::1/app")
@example("localhost:/app")
def test_any_reference_parses_or_is_refused(text: str) -> None:
    try:
        parsed = parse_image_reference(text)
    except REFERENCE_ERRORS:
        return
    _check_reference(parsed)


@SLOW
@given(long_names)
def test_grammar_names_are_valid_up_to_the_length_limit(name: str) -> None:
    if len(name) <= MAX_NAME_LENGTH:
        assert validate_name(name) == name
    else:
        with pytest.raises(NameInvalid):
            validate_name(name)


@SLOW
@given(st.one_of(any_text, mutated(names), mutated(long_names)))
def test_any_name_is_valid_or_refused(text: str) -> None:
    try:
        name = validate_name(text)
    except NameInvalid:
        return
    assert name == text and len(name) <= MAX_NAME_LENGTH
    assert all(c in string.ascii_lowercase + string.digits + "._-/" for c in name)


@FAST
@given(tags)
def test_valid_tags_parse_to_themselves(tag: str) -> None:
    assert parse_reference(tag) == tag


@FAST
@given(digests)
def test_valid_digests_round_trip(text: str) -> None:
    digest = parse_digest(text)
    assert str(digest) == text
    assert parse_digest(str(digest)) == digest
    assert parse_reference(text) == digest
    assert digest.hasher().name == digest.algorithm


@FAST
@given(st.one_of(any_text, mutated(digests), mutated(digests).map(str.upper)))
@example("sha256:" + "A" * 64)
@example("sha256:" + "a" * 63 + "\n")
@example("sha256:" + "\u0663" * 64)
@example("md5:" + "a" * 32)
def test_any_digest_parses_or_is_refused(text: str) -> None:
    try:
        digest = parse_digest(text)
    except DigestInvalid:
        return
    assert DIGEST.fullmatch(str(digest)) and str(digest) == text


@FAST
@given(st.one_of(any_text, mutated(tags), mutated(digests), tags.map(lambda t: t + "x" * 128)))
def test_any_manifest_reference_parses_or_is_refused(text: str) -> None:
    try:
        reference = parse_reference(text)
    except (TagInvalid, DigestInvalid):
        return
    if isinstance(reference, Digest):
        assert str(reference) == text and DIGEST.fullmatch(text)
    else:
        assert reference == text and TAG.fullmatch(text)


# --- Range -----------------------------------------------------------------------------

sizes = st.one_of(st.integers(0, 40), st.integers(0, 2**64))
positions = st.one_of(st.integers(0, 50), st.integers(0, 2**70))
_digit_strings = st.text("0123456789", min_size=1, max_size=6000)


def rfc9110(first: int | None, last: int | None, size: int) -> tuple[int, int] | None:
    """The bytes one `bytes=first-last` selects of `size` (RFC 9110 §14.1.2), or None
    when it is invalid or unsatisfiable (then: 416)."""
    if first is None and last is None:
        return None
    if first is None:  # suffix: the last `last` bytes
        assert last is not None
        return None if last == 0 or size == 0 else (max(size - last, 0), size - 1)
    if last is not None and last < first:
        return None
    if first >= size:
        return None
    return first, size - 1 if last is None else min(last, size - 1)


def _unit(draw: st.DrawFn) -> str:
    """`bytes`, in any case: RFC 9110 range units are case-insensitive."""
    return "".join(c.upper() if draw(st.booleans()) else c for c in "bytes")


def _written(draw: st.DrawFn, number: int | None) -> str:
    """A number as a client may write it, with leading zeros."""
    return "" if number is None else "0" * draw(st.integers(0, 3)) + str(number)


@st.composite
def range_headers(draw: st.DrawFn) -> tuple[str, int | None, int | None]:
    """A one-range header (`bytes=a-b`, `bytes=a-`, `bytes=-n`), with its numbers."""
    first, last = draw(st.none() | positions), draw(st.none() | positions)
    ows = st.sampled_from(["", " ", "\t", "  "])
    header = f"{draw(ows)}{_unit(draw)}={_written(draw, first)}-{_written(draw, last)}"
    return header + draw(ows), first, last


# RFC 9110 §5.6.2: a range unit is a token.
TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+", re.ASCII)


def ignored(header: str) -> bool:
    """Whether a Range header asks for the whole blob (RFC 9110 §14.2): its unit is a
    token other than `bytes` (case-insensitive), or it holds several ranges."""
    unit, equals, ranges = header.strip(" \t").partition("=")
    if not equals or TOKEN.fullmatch(unit) is None:
        return False
    return unit.lower() != "bytes" or "," in ranges


def _check_range(header: str, size: int) -> ByteRange | int:
    """A range inside the blob (a 206); else the status of the answer: a 416 carrying
    the blob's size, or a 200 with the whole blob exactly when the header is `ignored`."""
    try:
        byte_range = parse_range(header, size)
    except RangeInvalid as error:
        assert error.size == size
        assert error.headers() == {"Content-Range": f"bytes */{size}"}
        assert (error.code, error.status) == ("RANGE_INVALID", 416)
        assert not ignored(header)
        return 416
    assert (byte_range is None) == ignored(header)
    if byte_range is None:
        return 200
    assert 0 <= byte_range.start <= byte_range.end < size
    assert byte_range.length == byte_range.end - byte_range.start + 1 > 0
    assert byte_range.content_range(size) == f"bytes {byte_range.start}-{byte_range.end}/{size}"
    return byte_range


@FAST
@given(range_headers(), sizes)
@example((" bytes=1-2 ", 1, 2), 10)
@example(("Bytes=0-0", 0, 0), 1)
@example(("bytes=5-", 5, None), 5)
@example(("bytes=-0", None, 0), 10)
@example(("bytes=-5", None, 5), 0)
@example(("bytes=0-18446744073709551616", 0, 2**64), 2**64)
def test_one_range_follows_rfc9110(spec: tuple[str, int | None, int | None], size: int) -> None:
    header, first, last = spec
    expected = rfc9110(first, last, size)
    if expected is None:
        with pytest.raises(RangeInvalid):
            parse_range(header, size)
    else:
        assert parse_range(header, size) == ByteRange(*expected)
        _check_range(header, size)


@FAST
@given(positions, positions, sizes)
def test_start_end_within_size(a: int, b: int, size: int) -> None:
    """`bytes=a-b` inside the blob is exactly bytes a to b; past its end, 416."""
    first, last = min(a, b), max(a, b)
    header = f"bytes={first}-{last}"
    if last < size:
        assert parse_range(header, size) == ByteRange(first, last)
    elif first >= size:
        with pytest.raises(RangeInvalid):
            parse_range(header, size)
    else:  # a last-byte-pos past the end means the end (RFC 9110 §14.1.2)
        assert parse_range(header, size) == ByteRange(first, size - 1)
    if first < last:
        with pytest.raises(RangeInvalid):  # backwards
            parse_range(f"bytes={last}-{first}", size)


@FAST
@given(_digit_strings, _digit_strings, sizes, st.sampled_from(["ab", "a", "b", "-b"]))
@example("1" * 4301, "", 10, "a")
@example("0", "9" * 5000, 10, "ab")
@example("", "9" * 5000, 10, "-b")
def test_huge_numbers_are_clamped_or_refused(a: str, b: str, size: int, form: str) -> None:
    """Numbers of any length: the RFC answer, or (past what int() reads, as aiohttp's
    parser does) a 416; never a ValueError."""
    first = a if "a" in form else ""
    last = b if "b" in form else ""
    header = f"bytes={first}-{last}"
    answer = _check_range(header, size)

    def number(digits: str) -> int | None:  # capped: sizes are far below 10**30
        digits = digits.lstrip("0") or ("0" if digits else "")
        return None if not digits else min(int(digits[:31]), 10**30)

    expected = rfc9110(number(first), number(last), size)
    too_long = max(len(first), len(last)) > sys.get_int_max_str_digits() > 0
    if too_long:
        assert answer == 416 or (expected is not None and answer == ByteRange(*expected))
    else:
        assert answer == (416 if expected is None else ByteRange(*expected))


@SLOW
@given(st.lists(range_headers(), min_size=2, max_size=4), st.sampled_from([",", ", ", " ,\t"]))
def test_several_ranges_ask_for_the_whole_blob(
    specs: list[tuple[str, int | None, int | None]], comma: str
) -> None:
    """Satisfiable or not: the mirror sends no multipart answers."""
    header = comma.join(spec[0].strip() for spec in specs)
    assert _check_range(header, 100) == 200
    many = "bytes=" + comma.join(spec[0].strip().partition("=")[2] for spec in specs)
    assert _check_range(many, 100) == 200


@SLOW
@given(range_headers(), st.characters(categories=["Nd", "No"], exclude_characters="0123456789"))
@example(("bytes=3-5", 3, 5), "\u0663")
def test_only_ascii_digits(spec: tuple[str, int | None, int | None], digit: str) -> None:
    """RFC 9110's DIGIT is 0-9: `bytes=\u0663-\u0665` is no range (aiohttp refuses it)."""
    header = spec[0]
    position = max(header.rfind(d) for d in "0123456789-")
    with pytest.raises(RangeInvalid):
        parse_range(header[:position] + digit + header[position:], 100)


@FAST
@given(
    st.one_of(
        st.sampled_from(["byte", "items", "bytesx", "none"]), st.from_regex(TOKEN, fullmatch=True)
    ),
    st.one_of(st.just("0-1"), any_text),
    sizes,
)
def test_other_units_ask_for_the_whole_blob(unit: str, ranges: str, size: int) -> None:
    assume(unit.lower() != "bytes")
    assert parse_range(f"{unit}={ranges}", size) is None


@FAST
@given(st.sampled_from(["byte\u017f", "bytes ", "bytes=bytes", "\u212aB", "", "by tes"]), sizes)
def test_units_that_are_no_token_are_refused(unit: str, size: int) -> None:
    with pytest.raises(RangeInvalid):
        parse_range(f"{unit}=0-1", size)


@SLOW
@given(
    st.one_of(
        any_text,
        any_text.map(lambda t: "bytes=" + t),
        range_headers().map(lambda spec: spec[0]),
        mutated(range_headers().map(lambda spec: spec[0])),
        st.text("0123456789-,", max_size=12).map(lambda t: "bytes=" + t),
    ),
    sizes,
)
@example("bytes=--1", 10)
@example("bytes=-5-3", 10)
@example("bytes=1--3", 10)
@example("bytes=\u00a01-2", 10)
def test_any_range_header_is_a_range_in_the_blob_or_416(header: str, size: int) -> None:
    _check_range(header, size)


def _aiohttp_range(header: str, size: int) -> tuple[int, int] | None:
    """What aiohttp makes of `header` (as its FileResponse would answer): the first and
    last byte of a 206, or None for a 416."""
    try:
        rng = make_mocked_request("GET", "/", headers={"Range": header}).http_range
    except ValueError:
        return None
    start, stop = rng.start, rng.stop
    if start < 0 and stop is None:
        start = max(start + size, 0)
        count = size - start
    else:
        count = min(stop if stop is not None else size, size) - start
    return None if start >= size else (start, start + count - 1)


@SLOW
@given(
    st.one_of(
        range_headers().map(lambda spec: spec[0].strip(" \t")),
        mutated(range_headers().map(lambda spec: spec[0].strip(" \t"))),
    ),
    sizes,
)
def test_ranges_agree_with_aiohttps_parser(header: str, size: int) -> None:
    """parse_range (which answers every blob request) agrees with aiohttp's Range parser,
    except that `bytes=-0` is a 416 (RFC 9110) where aiohttp sends all."""
    assume("\r" not in header and "\n" not in header)
    assume(not re.fullmatch(r"bytes=-0+", header.strip(" \t"), re.IGNORECASE))
    assume(not ignored(header))  # aiohttp's parser refuses what the mirror ignores
    ours = _check_range(header, size)
    theirs = _aiohttp_range(header.strip(" \t"), size)  # as aiohttp's parser hands it over
    assert (None if isinstance(ours, int) else (ours.start, ours.end)) == theirs


# --- config ------------------------------------------------------------------------------


def load_text(text: str | bytes) -> Config:
    """`load_config` of a file holding `text`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "mirror.yaml")
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return load_config(path)


def _upstream(**extra: object) -> dict[str, object]:
    return {"name": "up", "url": "https://registry.example.com", **extra}


def _url_is_usable(url: str) -> Callable[[], object]:
    def load() -> object:
        config = config_from_dict({"upstreams": [_upstream(url=url)]})
        return URL(config.upstreams[0].url)  # what UpstreamClient does with it at start

    return load


def _infinite_max_age() -> None:
    max_age = config_from_dict({"storage": {"max_age": "9" * 400}}).storage.max_age
    int(max_age or 0)  # as `mirror du` shows it: OverflowError


def _binary_htpasswd() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "htpasswd").write_bytes(b"\xff\xfe")
        config_from_dict({"auth": {"htpasswd": str(Path(tmp, "htpasswd"))}})


# Inputs on which the config loader once raised something else than ConfigError (or
# accepted a value that broke later), each reproduced alone.
CONFIG_REGRESSIONS: dict[str, Callable[[], object]] = {
    "yaml-invalid-date": lambda: load_text("storage:\n  max_age: 2001-02-30\n"),
    "yaml-bad-tag-value": lambda: load_text("listen: !!int zz\n"),
    "yaml-bad-timestamp-tag": lambda: load_text("listen: !!timestamp x\n"),
    "yaml-deep-nesting": lambda: load_text("listen: " + "[" * 600 + "]" * 600 + "\n"),
    "yaml-huge-int": lambda: load_text("listen: " + "9" * 5000 + "\n"),
    "file-not-utf8": lambda: load_text(b"listen: \xff\n"),
    "path-with-nul": lambda: load_config("mirror\x00.yaml"),
    "size-overflow": lambda: config_from_dict({"storage": {"max_size": "9" * 400}}),
    "duration-int-overflow": lambda: config_from_dict({"upstreams": [_upstream(tag_ttl=10**400)]}),
    "duration-infinite": _infinite_max_age,
    "listen-unicode-digit": lambda: config_from_dict({"listen": "127.0.0.1:\u00b2"}),
    "listen-long-port": lambda: config_from_dict({"listen": "127.0.0.1:" + "1" * 5000}),
    "url-bad-ipv6": lambda: config_from_dict({"upstreams": [_upstream(url="http://[::1")]}),
    "url-bad-port": _url_is_usable("https://registry.example.com:99999"),
    "url-backslash": _url_is_usable("https://registry\\example.com"),
    "url-bad-idna": _url_is_usable("https://\x80.example.com"),
    "htpasswd-path-with-nul": lambda: config_from_dict({"auth": {"htpasswd": "ht\x00passwd"}}),
    "htpasswd-not-utf8": _binary_htpasswd,
}


@pytest.mark.parametrize("bug", list(CONFIG_REGRESSIONS))
def test_config_regressions(bug: str) -> None:
    try:
        CONFIG_REGRESSIONS[bug]()
    except ConfigError as error:
        assert str(error).startswith(f"{error.key}: ") or not error.key


def _check_usable(config: Config) -> None:
    """What the loader accepted, the rest of the mirror can use."""
    assert 0 < config.listen.port < 65536
    assert isinstance(config.storage.max_size, int) and config.storage.max_size >= 0
    assert config.storage.max_age is None or 0 <= config.storage.max_age < math.inf
    for upstream in config.upstreams:
        URL(upstream.url)  # as UpstreamClient reads it
        urlsplit(upstream.url).port  # noqa: B018 (raises ValueError for a bad port)
        assert 0 <= upstream.tag_ttl < math.inf
        timeouts = upstream.timeouts
        assert all(0 < t < math.inf for t in (timeouts.connect, timeouts.first_byte, timeouts.idle))
    assert sum(u.default for u in config.upstreams) == 1


def _root(key: str) -> str:
    return re.split(r"[.\[]", key, maxsplit=1)[0]


def _check_config_error(error: ConfigError, root: str) -> None:
    assert error.key == root or _root(error.key) == root, (error.key, root)
    assert str(error).startswith(f"{error.key}: ")


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**400), 10**400),
    st.floats(),
    st.text(max_size=20),
)
yaml_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_units = st.sampled_from(["", "b", "KiB", "mb", "GiB", "tb", "k", "ms", "s", "m", "h", "d", "x"])
_numbers = st.one_of(
    st.integers(0, 10**6).map(str),
    st.builds("{}.{}".format, st.integers(0, 999), st.integers(0, 999)),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4),
    st.integers(300, 500).map(lambda n: "9" * n),
)
near_valid: st.SearchStrategy[Any] = st.one_of(
    st.builds(lambda n, s, u: f"{n}{s}{u}", _numbers, st.sampled_from(["", " "]), _units),
    st.builds(
        str.__add__, st.sampled_from(["http://", "https://", "ftp://", "http://["]), any_text
    ),
    mutated(st.sampled_from(["https://registry.example.com", "http://[::1]:5000", "http://h:80"])),
    st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(["", "127.0.0.1", "[::1]", "h"]), _numbers),
    st.sampled_from(["anonymous", "basic", "ecr", "public", "authenticated", "json", "warning"]),
    st.sampled_from(["registry", "mirror"]),
    st.sampled_from(["docker.io/library/alpine", "ghcr.io/o/a:1", "Ghcr.io/x"]),
    st.lists(st.sampled_from(["docker.io", "ghcr.io", "Quay.io", "h:99", "a b", ""]), max_size=3),
    st.lists(st.one_of(reference_texts, mutated(reference_texts)), max_size=3),
    any_text.map(lambda t: t + "\x00"),
    st.floats(allow_nan=True, allow_infinity=True),
)

_UPSTREAM_KEYS = [
    "name", "url", "hosts", "prefix", "default", "tag_ttl", "auth", "ratelimit_reserve",
    "access", "allowed_realms", "max_fetches", "max_queued", "timeouts", "retries", "type",
]  # fmt: skip
_AUTH_KEYS = ["type", "username", "password_env", "password_file", "region", "registry_id"]
# Every key the loader knows, as a path into `base_config()`.
KEY_PATHS: list[tuple[str | int, ...]] = [
    ("listen",),
    ("storage",),
    *[("storage", k) for k in ["path", "max_size", "high_watermark", "low_watermark", "max_age"]],
    ("upstreams",),
    ("upstreams", 0),
    *[("upstreams", i, k) for i in (0, 1) for k in _UPSTREAM_KEYS],
    *[("upstreams", 1, "auth", k) for k in _AUTH_KEYS],
    *[("upstreams", 0, "timeouts", k) for k in ["connect", "first_byte", "idle"]],
    ("pins",),
    ("log",),
    ("log", "format"),
    ("log", "level"),
    ("auth",),
    ("auth", "htpasswd"),
    ("tls",),
    ("tls", "cert"),
    ("tls", "key"),
    ("limits",),
    ("limits", "max_connections"),
    ("limits", "max_header_size"),
    ("limits", "header_timeout"),
    ("limits", "keepalive_timeout"),
]


def base_config() -> dict[str, Any]:
    """A valid config using most keys. Left out: pins (they depend on the upstreams'
    hosts, so a change there would be named by pins), auth and tls (they need files)."""
    return {
        "listen": "127.0.0.1:5000",
        "storage": {"path": "data", "max_size": "10GiB", "max_age": "30d"},
        "upstreams": [
            {
                "name": "hub",
                "url": "https://registry-1.docker.io",
                "default": True,
                "tag_ttl": "5m",
                "ratelimit_reserve": 2,
                "timeouts": {"connect": "10s", "first_byte": 30, "idle": "1m"},
                "retries": 3,
            },
            {
                "name": "ghcr",
                "url": "https://ghcr.io",
                "prefix": "ghcr",
                "auth": {"type": "basic", "username": "me", "password_env": "GHCR_TOKEN"},
                "allowed_realms": ["auth.example.com"],
            },
        ],
        "log": {"format": "json", "level": "debug"},
        "limits": {
            "max_connections": 100,
            "max_header_size": "16KiB",
            "header_timeout": "10s",
            "keepalive_timeout": 60,
        },
    }


def _put(config: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    node: Any = config
    for step in path[:-1]:
        if isinstance(node, dict) and step not in node:
            node[step] = {}
        node = node[step]
    node[path[-1]] = value


def test_base_config_is_valid() -> None:
    _check_usable(config_from_dict(base_config()))


@SLOW
@given(st.sampled_from(KEY_PATHS), st.one_of(yaml_values, near_valid))
@example(("storage", "max_size"), "9" * 400)
@example(("upstreams", 0, "tag_ttl"), 10**400)
@example(("storage", "max_age"), "9" * 400)
@example(("listen",), "127.0.0.1:\u00b2")
@example(("upstreams", 0, "url"), "http://[::1")
@example(("upstreams", 1, "url"), "https://ghcr.io:99999")
@example(("upstreams", 1, "url"), "https://\x80")
@example(("auth", "htpasswd"), "ht\x00passwd")
@example(("tls", "cert"), "c\x00.pem")
def test_any_value_under_a_key_loads_or_names_that_key(
    path: tuple[str | int, ...], value: object
) -> None:
    config = base_config()
    _put(config, path, value)
    try:
        loaded = config_from_dict(config)
    except ConfigError as error:
        _check_config_error(error, str(path[0]))
        return
    _check_usable(loaded)


KNOWN_KEYS: dict[tuple[str | int, ...], set[str]] = {
    (): {"listen", "storage", "upstreams", "pins", "log", "auth", "tls", "limits"},
    ("storage",): {"path", "max_size", "high_watermark", "low_watermark", "max_age"},
    ("upstreams", 0): {*_UPSTREAM_KEYS, "username", "password_env"},  # the last two: moved
    ("upstreams", 1, "auth"): set(_AUTH_KEYS),
    ("log",): {"format", "level"},
    ("limits",): {"max_connections", "max_header_size", "header_timeout", "keepalive_timeout"},
}


def _key_path(path: tuple[str | int, ...]) -> str:
    """`("upstreams", 1, "auth")` as the loader names it: `upstreams[1].auth`."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else f".{step}" if text else step
    return text


@SLOW
@given(st.sampled_from(sorted(KNOWN_KEYS, key=str)), st.text(min_size=1, max_size=20), yaml_values)
def test_unknown_keys_are_named(path: tuple[str | int, ...], key: str, value: object) -> None:
    assume(key not in KNOWN_KEYS[path])
    config = base_config()
    _put(config, (*path, key), value)
    with pytest.raises(ConfigError) as caught:
        config_from_dict(config)
    assert caught.value.key == _key_path((*path, key))
    assert str(caught.value).startswith(f"{caught.value.key}: unknown key")


@SLOW
@given(
    st.one_of(
        yaml_values,
        st.dictionaries(
            st.sampled_from(sorted(KNOWN_KEYS[()])), st.one_of(yaml_values, near_valid)
        ),
    )
)
@example({"listen": "127.0.0.1:\u00b2"})
def test_any_shape_at_the_root_loads_or_is_refused(data: object) -> None:
    try:
        loaded = config_from_dict(data)
    except ConfigError as error:
        assert str(error).startswith(f"{error.key}: ") or error.key == ""
        return
    _check_usable(loaded)


@SLOW
@given(
    st.one_of(
        any_text,
        yaml_values.map(yaml.safe_dump),
        st.builds(lambda k, v: f"{k}: {v}\n", st.sampled_from(["listen", "storage"]), any_text),
        st.binary().map(lambda b: b"listen: " + b),
    )
)
@example("storage:\n  max_age: 2001-02-30\n")
@example("listen: !!timestamp x\n")
@example(b"listen: \xff\n")
@example("listen: " + "[" * 600 + "]" * 600)
def test_any_config_file_loads_or_is_refused(text: str | bytes) -> None:
    try:
        loaded = load_text(text)
    except ConfigError as error:
        assert str(error).startswith(f"{error.key}: ") or error.key == ""
        return
    _check_usable(loaded)


_OBJECTS = st.one_of(yaml_values, near_valid)


@FAST
@given(_OBJECTS)
@example("9" * 400)
@example(10**400)
@example("127.0.0.1:\u00b2")
@example("http://[::1")
@example("https://h:99999")
def test_scalar_parsers_return_or_name_their_key(value: object) -> None:
    checks: list[tuple[Callable[[object, str], object], Callable[[Any], bool]]] = [
        (parse_size, lambda n: isinstance(n, int) and n >= 0),
        (parse_duration, lambda s: 0 <= s < math.inf),
        (parse_listen, lambda listen: 0 < listen.port < 65536),
        (parse_url, _usable_url),
    ]
    for parse, valid in checks:
        try:
            result = parse(value, "some.key")
        except ConfigError as error:
            assert error.key == "some.key" and str(error).startswith("some.key: ")
            continue
        assert valid(result), (value, result)


def _usable_url(url: str) -> bool:
    URL(url)  # as UpstreamClient reads it: ValueError for a bad port
    return urlsplit(url).port is not None or urlsplit(url).hostname is not None


# Generated valid configs load with the values written.

_SIZE_FACTORS = {
    "": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
}  # fmt: skip
_DURATION_FACTORS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _any_case(draw: st.DrawFn, word: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in word)


@st.composite
def sizes_written(draw: st.DrawFn) -> tuple[object, int]:
    """`10GiB`, `1.5 tb`, `500`, or a bare int; and the bytes it means."""
    whole, quarter = draw(st.integers(0, 10**6)), draw(st.integers(0, 3))
    if draw(st.booleans()):
        return whole, whole
    unit = draw(st.sampled_from(sorted(_SIZE_FACTORS)))
    number = str(whole) + ("" if not quarter else ["", ".25", ".5", ".75"][quarter])
    text = f"{number}{draw(st.sampled_from(['', ' ']))}{_any_case(draw, unit)}"
    return text, math.floor(Fraction(whole * 4 + quarter, 4) * _SIZE_FACTORS[unit])


@st.composite
def durations_written(draw: st.DrawFn) -> tuple[object, float]:
    """`90s`, `10m`, `12h`, `30d`, `250ms`, or a bare number of seconds."""
    n = draw(st.integers(0, 10**5))
    match draw(st.sampled_from(["int", "float", "unit", "ms"])):
        case "int":
            return n, float(n)
        case "float":
            return n / 4, n / 4
        case "ms":
            return f"{n}ms", n / 1000
        case _:
            unit = draw(st.sampled_from(sorted(_DURATION_FACTORS)))
            return f"{n}{unit}", float(n * _DURATION_FACTORS[unit])


@st.composite
def listens(draw: st.DrawFn) -> tuple[str, Listen]:
    port = draw(st.integers(1, 65535))
    host = draw(st.sampled_from(["", "0.0.0.0", "127.0.0.1", "[::1]", "[::]", "mirror.local"]))
    return f"{host}:{port}", Listen(host.strip("[]") or "0.0.0.0", port)


@st.composite
def valid_configs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config, and what must be read from it."""
    listen, expected_listen = draw(listens())
    max_size, expected_size = draw(sizes_written())
    path = draw(st.text(string.ascii_letters + string.digits + "/._-", min_size=1, max_size=30))
    count = draw(st.integers(1, 4))
    upstream_names = draw(
        st.lists(
            st.builds(str.__add__, _alnum, st.text(string.ascii_lowercase + "_.-", max_size=6)),
            min_size=count,
            max_size=count,
            unique=True,
        )
    )
    default = draw(st.integers(0, count - 1))
    upstreams, expected_upstreams = [], []
    for i, name in enumerate(upstream_names):
        port = draw(st.none() | st.integers(1, 65535))
        host = f"r{i}.{draw(_labels)}.example"
        url = f"{draw(st.sampled_from(['http', 'https']))}://{host}" + (f":{port}" if port else "")
        url += draw(st.sampled_from(["", "/"]))
        upstream: dict[str, object] = {"name": name, "url": url}
        if i == default and (count > 1 or draw(st.booleans())):
            upstream["default"] = True
        elif draw(st.booleans()):
            upstream["default"] = False
        ttl = draw(st.none() | durations_written())
        if ttl is not None:
            upstream["tag_ttl"] = ttl[0]
        expected_ttl = DEFAULT_TAG_TTL if ttl is None else ttl[1]
        upstreams.append(upstream)
        expected_upstreams.append(
            (name, url.rstrip("/"), i == default, expected_ttl, default_hosts(url.rstrip("/")))
        )
    config = {
        "listen": listen,
        "storage": {"path": path, "max_size": max_size},
        "upstreams": upstreams,
    }
    expected = {"listen": expected_listen, "path": Path(path), "max_size": expected_size}
    return config, {**expected, "upstreams": expected_upstreams}


def _check_values(config: Config, expected: dict[str, Any]) -> None:
    assert config.listen == expected["listen"]
    assert config.storage.path == expected["path"]
    assert config.storage.max_size == expected["max_size"]
    got = [(u.name, u.url, u.default, u.tag_ttl, u.hosts) for u in config.upstreams]
    assert len(got) == len(expected["upstreams"])
    for (name, url, default, ttl, hosts), want in zip(got, expected["upstreams"], strict=True):
        assert (name, url, default, hosts) == (want[0], want[1], want[2], want[4])
        assert math.isclose(ttl, want[3], rel_tol=1e-12, abs_tol=1e-12)
    _check_usable(config)


@SLOW
@given(valid_configs())
def test_valid_configs_load_with_their_values(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    data, expected = pair
    _check_values(config_from_dict(copy.deepcopy(data)), expected)
    _check_values(load_text(yaml.safe_dump(data)), expected)
