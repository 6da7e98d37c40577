"""The config contract: YAML into frozen dataclasses, every mistake named by its key."""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import write_htpasswd

from mirror.cli import main
from mirror.config import (
    DOCKER_HUB,
    DOCKER_HUB_URL,
    Config,
    Limits,
    Listen,
    SharedConfig,
    config_from_dict,
    environment_names,
    key_variables,
    load_config,
    parse_duration,
    parse_size,
    with_overrides,
)
from mirror.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_embedded_default_needs_no_file() -> None:
    config = load_config(None)
    assert config.listen == Listen("0.0.0.0", 5000)
    assert config.storage.path == Path("data")
    upstream = config.default_upstream
    assert (upstream.url, upstream.auth.type, upstream.tag_ttl) == (
        DOCKER_HUB_URL,
        "anonymous",
        300.0,
    )
    assert upstream.hosts == ("docker.io", "index.docker.io", "registry-1.docker.io")


def test_shipped_configs_load(documented_config: Path) -> None:
    documented = load_config(documented_config)
    # The documented example spells out the defaults, then adds ECR and GHCR.
    defaults = Config()
    assert (documented.listen, documented.storage) == (defaults.listen, defaults.storage)
    hub, ecr, ghcr = documented.upstreams
    assert hub == DOCKER_HUB == defaults.default_upstream
    assert (hub.access, ecr.access, ghcr.access) == ("public", "authenticated", "public")
    assert documented.auth.htpasswd is not None and documented.limits == Limits()
    assert (ecr.prefix, ecr.auth.type, ecr.auth.region, ecr.auth.registry_id) == (
        "ecr",
        "ecr",
        "eu-west-1",
        "123456789012",
    )
    assert (ghcr.prefix, ghcr.hosts, ghcr.auth.type) == ("ghcr", ("ghcr.io",), "anonymous")
    minimal = load_config(REPO / "config" / "minimal.yaml")
    assert minimal.storage.max_size == 50 * 1024**3


def test_documented_config_needs_its_htpasswd_file() -> None:
    # /etc/mirror/htpasswd does not exist here: the error names the key and the file.
    with pytest.raises(ConfigError, match=r"^auth.htpasswd: cannot read /etc/mirror/htpasswd"):
        load_config(REPO / "config" / "mirror.yaml")


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().listen = Listen()  # type: ignore[misc]


def test_full_config(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "listen: 127.0.0.1:6000\n"
        "storage: {path: /srv/cache, max_size: 500MiB}\n"
        "upstreams:\n"
        "  - {name: hub, url: 'https://registry-1.docker.io/', tag_ttl: 10m}\n"
        "  - {name: local, url: 'http://127.0.0.1:5001', default: true,"
        " auth: {type: basic, username: u, password_env: P}}\n"
    )
    config = load_config(path)
    assert config.listen == Listen("127.0.0.1", 6000)
    assert (config.storage.path, config.storage.max_size) == (Path("/srv/cache"), 500 * 1024**2)
    hub, local = config.upstreams
    assert (hub.url, hub.tag_ttl, hub.default) == ("https://registry-1.docker.io", 600.0, False)
    assert config.default_upstream is local
    assert (local.auth.username, local.auth.password_env) == ("u", "P")
    assert hub.hosts == ("docker.io", "index.docker.io", "registry-1.docker.io")
    assert local.hosts == ("127.0.0.1:5001",)


def test_single_upstream_is_the_default() -> None:
    config = config_from_dict({"upstreams": [{"name": "a", "url": "http://a"}]})
    assert config.default_upstream.name == "a"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"listn": "x"}, "listn"),
        ({"listen": "nope"}, "listen"),
        ({"listen": "1.2.3.4:99999"}, "listen"),
        ({"storage": []}, "storage"),
        ({"storage": {"pth": "x"}}, "storage.pth"),
        ({"storage": {"path": ""}}, "storage.path"),
        ({"storage": {"path": 5}}, "storage.path"),
        ({"storage": {"max_size": "lots"}}, "storage.max_size"),
        ({"storage": {"max_size": "-5GiB"}}, "storage.max_size"),
        ({"upstreams": []}, "upstreams"),
        ({"upstreams": {"name": "a"}}, "upstreams"),
        ({"upstreams": ["x"]}, "upstreams[0]"),
        ({"upstreams": [{"url": "http://a"}]}, "upstreams[0].name"),
        ({"upstreams": [{"name": "a"}]}, "upstreams[0].url"),
        ({"upstreams": [{"name": "A B", "url": "http://a"}]}, "upstreams[0].name"),
        ({"upstreams": [{"name": "a", "url": "ftp://a"}]}, "upstreams[0].url"),
        ({"upstreams": [{"name": "a", "url": "a.example"}]}, "upstreams[0].url"),
        ({"upstreams": [{"name": "a", "url": "http://a", "tag_ttl": "soon"}]},
         "upstreams[0].tag_ttl"),
        ({"upstreams": [{"name": "a", "url": "http://a", "default": "yes"}]},
         "upstreams[0].default"),
        ({"upstreams": [{"name": "a", "url": "http://a", "username": "u"}]},
         "upstreams[0].username"),
        ({"upstreams": [{"name": "a", "url": "http://a", "extra": 1}]}, "upstreams[0].extra"),
        ({"upstreams": [{"name": "a", "url": "http://a"}, {"name": "b", "url": "http://b"}]},
         "upstreams"),
        ({"upstreams": [{"name": "a", "url": "http://a", "default": True},
                        {"name": "a", "url": "http://b"}]}, "upstreams[1].name"),
        ({"upstreams": [{"name": "a", "url": "http://a", "default": True},
                        {"name": "b", "url": "http://b", "default": True}]}, "upstreams"),
        ({"upstreams": [{"name": "a", "url": "http://a", "default": True},
                        {"name": "b", "url": "http://b", "hosts": ["a"]}]}, "upstreams[1].hosts"),
        ({"upstreams": [{"name": "a", "url": "http://a", "default": True},
                        {"name": "b", "url": "http://a"}]}, "upstreams[1].hosts"),
        ({"upstreams": [{"name": "a", "url": "http://a", "default": True, "prefix": "p"},
                        {"name": "b", "url": "http://b", "prefix": "p"}]}, "upstreams[1].prefix"),
        ({"upstreams": [{"name": "a", "url": "http://a", "hosts": []}]}, "upstreams[0].hosts"),
        ({"upstreams": [{"name": "a", "url": "http://a", "hosts": "a"}]}, "upstreams[0].hosts"),
        ({"upstreams": [{"name": "a", "url": "http://a", "hosts": ["a b"]}]},
         "upstreams[0].hosts[0]"),
        ({"upstreams": [{"name": "a", "url": "http://a", "prefix": "/p"}]}, "upstreams[0].prefix"),
        ({"upstreams": [{"name": "a", "url": "http://a", "prefix": "P"}]}, "upstreams[0].prefix"),
        ({"upstreams": [{"name": "a", "url": "http://a", "ratelimit_reserve": -1}]},
         "upstreams[0].ratelimit_reserve"),
        ({"upstreams": [{"name": "a", "url": "http://a", "ratelimit_reserve": "5"}]},
         "upstreams[0].ratelimit_reserve"),
        ({"upstreams": [{"name": "a", "url": "http://a", "password_env": "P"}]},
         "upstreams[0].password_env"),
        ({"upstreams": [{"name": "a", "url": "http://a", "auth": "basic"}]}, "upstreams[0].auth"),
        ({"upstreams": [{"name": "a", "url": "http://a", "auth": {"type": "token"}}]},
         "upstreams[0].auth.type"),
        ({"upstreams": [{"name": "a", "url": "http://a", "auth": {"typo": 1}}]},
         "upstreams[0].auth.typo"),
        ({"upstreams": [{"name": "a", "url": "http://a", "auth": {"type": "basic"}}]},
         "upstreams[0].auth.username"),
        ({"upstreams": [{"name": "a", "url": "http://a",
                         "auth": {"type": "basic", "username": "u"}}]},
         "upstreams[0].auth.password_env"),
        ({"upstreams": [{"name": "a", "url": "http://a", "auth": {
            "type": "basic", "username": "u", "password_env": "P", "password_file": "/f"}}]},
         "upstreams[0].auth.password_env"),
        ({"upstreams": [{"name": "a", "url": "http://a", "auth": {"username": "u"}}]},
         "upstreams[0].auth.username"),
        ({"upstreams": [{"name": "a", "url": "http://a",
                         "auth": {"type": "basic", "username": "u", "password_env": "P",
                                  "region": "us-east-1"}}]},
         "upstreams[0].auth.region"),
        ({"upstreams": [{"name": "a", "url": "https://ecr.example", "auth": {"type": "ecr"}}]},
         "upstreams[0].auth.region"),
        ({"upstreams": [{"name": "a", "url": "https://ecr.example",
                         "auth": {"type": "ecr", "region": "us-east-1"}}]},
         "upstreams[0].auth.registry_id"),
        ({"upstreams": [{"name": "a", "url": "http://a", "type": "proxy"}]}, "upstreams[0].type"),
        ({"upstreams": [{"name": "a", "url": "http://a", "type": 1}]}, "upstreams[0].type"),
        ({"upstreams": [{"name": "a", "url": "http://a", "type": "mirror", "hosts": ["a"]}]},
         "upstreams[0].hosts"),
        ({"upstreams": [{"name": "a", "url": "http://a", "type": "mirror", "default": True},
                        {"name": "b", "url": "http://b", "type": "mirror"}]}, "upstreams[1].type"),
        ({"storage": {"high_watermark": 1.5}}, "storage.high_watermark"),
        ({"storage": {"high_watermark": "90%"}}, "storage.high_watermark"),
        ({"storage": {"low_watermark": 0}}, "storage.low_watermark"),
        ({"storage": {"low_watermark": 0.95}}, "storage.low_watermark"),  # above the high
        ({"storage": {"max_age": "a month"}}, "storage.max_age"),
        ({"pins": "docker.io/library/alpine"}, "pins"),
        ({"pins": [5]}, "pins[0]"),
        ({"pins": ["docker.io/Library/alpine"]}, "pins[0]"),
        ({"pins": ["alpine:bad tag"]}, "pins[0]"),
        ({"pins": ["quay.io/org/app:1"]}, "pins[0]"),  # no upstream serves quay.io
        ({"log": {"format": "xml"}}, "log.format"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"log": {"colour": True}}, "log.colour"),
    ],
)  # fmt: skip
def test_mistakes_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(not_a_mapping)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


@pytest.mark.parametrize(
    ("text", "size"),
    [(0, 0), (1234, 1234), ("1234", 1234), ("500MiB", 500 * 1024**2), ("50GiB", 50 * 1024**3),
     ("2TB", 2 * 1000**4), ("1.5GiB", 1536 * 1024**2), ("10 kb", 10_000), ("1G", 1024**3)],
)  # fmt: skip
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "5 parsecs", "-1", True, None, 1.5, "1e9"])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(text, "storage.max_size")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(0, 0.0), (90, 90.0), ("90s", 90.0), ("10m", 600.0), ("12h", 43200.0), ("30d", 2592000.0),
     ("0s", 0.0), ("1.5h", 5400.0), ("250ms", 0.25)],
)  # fmt: skip
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "10y", "-5s", False, None])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text, "upstreams[0].tag_ttl")


def test_flags_override_the_file() -> None:
    config = with_overrides(
        Config(),
        listen="127.0.0.1:7000",
        storage="/tmp/c",
        upstream="http://127.0.0.1:5001/",
        max_size="1GiB",
    )
    assert config.listen == Listen("127.0.0.1", 7000)
    assert (config.storage.path, config.storage.max_size) == (Path("/tmp/c"), 1024**3)
    (upstream,) = config.upstreams
    assert (upstream.url, upstream.default) == ("http://127.0.0.1:5001", True)
    assert with_overrides(Config()) == Config()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("listen", "x"), ("upstream", "nope"), ("max_size", "big")],
)
def test_bad_flags_name_the_flag(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        with_overrides(Config(), **{flag: value})
    assert caught.value.key == "--" + flag.replace("_", "-")


def test_ipv6_listen() -> None:
    config = with_overrides(Config(), listen="[::1]:5000")
    assert config.listen == Listen("::1", 5000)
    assert str(config.listen) == "[::1]:5000"


def test_budget_and_pins() -> None:
    config = config_from_dict(
        {
            "storage": {"max_size": "1GiB", "high_watermark": 0.95, "low_watermark": 0.5,
                        "max_age": "30d"},
            "pins": ["alpine:3.20", "docker.io/library/busybox@sha256:" + "a" * 64],
        }
    )  # fmt: skip
    storage = config.storage
    assert (storage.high_watermark, storage.low_watermark, storage.max_age) == (
        0.95,
        0.5,
        30 * 86400.0,
    )
    assert [str(pin) for pin in config.pins] == [
        "docker.io/alpine:3.20",
        "docker.io/library/busybox@sha256:" + "a" * 64,
    ]
    assert Config().storage.max_age is None


# --- credentials never in an upstream URL ---------------------------------------------------

SECRET_URLS = [
    "http://alice:S3CRET@registry.example",
    "https://alice:S3CRET@registry.example:5000/",
    "http://alice:S3C@RET@registry.example",  # an @ in the password
    "http://alice:S3C/RET@registry.example",  # a / in it: no valid URL at all
    "ftp://alice:S3CRET@registry.example",  # a wrong scheme as well
    "alice:S3CRET@registry.example",  # no scheme
    "http://S3CRET@registry.example",  # a token as the user name
]


def assert_no_secret(text: str) -> None:
    assert "S3C" not in text and "RET@" not in text and "alice" not in text, text


def load_upstream(key: str, url: str) -> Config:
    """The URL given in the config file, or with the command-line flag."""
    if key == "--upstream":
        return with_overrides(Config(), upstream=url)
    return config_from_dict({"upstreams": [{"name": "a", "url": url}]})


@pytest.mark.parametrize("key", ["upstreams[0].url", "--upstream"])
@pytest.mark.parametrize("url", SECRET_URLS)
def test_credentials_in_an_upstream_url_are_refused_and_never_repeated(key: str, url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_upstream(key, url)
    assert caught.value.key == key
    assert "auth: {type: basic" in str(caught.value)
    assert_no_secret(str(caught.value))


def test_credentials_in_an_upstream_url_stop_every_command_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing starts, so nothing (log, `mirror ls`, metrics) can show them."""
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage: {{path: {tmp_path / 'cache'}}}\n"
        f"upstreams: [{{name: up, url: '{SECRET_URLS[0]}'}}]\n"
    )
    for args in (
        ["check-config", str(config)],
        ["ls", "--config", str(config)],
        ["serve", "--config", str(config)],
        ["serve", "--upstream", SECRET_URLS[0], "--storage", str(tmp_path / "cache")],
    ):
        assert main(args) == 2, args
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, (args, err)
        key = "--upstream" if "--upstream" in args else "upstreams[0].url"
        assert err.startswith(f"mirror: config error: {key}: must not hold credentials")
        assert_no_secret(err)
    # The real console script, as a service manager runs it.
    script = Path(sys.executable).parent / "mirror"
    served = subprocess.run(
        [str(script), "serve", "--config", str(config), "--listen", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert served.returncode == 2 and served.stdout == ""
    assert served.stderr.startswith("mirror: config error: upstreams[0].url: ")
    assert_no_secret(served.stderr)
    assert not (tmp_path / "cache").exists()


# --- the environment --------------------------------------------------------------------------

# Every scalar key, set by its variable: the value as text, and what the config then holds.
EVERY_VARIABLE = [
    ("MIRROR_LISTEN", "[::1]:6000", lambda c: c.listen, Listen("::1", 6000)),  # no quoting
    ("MIRROR_LISTEN", "127.0.0.1:6000", lambda c: c.listen, Listen("127.0.0.1", 6000)),
    ("MIRROR_STORAGE__PATH", "/srv/cache", lambda c: c.storage.path, Path("/srv/cache")),
    ("MIRROR_STORAGE__MAX_SIZE", "500MiB", lambda c: c.storage.max_size, 500 * 1024**2),
    ("MIRROR_STORAGE__MAX_SIZE", "1000", lambda c: c.storage.max_size, 1000),
    ("MIRROR_STORAGE__HIGH_WATERMARK", "0.95", lambda c: c.storage.high_watermark, 0.95),
    ("MIRROR_STORAGE__LOW_WATERMARK", "0.5", lambda c: c.storage.low_watermark, 0.5),
    ("MIRROR_STORAGE__LOW_WATERMARK", "1", lambda c: c.storage.low_watermark, None),  # >= high
    ("MIRROR_STORAGE__MAX_AGE", "30d", lambda c: c.storage.max_age, 30 * 86400.0),
    ("MIRROR_STORAGE__MAX_AGE", "90", lambda c: c.storage.max_age, 90.0),
    ("MIRROR_LOG__FORMAT", "json", lambda c: c.log.format, "json"),
    ("MIRROR_LOG__LEVEL", "DEBUG", lambda c: c.log.level, "debug"),
    ("MIRROR_LIMITS__MAX_CONNECTIONS", "64", lambda c: c.limits.max_connections, 64),
    ("MIRROR_LIMITS__MAX_HEADER_SIZE", "16KiB", lambda c: c.limits.max_header_size, 16384),
    ("MIRROR_LIMITS__HEADER_TIMEOUT", "10s", lambda c: c.limits.header_timeout, 10.0),
    ("MIRROR_LIMITS__KEEPALIVE_TIMEOUT", "2m", lambda c: c.limits.keepalive_timeout, 120.0),
    ("MIRROR_WORKERS", "4", lambda c: c.workers, 4),
    ("MIRROR_STATUS_PAGE", "false", lambda c: c.status_page, False),
    ("MIRROR_STATUS_PAGE", "no", lambda c: c.status_page, False),  # YAML 1.1, as in the file
    ("MIRROR_STATUS_PAGE", "true", lambda c: c.status_page, True),
]


@pytest.mark.parametrize(("variable", "text", "held", "value"), EVERY_VARIABLE)
def test_each_variable_sets_its_key(
    variable: str, text: str, held: Callable[[Config], object], value: object
) -> None:
    if value is None:
        with pytest.raises(ConfigError) as caught:
            load_config(None, {variable: text})
        assert caught.value.key == variable
        return
    assert held(load_config(None, {variable: text})) == value


def test_every_scalar_key_has_a_variable_and_no_list_has_one(tmp_path: Path) -> None:
    names = key_variables()
    files = {"MIRROR_AUTH__HTPASSWD", "MIRROR_TLS__CERT", "MIRROR_TLS__KEY"}
    # The other ways than SHARED_VARIABLES's database_env and peer_secret_env.
    dsn = {"MIRROR_SHARED__DATABASE", "MIRROR_SHARED__PEER_SECRET"}
    every = {name for name, *_ in EVERY_VARIABLE} | files | SHARED_VARIABLES.keys() | dsn
    assert every == names.keys()
    assert names["MIRROR_LIMITS__HEADER_TIMEOUT"] == ("limits", "header_timeout")
    assert not any("UPSTREAMS" in name or "PINS" in name for name in names)
    assert environment_names() == names.keys() | {"MIRROR_CONFIG", "MIRROR_UPSTREAM"}
    # Each variable's value is read as the same text in the file would be (the last of
    # each name in the table, all valid).
    text = {name: value for name, value, *_ in EVERY_VARIABLE if "WATERMARK" not in name}
    sections: dict[str, list[str]] = {}
    for name, value in text.items():
        *section, key = names[name]
        sections.setdefault(section[0] if section else "", []).append(f"{key}: {value}")
    lines = sections.pop("")
    lines += [f"{section}: {{{', '.join(keys)}}}" for section, keys in sections.items()]
    file = tmp_path / "m.yaml"
    file.write_text("\n".join(lines) + "\n")
    assert load_config(file) == load_config(None, text) != Config()


SHARED_VARIABLES = {
    "MIRROR_SHARED__BUCKET": "cache-bucket",
    "MIRROR_SHARED__MAX_SIZE": "2GiB",
    "MIRROR_SHARED__DATABASE_ENV": "MIRROR_TEST_DSN",
    "MIRROR_SHARED__ENDPOINT_URL": "http://127.0.0.1:7480",
    "MIRROR_SHARED__REGION": "eu-west-1",
    "MIRROR_SHARED__PREFIX": "fleet",
    "MIRROR_SHARED__REDIRECT": "true",
    "MIRROR_SHARED__PRESIGN_TTL": "5m",
    "MIRROR_SHARED__EVICTION_INTERVAL": "10s",
    "MIRROR_SHARED__PEER_SECRET_ENV": "MIRROR_TEST_PEER_SECRET",
    "MIRROR_SHARED__ADVERTISE_URL": "http://replica-1.fleet:5000/",
    "MIRROR_SHARED__LEASE_TTL": "1m",
}


def test_the_shared_block_from_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRROR_TEST_DSN", "postgresql://m@db/mirror")
    monkeypatch.setenv("MIRROR_TEST_PEER_SECRET", "fleet-s3cret")
    named = {"MIRROR_TEST_DSN": "x", "MIRROR_TEST_PEER_SECRET": "x"}
    shared = load_config(None, {**SHARED_VARIABLES, **named}).shared
    assert shared == SharedConfig(
        bucket="cache-bucket",
        max_size=2 * 1024**3,
        database_env="MIRROR_TEST_DSN",
        endpoint_url="http://127.0.0.1:7480",
        region="eu-west-1",
        prefix="fleet/",
        redirect=True,
        presign_ttl=300.0,
        eviction_interval=10.0,
        peer_secret_env="MIRROR_TEST_PEER_SECRET",
        advertise_url="http://replica-1.fleet:5000",
        lease_ttl=60.0,
    )
    assert shared.dsn() == "postgresql://m@db/mirror"
    assert shared.fleet_secret() == "fleet-s3cret"
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"MIRROR_SHARED__BUCKET": "cache-bucket"})
    assert (caught.value.key, caught.value.problem) == (
        "shared.max_size",
        "is required in fleet mode",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(None, {**SHARED_VARIABLES, "MIRROR_SHARED__DATABASE": "mysql://x"})
    assert caught.value.key == "MIRROR_SHARED__DATABASE"


_SHARED = {"bucket": "abc", "max_size": 1, "database": "postgresql://d"}


@pytest.mark.parametrize(
    ("shared", "key", "problem"),
    [
        ({"max_size": "1GiB", "database": "postgresql://d"}, "shared.bucket", "is required"),
        ({**_SHARED, "bucket": "Bad_Name"}, "shared.bucket", "not a valid bucket name"),
        ({"bucket": "abc", "max_size": 1}, "shared.database", "exactly one of"),
        ({**_SHARED, "database_env": "X"}, "shared.database", "exactly one of"),
        ({**_SHARED, "database": "http://d"}, "shared.database", "postgresql://"),
        ({**_SHARED, "max_size": "lots"}, "shared.max_size", ""),
        ({**_SHARED, "redirect": "yes"}, "shared.redirect", "true or false"),
        ({**_SHARED, "endpoint_url": "rgw:7480"}, "shared.endpoint_url", "http(s) URL"),
        ({**_SHARED, "eviction_interval": 0}, "shared.eviction_interval", "more than 0"),
        ({**_SHARED, "colour": 1}, "shared.colour", "unknown key"),
        ({**_SHARED, "peer_secret": "a", "peer_secret_env": "X"}, "shared.peer_secret", "at most"),
        ({**_SHARED, "peer_secret": ""}, "shared.peer_secret", "non-empty printable ASCII"),
        ({**_SHARED, "peer_secret": "a b"}, "shared.peer_secret", "without spaces"),
        ({**_SHARED, "peer_secret": 42}, "shared.peer_secret", "must be a str"),
        ({**_SHARED, "advertise_url": "replica:5000"}, "shared.advertise_url", "http(s) URL"),
        ({**_SHARED, "advertise_url": "http://u:p@r"}, "shared.advertise_url", "credentials"),
        ({**_SHARED, "lease_ttl": 0}, "shared.lease_ttl", "more than 0"),
        ({**_SHARED, "lease_ttl": "soon"}, "shared.lease_ttl", "invalid duration"),
    ],
)
def test_a_bad_shared_block_names_its_key(
    shared: dict[str, object], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"shared": shared})
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_the_peer_keys_by_default_and_the_advertised_port_follows_listen() -> None:
    config = config_from_dict({"shared": _SHARED, "listen": "127.0.0.1:6000"})
    assert config.shared is not None
    assert config.shared.fleet_secret() is None  # peer requests refused
    assert config.shared.lease_ttl == 30.0
    host = socket.gethostname().lower()
    assert config.shared.advertise_url == f"http://{host}:6000"
    moved = with_overrides(config, listen="127.0.0.1:7000")
    assert moved.shared is not None and moved.shared.advertise_url == f"http://{host}:7000"
    given = config_from_dict({"shared": {**_SHARED, "advertise_url": "http://r1:5000"}})
    kept = with_overrides(given, listen="127.0.0.1:7000")
    assert kept.shared is not None and kept.shared.advertise_url == "http://r1:5000"


def test_the_peer_secret_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    shared = config_from_dict({"shared": {**_SHARED, "peer_secret_env": "MIRROR_PEER_SECRET"}})
    assert shared.shared is not None
    monkeypatch.delenv("MIRROR_PEER_SECRET", raising=False)
    with pytest.raises(ConfigError) as caught:
        shared.shared.fleet_secret()
    assert caught.value.key == "shared.peer_secret_env"
    assert "MIRROR_PEER_SECRET is not set" in caught.value.problem
    monkeypatch.setenv("MIRROR_PEER_SECRET", "bad secret\n")
    with pytest.raises(ConfigError) as caught:
        shared.shared.fleet_secret()
    assert caught.value.key == "shared.peer_secret_env" and "bad" not in caught.value.problem
    monkeypatch.setenv("MIRROR_PEER_SECRET", "fleet-s3cret")
    assert shared.shared.fleet_secret() == "fleet-s3cret"
    # The variable it names is read, not an unknown MIRROR_* variable.
    env = {
        "MIRROR_SHARED__BUCKET": "abc",
        "MIRROR_SHARED__MAX_SIZE": "1",
        "MIRROR_SHARED__DATABASE": "postgresql://d",
        "MIRROR_SHARED__PEER_SECRET_ENV": "MIRROR_PEER_SECRET",
        "MIRROR_PEER_SECRET": "fleet-s3cret",
    }
    assert load_config(None, env).shared is not None


def test_the_peer_secret_stays_out_of_the_config_repr() -> None:
    config = config_from_dict({"shared": {**_SHARED, "peer_secret": "fleet-s3cret"}})
    assert "fleet-s3cret" not in repr(config)
    assert config.shared is not None and config.shared.fleet_secret() == "fleet-s3cret"


def test_a_database_password_stays_out_of_the_config_repr() -> None:
    dsn = "postgresql://mirror:s3cret@db/mirror"
    config = config_from_dict({"shared": {"bucket": "abc", "max_size": 1, "database": dsn}})
    assert "s3cret" not in repr(config)
    assert config.shared is not None and config.shared.dsn() == dsn


def test_the_file_paths_from_variables(tmp_path: Path) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    config = load_config(None, {"MIRROR_AUTH__HTPASSWD": str(htpasswd)})
    assert config.auth.htpasswd == htpasswd
    with pytest.raises(ConfigError, match=r"^MIRROR_AUTH__HTPASSWD: cannot read "):
        load_config(None, {"MIRROR_AUTH__HTPASSWD": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match=r"^MIRROR_TLS__CERT: no such file: "):
        load_config(None, {"MIRROR_TLS__CERT": "/none.pem", "MIRROR_TLS__KEY": "/none.key"})
    with pytest.raises(ConfigError, match=r"^tls.key: is required"):
        load_config(None, {"MIRROR_TLS__CERT": "/none.pem"})


@pytest.mark.parametrize(
    ("env", "variable", "problem"),
    [
        ({"MIRROR_STORAGE__MAX_SIZE": "lots"}, "MIRROR_STORAGE__MAX_SIZE", "invalid size 'lots'"),
        ({"MIRROR_STORAGE__MAX_SIZE": "-5GiB"}, "MIRROR_STORAGE__MAX_SIZE", "invalid size"),
        ({"MIRROR_STORAGE__MAX_SIZE": ""}, "MIRROR_STORAGE__MAX_SIZE", "invalid size ''"),
        ({"MIRROR_STORAGE__PATH": ""}, "MIRROR_STORAGE__PATH", "must not be empty"),
        ({"MIRROR_STORAGE__PATH": "5"}, "MIRROR_STORAGE__PATH", "must be a str, got 5"),
        ({"MIRROR_STORAGE__MAX_AGE": "a month"}, "MIRROR_STORAGE__MAX_AGE", "invalid duration"),
        ({"MIRROR_STORAGE__HIGH_WATERMARK": "90%"}, "MIRROR_STORAGE__HIGH_WATERMARK",
         "must be a fraction"),
        ({"MIRROR_LISTEN": "nope"}, "MIRROR_LISTEN", "invalid address 'nope'"),
        ({"MIRROR_LISTEN": ""}, "MIRROR_LISTEN", "invalid address ''"),
        ({"MIRROR_LOG__FORMAT": "xml"}, "MIRROR_LOG__FORMAT", "must be text or json"),
        ({"MIRROR_LOG__LEVEL": "loud"}, "MIRROR_LOG__LEVEL", "must be one of"),
        ({"MIRROR_LIMITS__HEADER_TIMEOUT": "0"}, "MIRROR_LIMITS__HEADER_TIMEOUT",
         "must be longer than 0s"),
        ({"MIRROR_LIMITS__MAX_CONNECTIONS": "many"}, "MIRROR_LIMITS__MAX_CONNECTIONS",
         "must be a whole number >= 1, got 'many'"),
        ({"MIRROR_WORKERS": "0"}, "MIRROR_WORKERS", "must be a whole number >= 1, got 0"),
        ({"MIRROR_WORKERS": "two"}, "MIRROR_WORKERS", "got 'two'"),
        ({"MIRROR_STATUS_PAGE": "maybe"}, "MIRROR_STATUS_PAGE", "must be true or false"),
        ({"MIRROR_UPSTREAM": "registry.example"}, "MIRROR_UPSTREAM", "must be an http(s) URL"),
        ({"MIRROR_UPSTREAM": SECRET_URLS[0]}, "MIRROR_UPSTREAM", "must not hold credentials"),
        # Kubernetes' http://$(POD_IP):5000 on an IPv6 cluster.
        ({"MIRROR_UPSTREAM": "http://fd00::5:5000"}, "MIRROR_UPSTREAM",
         "an IPv6 address goes in brackets"),
        ({"MIRROR_CONFIG": "/nonexistent/m.yaml"}, "MIRROR_CONFIG", "cannot read config file"),
        # A typo is an error, with the name it was probably meant to be.
        ({"MIRROR_STORAGE_PATH": "/x"}, "MIRROR_STORAGE_PATH",
         "unknown variable: no config key has this name (did you mean MIRROR_STORAGE__PATH?)"),
        ({"MIRROR_LISTEN_PORT": "5000"}, "MIRROR_LISTEN_PORT", "did you mean MIRROR_LISTEN?"),
        ({"MIRROR_UPSTREAMS": "http://a"}, "MIRROR_UPSTREAMS", "did you mean MIRROR_UPSTREAM?"),
        ({"MIRROR_PINS": "alpine"}, "MIRROR_PINS", "unknown variable"),
        ({"MIRROR_storage__path": "/x"}, "MIRROR_storage__path", "unknown variable"),
        # Without its _SERVICE_HOST a name is no Kubernetes service link.
        ({"MIRROR_PORT": "tcp://10.0.0.1:5000"}, "MIRROR_PORT", "unknown variable"),
    ],
)  # fmt: skip
def test_variable_mistakes_name_the_variable(
    env: dict[str, str], variable: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env)
    assert caught.value.key == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert problem in str(caught.value)
    assert_no_secret(str(caught.value))


def test_variables_read_for_other_purposes_are_no_mistake() -> None:
    env = {
        # What Kubernetes sets in every pod for the Services `mirror` and `mirror-metrics`.
        "MIRROR_SERVICE_HOST": "10.0.0.1",
        "MIRROR_SERVICE_PORT": "5000",
        "MIRROR_SERVICE_PORT_HTTP": "5000",
        "MIRROR_PORT": "tcp://10.0.0.1:5000",
        "MIRROR_PORT_5000_TCP": "tcp://10.0.0.1:5000",
        "MIRROR_PORT_5000_TCP_PROTO": "tcp",
        "MIRROR_PORT_5000_TCP_PORT": "5000",
        "MIRROR_PORT_5000_TCP_ADDR": "10.0.0.1",
        "MIRROR_METRICS_SERVICE_HOST": "10.0.0.2",
        "MIRROR_METRICS_PORT_9000_TCP_ADDR": "10.0.0.2",
        "MIRROR_UPDATE_SCREENSHOT": "1",  # the status page test's
        "PATH": "/usr/bin",
        "HOME": "/root",
        "MIRRORLESS": "x",
    }
    assert load_config(None, env) == Config()


def test_password_env_named_in_the_file_is_no_mistake(tmp_path: Path) -> None:
    file = tmp_path / "m.yaml"
    file.write_text(
        "upstreams: [{name: a, url: 'http://a',"
        " auth: {type: basic, username: u, password_env: MIRROR_A_TOKEN}}]\n"
    )
    env = {"MIRROR_A_TOKEN": "t0ken", "MIRROR_LISTEN": ":6000"}
    assert load_config(file, env).listen == Listen("0.0.0.0", 6000)
    # The same variable with no upstream reading it: a mistake.
    with pytest.raises(ConfigError, match=r"^MIRROR_A_TOKEN: unknown variable"):
        load_config(None, env)


def test_precedence_flags_then_environment_then_file_then_defaults(tmp_path: Path) -> None:
    file = tmp_path / "m.yaml"
    file.write_text(
        "listen: 127.0.0.1:6001\n"
        "storage: {path: /from/file, max_size: 1GiB, max_age: 1d}\n"
        "log: {format: json, level: warning}\n"
        "workers: 2\n"
        "upstreams: [{name: file, url: 'http://file.example'}]\n"
    )
    env = {
        "MIRROR_LISTEN": "127.0.0.1:6002",
        "MIRROR_STORAGE__PATH": "/from/env",
        "MIRROR_STORAGE__MAX_SIZE": "2GiB",
        "MIRROR_LOG__LEVEL": "debug",
        "MIRROR_WORKERS": "3",
        "MIRROR_UPSTREAM": "http://env.example",
    }
    defaults = Config()
    from_file = load_config(file, {})
    assert (from_file.listen.port, from_file.storage.path, from_file.workers) == (
        6001,
        Path("/from/file"),
        2,
    )
    assert from_file.limits == defaults.limits  # what neither sets: the default
    merged = load_config(file, env)
    assert merged.listen == Listen("127.0.0.1", 6002)
    assert (merged.storage.path, merged.storage.max_size) == (Path("/from/env"), 2 * 1024**3)
    assert merged.storage.max_age == 86400.0  # the file's, beside the environment's keys
    assert (merged.log.format, merged.log.level) == ("json", "debug")
    assert merged.workers == 3
    assert [u.url for u in merged.upstreams] == ["http://env.example"]
    flagged = with_overrides(
        merged,
        listen="127.0.0.1:6003",
        storage="/from/flag",
        max_size="3GiB",
        workers="4",
        upstream="http://flag.example",
    )
    assert flagged.listen == Listen("127.0.0.1", 6003)
    assert (flagged.storage.path, flagged.storage.max_size) == (Path("/from/flag"), 3 * 1024**3)
    assert (flagged.workers, flagged.log.level) == (4, "debug")
    assert [u.url for u in flagged.upstreams] == ["http://flag.example"]


def test_mirror_config_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "m.yaml"
    file.write_text("listen: 127.0.0.1:6001\n")
    other = tmp_path / "other.yaml"
    other.write_text("listen: 127.0.0.1:6002\n")
    assert load_config(None, {"MIRROR_CONFIG": str(file)}).listen.port == 6001
    assert load_config(other, {"MIRROR_CONFIG": str(file)}).listen.port == 6002  # --config
    assert load_config(None, {"MIRROR_CONFIG": ""}) == Config()  # empty: no file
    assert load_config(None, {}) == Config() == load_config(None, None)
    file.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^MIRROR_CONFIG: .* is not valid YAML"):
        load_config(None, {"MIRROR_CONFIG": str(file)})
    file.write_text("storage: []\n")  # the file's own error, though a variable sets a key
    with pytest.raises(ConfigError, match=r"^storage: must be a mapping"):
        load_config(None, {"MIRROR_CONFIG": str(file), "MIRROR_STORAGE__PATH": "/x"})


def test_a_variable_over_the_file_is_named_in_errors_about_its_key(tmp_path: Path) -> None:
    file = tmp_path / "m.yaml"
    file.write_text("storage: {high_watermark: 0.9, low_watermark: 0.5}\n")
    with pytest.raises(ConfigError, match=r"^MIRROR_STORAGE__LOW_WATERMARK: must be below"):
        load_config(file, {"MIRROR_STORAGE__LOW_WATERMARK": "0.95"})
    file.write_text("storage: {high_watermark: 0.9, low_watermark: 0.95}\n")
    with pytest.raises(ConfigError, match=r"^storage.low_watermark: must be below"):
        load_config(file, {"MIRROR_STORAGE__MAX_SIZE": "1GiB"})  # the file's value is wrong


def test_documented_config_names_each_keys_variable() -> None:
    text = (REPO / "config" / "mirror.yaml").read_text()
    named = set(re.findall(r"MIRROR_[A-Z_]+", text))
    assert environment_names() <= named
    # Beside them, only the examples of an upstream's password_env, of database_env and
    # of peer_secret_env.
    examples = {"MIRROR_HUB_TOKEN", "MIRROR_GHCR_TOKEN", "MIRROR_DATABASE_URL"}
    examples |= {"MIRROR_PEER_SECRET"}
    assert named - environment_names() == examples
