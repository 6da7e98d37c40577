"""Configuration: YAML loaded into frozen dataclasses, validated with errors naming the key.

With no file at all the embedded default applies: listen on 0.0.0.0:5000, cache in
`./data`, Docker Hub as the one (anonymous) upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from mirror.errors import ConfigError

DOCKER_HUB_URL = "https://registry-1.docker.io"
DEFAULT_MAX_SIZE = 20 * 1024**3
DEFAULT_TAG_TTL = 300.0

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
}  # fmt: skip
_DURATION_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


@dataclass(frozen=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 5000

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class StorageConfig:
    path: Path = Path("data")
    max_size: int = DEFAULT_MAX_SIZE


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    default: bool = False
    tag_ttl: float = DEFAULT_TAG_TTL
    username: str | None = None
    password_env: str | None = None


@dataclass(frozen=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    storage: StorageConfig = field(default_factory=StorageConfig)
    upstreams: tuple[UpstreamConfig, ...] = (
        UpstreamConfig(name="docker-hub", url=DOCKER_HUB_URL, default=True),
    )

    @property
    def default_upstream(self) -> UpstreamConfig:
        return next(u for u in self.upstreams if u.default)


def parse_size(value: object, key: str = "size") -> int:
    """`500MiB`, `50GiB`, `2TB`, or a bare number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _NUMBER_UNIT.fullmatch(str(value)) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(key, f"invalid size {value!r}: write e.g. 500MiB, 50GiB or 2TB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: object, key: str = "duration") -> float:
    """`90s`, `10m`, `12h`, `30d`, or a bare number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _NUMBER_UNIT.fullmatch(str(value)) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _DURATION_UNITS:
        raise ConfigError(key, f"invalid duration {value!r}: write e.g. 90s, 10m, 12h or 30d")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def parse_listen(value: object, key: str = "listen") -> Listen:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (all interfaces)."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"invalid address {text!r}: write HOST:PORT, e.g. 0.0.0.0:5000")
    return Listen(host.strip("[]") or "0.0.0.0", int(port))


def parse_url(value: object, key: str) -> str:
    parts = urlsplit(str(value))
    if not isinstance(value, str) or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def load_config(path: Path | str | None = None) -> Config:
    """The config in `path`, or the embedded default when no path is given."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    return config_from_dict({} if data is None else data)


def config_from_dict(data: object) -> Config:
    root = _mapping(data, "", {"listen", "storage", "upstreams"})
    defaults = Config()
    return Config(
        listen=parse_listen(root["listen"]) if "listen" in root else defaults.listen,
        storage=_storage(root.get("storage", {})),
        upstreams=_upstreams(root["upstreams"]) if "upstreams" in root else defaults.upstreams,
    )


def with_overrides(
    config: Config,
    *,
    listen: str | None = None,
    storage: str | None = None,
    upstream: str | None = None,
    max_size: str | None = None,
) -> Config:
    """Command-line flags win over the file."""
    if listen is not None:
        config = replace(config, listen=parse_listen(listen, "--listen"))
    if storage is not None:
        config = replace(config, storage=replace(config.storage, path=Path(storage)))
    if max_size is not None:
        size = parse_size(max_size, "--max-size")
        config = replace(config, storage=replace(config.storage, max_size=size))
    if upstream is not None:
        url = parse_url(upstream, "--upstream")
        host = urlsplit(url).hostname or "upstream"
        name = re.sub(r"[^a-z0-9_.-]", "-", host.lower())
        config = replace(config, upstreams=(UpstreamConfig(name=name, url=url, default=True),))
    return config


def _storage(data: object) -> StorageConfig:
    raw = _mapping(data, "storage", {"path", "max_size"})
    defaults = StorageConfig()
    path = _typed(raw, "path", "storage", str, str(defaults.path))
    if not path:
        raise ConfigError("storage.path", "must not be empty")
    max_size = raw.get("max_size", defaults.max_size)
    return StorageConfig(path=Path(path), max_size=parse_size(max_size, "storage.max_size"))


def _upstreams(data: object) -> tuple[UpstreamConfig, ...]:
    if not isinstance(data, list) or not data:
        raise ConfigError("upstreams", "must be a non-empty list of upstreams")
    upstreams = tuple(_upstream(item, f"upstreams[{i}]") for i, item in enumerate(data))
    if len(upstreams) == 1:
        upstreams = (replace(upstreams[0], default=True),)
    defaults = [u.name for u in upstreams if u.default]
    if len(defaults) != 1:
        raise ConfigError(
            "upstreams", f"exactly one upstream needs default: true, found {defaults}"
        )
    names = [u.name for u in upstreams]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"upstreams[{i}].name", f"duplicate upstream name {name!r}")
    return upstreams


def _upstream(data: object, key: str) -> UpstreamConfig:
    raw = _mapping(data, key, {"name", "url", "default", "tag_ttl", "username", "password_env"})
    for required in ("name", "url"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "is required")
    name = _typed(raw, "name", key, str, "")
    if not _UPSTREAM_NAME.fullmatch(name):
        raise ConfigError(f"{key}.name", f"invalid name {name!r}: lowercase letters, digits, -_.")
    username = _typed(raw, "username", key, str, None)
    password_env = _typed(raw, "password_env", key, str, None)
    if (username is None) != (password_env is None):
        raise ConfigError(f"{key}.password_env", "username and password_env go together")
    return UpstreamConfig(
        name=name,
        url=parse_url(raw["url"], f"{key}.url"),
        default=_typed(raw, "default", key, bool, False),
        tag_ttl=parse_duration(raw.get("tag_ttl", DEFAULT_TAG_TTL), f"{key}.tag_ttl"),
        username=username,
        password_env=password_env,
    )


def _mapping(data: object, key: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(key, "must be a mapping")
    for name in data:
        if name not in allowed:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return data


T = TypeVar("T")


def _typed(raw: Mapping[str, Any], name: str, key: str, kind: type[T], default: T) -> T:
    value = raw.get(name, default)
    if value is not default and not isinstance(value, kind):
        raise ConfigError(f"{key}.{name}", f"must be a {kind.__name__}, got {value!r}")
    return value
