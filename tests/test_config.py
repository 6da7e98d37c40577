"""The config contract: YAML into frozen dataclasses, every mistake named by its key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mirror.cli import main
from mirror.config import (
    DOCKER_HUB,
    DOCKER_HUB_URL,
    Config,
    Limits,
    Listen,
    config_from_dict,
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
