"""Configuration: YAML loaded into frozen dataclasses, validated with errors naming the key.

With no file at all the embedded default applies: listen on 0.0.0.0:5000, cache in
`./data`, Docker Hub as the one (anonymous) upstream.

Environment variables set scalar keys over the file (`MIRROR_STORAGE__MAX_SIZE` for
storage.max_size), and command-line flags over both. Loading reads the file and nothing
else: the environment is passed in as a mapping.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args
from urllib.parse import urlsplit

import yaml
from yarl import URL

from mirror.access import read_htpasswd
from mirror.errors import ConfigError, RegistryError
from mirror.reference import ImageReference, parse_image_reference

DOCKER_HUB_URL = "https://registry-1.docker.io"
# The names clients use for Docker Hub (containerd's `?ns=`, registries.conf locations).
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
DEFAULT_MAX_SIZE = 20 * 1024**3
DEFAULT_TAG_TTL = 300.0

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
}  # fmt: skip
_DURATION_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NUMBER_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", re.ASCII)
_UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?|\[[0-9a-f:.]+\](:\d{1,5})?")
_PREFIX = re.compile(r"[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_ECR_HOST = re.compile(r"(\d{12})\.dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")

# The keys of the file, by section, as its parser checks them. The environment's variable
# names are made from the same tables.
_ROOT_KEYS = frozenset({"listen", "storage", "upstreams", "pins", "log", "auth", "tls",
                        "limits", "workers", "status_page", "shared"})  # fmt: skip
_SECTION_KEYS: Mapping[str, frozenset[str]] = {
    "storage": frozenset({"path", "max_size", "high_watermark", "low_watermark", "max_age"}),
    "log": frozenset({"format", "level"}),
    "auth": frozenset({"htpasswd"}),
    "tls": frozenset({"cert", "key"}),
    "limits": frozenset({"max_connections", "max_header_size", "header_timeout",
                         "keepalive_timeout"}),
    "shared": frozenset({"bucket", "endpoint_url", "region", "prefix", "database",
                         "database_env", "max_size", "redirect", "presign_ttl",
                         "eviction_interval", "peer_secret", "peer_secret_env",
                         "advertise_url", "lease_ttl"}),
}  # fmt: skip
# Lists of entries, which no single variable can hold.
_LIST_KEYS = frozenset({"upstreams", "pins"})

AuthType = Literal["anonymous", "basic", "ecr"]
UpstreamType = Literal["registry", "mirror"]
Access = Literal["public", "authenticated"]


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
    # Eviction starts once the cache holds this share of max_size, and stops at the low one.
    high_watermark: float = 0.90
    low_watermark: float = 0.80
    # Blobs unused for this long (seconds) are evicted whatever the budget; None: never.
    max_age: float | None = None


@dataclass(frozen=True)
class AuthConfig:
    """How the mirror authenticates to one upstream.

    anonymous: no credentials (anonymous Bearer tokens where the registry asks for them);
    basic: `username` and a password from `password_env` or `password_file`, sent as Basic
    auth or to the registry's token service; ecr: AWS `GetAuthorizationToken` for
    `registry_id` in `region`, with credentials from the standard AWS chain.
    """

    type: AuthType = "anonymous"
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    region: str | None = None
    registry_id: str | None = None


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed to connect, to receive the answer's headers, and between two reads."""

    connect: float = 10.0
    first_byte: float = 30.0
    idle: float = 60.0


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    # Registry host names this upstream answers for (containerd's `?ns=`); none for a
    # mirror, which answers for every host no other upstream lists.
    hosts: tuple[str, ...] = ()
    # A leading repository path that routes here (`mirror:5000/<prefix>/<repo>`).
    prefix: str | None = None
    default: bool = False
    tag_ttl: float = DEFAULT_TAG_TTL
    auth: AuthConfig = AuthConfig()
    # Counted pulls (Docker Hub's `ratelimit-remaining`) kept back, never spent.
    ratelimit_reserve: int = 0
    # Who may pull through this upstream: anyone, or clients with htpasswd credentials.
    access: Access = "public"
    # Token realms on other domains than the upstream's that it may send us to.
    allowed_realms: tuple[str, ...] = ()
    # Upstream requests at once; more wait in a queue of max_queued, past which: 503.
    max_fetches: int = 32
    max_queued: int = 256
    timeouts: Timeouts = Timeouts()
    # Further attempts after a 5xx or a failed connection (and to resume a cut blob).
    retries: int = 3
    # registry: the registry itself; mirror: another mirror of registries (a regional
    # one), told which registry each request is for by `ns` (routing.py).
    type: UpstreamType = "registry"

    @property
    def docker_hub(self) -> bool:
        """Docker Hub keeps single-name images under `library/`; behind another mirror,
        the last hop adds it."""
        return self.type == "registry" and "docker.io" in self.hosts


DOCKER_HUB = UpstreamConfig(
    name="docker-hub", url=DOCKER_HUB_URL, hosts=DOCKER_HUB_HOSTS, default=True
)


LogFormat = Literal["text", "json"]
_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogConfig:
    format: LogFormat = "text"
    level: str = "info"


@dataclass(frozen=True)
class ClientAuth:
    """Who may use the mirror: with `htpasswd`, clients of `authenticated` upstreams log in."""

    htpasswd: Path | None = None


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Limits:
    """Bounds on what clients may hold of the server."""

    max_connections: int = 4096
    max_header_size: int = 8190  # bytes of one request line or header field
    # Seconds a client has to send a request's headers, from connecting or from the
    # request's first byte; and to start its next request on a kept-alive connection.
    header_timeout: float = 30.0
    keepalive_timeout: float = 75.0


@dataclass(frozen=True)
class SharedConfig:
    """Fleet mode: a tier shared by every replica with this block, behind each replica's
    own cache: verified bytes in an S3-compatible bucket (credentials from the standard
    AWS chain), what it holds and the tags in PostgreSQL."""

    bucket: str
    max_size: int  # the bucket's budget: no default, a bucket's bytes cost money
    database: str | None = field(default=None, repr=False)  # a DSN (password and all), or:
    database_env: str | None = None  # the variable holding it (a password stays out of files)
    endpoint_url: str | None = None  # None: AWS S3
    region: str | None = None
    prefix: str = ""  # of every key in the bucket
    redirect: bool = False  # a shared hit answers 307 to a presigned URL of the bucket
    presign_ttl: float = 900.0
    # How often the leader counts the shared tier against max_size: it may be over by what
    # the replicas upload meanwhile.
    eviction_interval: float = 30.0
    # The fleet's secret, which a replica streaming a blob from another (the one
    # downloading it) presents; or the variable holding it. Neither: peer requests are
    # refused, and each replica fetches alone.
    peer_secret: str | None = field(default=None, repr=False)
    peer_secret_env: str | None = None
    # Where the other replicas reach this one (its peer route).
    advertise_url: str = field(default_factory=lambda: default_advertise_url(Listen(), False))
    # How long a replica's claim on downloading a blob for the fleet lasts without renewal:
    # a replica that died is replaced after this long.
    lease_ttl: float = 30.0

    def dsn(self) -> str:
        """The database's DSN, read from its variable at start."""
        if self.database is not None:
            return self.database
        assert self.database_env is not None
        value = os.environ.get(self.database_env)
        if not value:
            raise ConfigError(
                "shared.database_env", f"environment variable {self.database_env} is not set"
            )
        return _dsn(value, self.database_env)

    def fleet_secret(self) -> str | None:
        """The secret of peer requests, read from its variable at start; None: none given."""
        if self.peer_secret_env is None:
            return self.peer_secret
        value = os.environ.get(self.peer_secret_env)
        if not value:
            raise ConfigError(
                "shared.peer_secret_env", f"environment variable {self.peer_secret_env} is not set"
            )
        return _peer_secret(value, "shared.peer_secret_env")


@dataclass(frozen=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    storage: StorageConfig = field(default_factory=StorageConfig)
    upstreams: tuple[UpstreamConfig, ...] = (DOCKER_HUB,)
    # Images whose manifests and blobs are never evicted.
    pins: tuple[ImageReference, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    auth: ClientAuth = field(default_factory=ClientAuth)
    tls: TlsConfig | None = None
    limits: Limits = field(default_factory=Limits)
    # Processes sharing the listening port; the first fetches, the others serve cache hits
    # and hand it every other request (web/handoff.py).
    workers: int = 1
    # The status page at / and /status.json (web/status.py).
    status_page: bool = True
    shared: SharedConfig | None = None  # None: one replica, nothing shared

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
    size = float(match.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(size):
        raise ConfigError(key, f"size {value!r} is too large")
    return int(size)


def parse_duration(value: object, key: str = "duration") -> float:
    """`90s`, `10m`, `12h`, `30d`, or a bare number of seconds."""
    seconds = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e300 else math.inf
    match = _NUMBER_UNIT.fullmatch(value) if isinstance(value, str) else None
    if match is not None and match.group(2).lower() in _DURATION_UNITS:
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if not 0 <= seconds < math.inf:
        raise ConfigError(key, f"invalid duration {value!r}: write e.g. 90s, 10m, 12h or 30d")
    return seconds


def parse_listen(value: object, key: str = "listen") -> Listen:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (all interfaces)."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ConfigError(key, f"invalid address {text!r}: write HOST:PORT, e.g. 0.0.0.0:5000")
    return Listen(host.strip("[]") or "0.0.0.0", int(port))


def parse_url(value: object, key: str) -> str:
    """Checked by both parsers the mirror reads it with (urlsplit and yarl).

    Credentials in it (`user:password@`) are refused, and never repeated in the error: a
    URL is printed in logs and messages, where a password has no place.
    """
    if "@" in str(value):
        raise ConfigError(
            key,
            "must not hold credentials (user:password@host), which would show in logs: give"
            " them in the config file as auth: {type: basic, username: ..., password_env: ...}",
        )
    try:
        parts, url = urlsplit(str(value)), URL(str(value))
        valid = parts.scheme in ("http", "https") and bool(parts.hostname and url.host)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        valid = False
    if not isinstance(value, str) or not valid:
        host = str(value).partition("://")[2].partition("/")[0]
        hint = (
            " (an IPv6 address goes in brackets: http://[fd00::1]:5000)"
            if host.count(":") > 1 and "[" not in host
            else ""
        )
        raise ConfigError(key, f"must be an http(s) URL, got {value!r}{hint}")
    return value.rstrip("/")


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The config in `path` (else in the file `env` names in MIRROR_CONFIG, else the
    embedded default), with the MIRROR_* variables of `env` over it."""
    env = {} if env is None else env
    data: object = {}
    if path is not None:
        data = _read_file(path, "")
    elif env.get(CONFIG_VARIABLE):  # set but empty: no file, as when unset
        data = _read_file(env[CONFIG_VARIABLE], CONFIG_VARIABLE)
    config = _config_with_variables(data, env)
    _check_variables(env, config)
    if UPSTREAM_VARIABLE in env:
        upstream = _sole_upstream(env[UPSTREAM_VARIABLE], UPSTREAM_VARIABLE)
        config = replace(config, upstreams=(upstream,))
    return config


def _read_file(path: Path | str, key: str) -> object:
    """`key`: where the path was given (none for the command line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"cannot read config file {str(path)!r}: {exc}") from None
    try:
        data = _yaml(text)
    except ValueError as exc:
        raise ConfigError(key, f"{path} is not valid YAML: {exc}") from None
    return {} if data is None else data


def _yaml(text: str) -> object:
    try:
        return yaml.safe_load(text)
    # PyYAML's constructors let these through for values such as `!!int zz` or 2001-02-30.
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


# --- the environment ------------------------------------------------------------------------

ENV_PREFIX = "MIRROR_"
CONFIG_VARIABLE = "MIRROR_CONFIG"  # the config file
UPSTREAM_VARIABLE = "MIRROR_UPSTREAM"  # the one upstream's URL, as --upstream
# Read by the test suite, which starts `mirror serve` in the environment it runs in.
_OTHER_VARIABLES = frozenset({"MIRROR_UPDATE_SCREENSHOT"})
# What Kubernetes adds to a pod's environment for each Service of its namespace: for one
# named mirror(-x), MIRROR(_X)_SERVICE_HOST with these beside it.
_SERVICE_LINK = re.compile(
    r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)"
)


def key_variables() -> dict[str, tuple[str, ...]]:
    """Each variable that sets a key, and the key's path: MIRROR_STORAGE__MAX_SIZE is
    (storage, max_size). Every scalar key has one; the lists (upstreams, pins) none."""
    paths: list[tuple[str, ...]] = [
        (key,) for key in _ROOT_KEYS - _SECTION_KEYS.keys() - _LIST_KEYS
    ]
    paths += [(section, key) for section, keys in _SECTION_KEYS.items() for key in keys]
    return {ENV_PREFIX + "__".join(path).upper(): path for path in sorted(paths)}


def environment_names() -> frozenset[str]:
    """Every variable the configuration reads."""
    return frozenset(key_variables()) | {CONFIG_VARIABLE, UPSTREAM_VARIABLE}


def _config_with_variables(data: object, env: Mapping[str, str]) -> Config:
    """The file's data with the keys the environment sets put in, parsed as one; an error
    about a key a variable set names the variable."""
    variables = {name: path for name, path in key_variables().items() if name in env}
    if not isinstance(data, dict):
        return config_from_dict(data)  # the file's own error comes first
    merged = dict(data)
    for name, path in variables.items():
        value = _variable_value(env[name])
        if len(path) == 1:
            merged[path[0]] = value
        elif isinstance(merged.get(path[0], {}), dict):  # else the file's error for it stands
            merged[path[0]] = {**merged.get(path[0], {}), path[1]: value}
    try:
        return config_from_dict(merged)
    except ConfigError as error:
        by_key = {".".join(path): name for name, path in variables.items()}
        if error.key in by_key:
            raise ConfigError(by_key[error.key], error.problem) from None
        raise


def _variable_value(text: str) -> object:
    """What YAML reads the text as where it is a number or a boolean (4, 0.9, true);
    anything else is the text itself (a path or an address needs no quoting)."""
    try:
        value = _yaml(text)
    except ValueError:
        return text
    return value if isinstance(value, bool | int | float) else text


def _check_variables(env: Mapping[str, str], config: Config) -> None:
    """A MIRROR_* variable nothing reads is a mistake (a typo would otherwise be lost)."""
    known = environment_names() | _OTHER_VARIABLES
    known |= {u.auth.password_env for u in config.upstreams if u.auth.password_env}
    if config.shared is not None:
        named = (config.shared.database_env, config.shared.peer_secret_env)
        known |= {name for name in named if name}
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known and not _service_link(name, env):
            close = difflib.get_close_matches(name, sorted(environment_names()), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(name, f"unknown variable: no config key has this name{hint}")


def _service_link(name: str, env: Mapping[str, str]) -> bool:
    return any(
        _SERVICE_LINK.fullmatch(name, i) and f"{name[:i]}_SERVICE_HOST" in env
        for i in range(len(ENV_PREFIX) - 1, len(name))
        if name[i] == "_"
    )


def config_from_dict(data: object) -> Config:
    root = _mapping(data, "", _ROOT_KEYS)
    defaults = Config()
    upstreams = _upstreams(root["upstreams"]) if "upstreams" in root else defaults.upstreams
    auth = _client_auth(root.get("auth", {}))
    _check_access(upstreams, auth)
    tls = _tls(root["tls"]) if "tls" in root else None
    listen = parse_listen(root["listen"]) if "listen" in root else defaults.listen
    return Config(
        listen=listen,
        storage=_storage(root.get("storage", {})),
        upstreams=upstreams,
        pins=_pins(root.get("pins", []), upstreams),
        log=_log(root.get("log", {})),
        auth=auth,
        tls=tls,
        limits=_limits(root.get("limits", {})),
        workers=_workers(root.get("workers", 1), "workers", tls),
        status_page=_status_page(root.get("status_page", True)),
        shared=_shared(root["shared"], listen, tls is not None) if "shared" in root else None,
    )


def _shared(data: object, listen: Listen, tls: bool) -> SharedConfig:
    """`listen` and `tls`: where this replica answers, the default of advertise_url."""
    raw = _mapping(data, "shared", _SECTION_KEYS["shared"])
    for name in ("bucket", "max_size"):
        if name not in raw:
            raise ConfigError(f"shared.{name}", "is required in fleet mode")
    bucket = _typed(raw, "bucket", "shared", str, "")
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError("shared.bucket", f"not a valid bucket name: {bucket!r}")
    database = _typed(raw, "database", "shared", str, None)
    database_env = _typed(raw, "database_env", "shared", str, None)
    if (database is None) == (database_env is None):
        raise ConfigError("shared.database", "give exactly one of database and database_env")
    endpoint_url = raw.get("endpoint_url")
    if endpoint_url is not None:
        endpoint_url = parse_url(endpoint_url, "shared.endpoint_url")
    prefix = _typed(raw, "prefix", "shared", str, "")
    if prefix and not _PREFIX.fullmatch(prefix.rstrip("/")):
        raise ConfigError("shared.prefix", f"not a valid key prefix: {prefix!r}")
    redirect = raw.get("redirect", False)
    if not isinstance(redirect, bool):
        raise ConfigError("shared.redirect", f"must be true or false, got {redirect!r}")
    return SharedConfig(
        bucket=bucket,
        max_size=parse_size(raw["max_size"], "shared.max_size"),
        database=None if database is None else _dsn(database, "shared.database"),
        database_env=database_env,
        endpoint_url=None
        if endpoint_url is None
        else parse_url(endpoint_url, "shared.endpoint_url"),
        region=_typed(raw, "region", "shared", str, None),
        prefix=prefix.rstrip("/") + "/" if prefix else "",
        redirect=redirect,
        presign_ttl=parse_duration(raw.get("presign_ttl", 900), "shared.presign_ttl"),
        eviction_interval=_positive_duration(
            raw.get("eviction_interval", 30), "shared.eviction_interval"
        ),
        peer_secret=_peer_secret_in(raw),
        peer_secret_env=_typed(raw, "peer_secret_env", "shared", str, None),
        advertise_url=_advertise_url(raw, listen, tls),
        lease_ttl=_positive_duration(raw.get("lease_ttl", 30), "shared.lease_ttl"),
    )


def _peer_secret_in(raw: Mapping[str, Any]) -> str | None:
    secret = _typed(raw, "peer_secret", "shared", str, None)
    if secret is not None and "peer_secret_env" in raw:
        raise ConfigError("shared.peer_secret", "give at most one of peer_secret, peer_secret_env")
    return None if secret is None else _peer_secret(secret, "shared.peer_secret")


def _advertise_url(raw: Mapping[str, Any], listen: Listen, tls: bool) -> str:
    if "advertise_url" in raw:
        return parse_url(raw["advertise_url"], "shared.advertise_url")
    default = default_advertise_url(listen, tls)
    try:
        return parse_url(default, "shared.advertise_url")
    except ConfigError:
        raise ConfigError(
            "shared.advertise_url", f"this host's name makes no valid URL ({default!r}): give one"
        ) from None


def _positive_duration(value: object, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(key, "must be more than 0")
    return seconds


def default_advertise_url(listen: Listen, tls: bool) -> str:
    """This machine's name and the port it listens on: what other replicas reach it at."""
    return f"{'https' if tls else 'http'}://{socket.gethostname().lower()}:{listen.port}"


def _peer_secret(value: str, key: str) -> str:
    """Sent as a Bearer token: visible ASCII only (never repeated in the error)."""
    if not value or not all("!" <= c <= "~" for c in value):
        raise ConfigError(key, "must be non-empty printable ASCII, without spaces")
    return value


def _dsn(value: str, key: str) -> str:
    if urlsplit(value).scheme not in ("postgresql", "postgres"):
        raise ConfigError(key, "must be a postgresql:// URL")
    return value


def _workers(value: object, key: str, tls: TlsConfig | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be a whole number >= 1, got {value!r}")
    if value > 1 and tls is not None:
        raise ConfigError(
            key,
            "more than 1 needs plain HTTP (a TLS connection cannot be handed from one"
            " process to another): terminate TLS in front of the mirror, or set workers: 1",
        )
    return value


def _status_page(value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError("status_page", f"must be true or false, got {value!r}")
    return value


def _client_auth(data: object) -> ClientAuth:
    raw = _mapping(data, "auth", _SECTION_KEYS["auth"])
    path = _typed(raw, "htpasswd", "auth", str, None)
    if path is None:
        return ClientAuth()
    read_htpasswd(Path(path))  # raises ConfigError naming the file and line
    return ClientAuth(htpasswd=Path(path))


def _check_access(upstreams: tuple[UpstreamConfig, ...], auth: ClientAuth) -> None:
    for i, upstream in enumerate(upstreams):
        if upstream.access == "authenticated" and auth.htpasswd is None:
            why = " (the default for an ECR upstream)" if upstream.auth.type == "ecr" else ""
            raise ConfigError(
                f"upstreams[{i}].access",
                f"authenticated{why} needs auth.htpasswd to log clients in;"
                " or set access: public to serve its images to anyone",
            )


def _tls(data: object) -> TlsConfig:
    raw = _mapping(data, "tls", _SECTION_KEYS["tls"])
    for name in ("cert", "key"):
        if not isinstance(raw.get(name), str):
            raise ConfigError(f"tls.{name}", "is required: the path of a PEM file")
    tls = TlsConfig(cert=Path(raw["cert"]), key=Path(raw["key"]))
    server_ssl_context(tls)  # a bad pair is a config error now, not at the first client
    return tls


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        if not path.is_file():
            raise ConfigError(key, f"no such file: {path}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.cert", f"cannot use {tls.cert} with {tls.key}: {exc}") from None
    return context


def _limits(data: object) -> Limits:
    raw = _mapping(data, "limits", _SECTION_KEYS["limits"])
    defaults = Limits()
    return Limits(
        max_connections=_positive(raw, "max_connections", "limits", defaults.max_connections),
        max_header_size=parse_size(
            raw.get("max_header_size", defaults.max_header_size), "limits.max_header_size"
        ),
        header_timeout=_limit_duration(raw, "header_timeout", defaults.header_timeout),
        keepalive_timeout=_limit_duration(raw, "keepalive_timeout", defaults.keepalive_timeout),
    )


def _limit_duration(raw: Mapping[str, Any], name: str, default: float) -> float:
    value = parse_duration(raw.get(name, default), f"limits.{name}")
    if value <= 0:
        raise ConfigError(f"limits.{name}", "must be longer than 0s")
    return value


def _positive(raw: Mapping[str, Any], name: str, key: str, default: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}.{name}", f"must be a whole number >= 1, got {value!r}")
    return value


def _log(data: object) -> LogConfig:
    raw = _mapping(data, "log", _SECTION_KEYS["log"])
    kind = _typed(raw, "format", "log", str, "text")
    if kind not in ("text", "json"):
        raise ConfigError("log.format", f"must be text or json, got {kind!r}")
    level = _typed(raw, "level", "log", str, "info").lower()
    if level not in _LOG_LEVELS:
        raise ConfigError("log.level", f"must be one of {', '.join(_LOG_LEVELS)}, got {level!r}")
    return LogConfig(format=cast(LogFormat, kind), level=level)


def with_overrides(
    config: Config,
    *,
    listen: str | None = None,
    storage: str | None = None,
    upstream: str | None = None,
    max_size: str | None = None,
    workers: str | None = None,
) -> Config:
    """Command-line flags win over the environment and the file."""
    if workers is not None:
        count = int(workers) if workers.isdigit() else workers
        config = replace(config, workers=_workers(count, "--workers", config.tls))
    if listen is not None:
        config = _relistened(config, parse_listen(listen, "--listen"))
    if storage is not None:
        config = replace(config, storage=replace(config.storage, path=Path(storage)))
    if max_size is not None:
        size = parse_size(max_size, "--max-size")
        config = replace(config, storage=replace(config.storage, max_size=size))
    if upstream is not None:
        config = replace(config, upstreams=(_sole_upstream(upstream, "--upstream"),))
    return config


def _relistened(config: Config, listen: Listen) -> Config:
    """On another port: the default advertise_url follows it (a URL given stays)."""
    shared = config.shared
    tls = config.tls is not None
    if shared is not None and shared.advertise_url == default_advertise_url(config.listen, tls):
        shared = replace(shared, advertise_url=default_advertise_url(listen, tls))
    return replace(config, listen=listen, shared=shared)


def _sole_upstream(text: str, key: str) -> UpstreamConfig:
    """The one upstream a URL given alone names (--upstream, MIRROR_UPSTREAM)."""
    url = parse_url(text, key)
    host = urlsplit(url).hostname or "upstream"
    name = re.sub(r"[^a-z0-9_.-]", "-", host.lower())
    return UpstreamConfig(name=name, url=url, hosts=default_hosts(url), default=True)


def default_hosts(url: str) -> tuple[str, ...]:
    """The registry host names an upstream answers for when `hosts` is not given."""
    parts = urlsplit(url)
    if (parts.hostname or "").lower() == urlsplit(DOCKER_HUB_URL).hostname:
        return DOCKER_HUB_HOSTS
    return (parts.netloc.rpartition("@")[2].lower(),)


def _storage(data: object) -> StorageConfig:
    raw = _mapping(data, "storage", _SECTION_KEYS["storage"])
    defaults = StorageConfig()
    path = _typed(raw, "path", "storage", str, str(defaults.path))
    if not path:
        raise ConfigError("storage.path", "must not be empty")
    max_size = raw.get("max_size", defaults.max_size)
    high = _fraction(raw, "high_watermark", defaults.high_watermark)
    low = _fraction(raw, "low_watermark", defaults.low_watermark)
    if low >= high:
        raise ConfigError("storage.low_watermark", f"must be below high_watermark ({high})")
    max_age = raw.get("max_age")
    return StorageConfig(
        path=Path(path),
        max_size=parse_size(max_size, "storage.max_size"),
        high_watermark=high,
        low_watermark=low,
        max_age=None if max_age is None else parse_duration(max_age, "storage.max_age"),
    )


def _fraction(raw: Mapping[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(
            f"storage.{name}", f"must be a fraction of max_size in (0, 1], got {value!r}"
        )
    return float(value)


def _pins(data: object, upstreams: tuple[UpstreamConfig, ...]) -> tuple[ImageReference, ...]:
    if not isinstance(data, list):
        raise ConfigError("pins", "must be a list of image references")
    hosts = {host for upstream in upstreams for host in upstream.hosts}
    any_host = any(upstream.type == "mirror" for upstream in upstreams)
    pins = []
    for i, text in enumerate(data):
        try:
            pin = parse_image_reference(str(text)) if isinstance(text, str) else None
        except RegistryError as exc:
            raise ConfigError(f"pins[{i}]", exc.message) from None
        if pin is None:
            raise ConfigError(f"pins[{i}]", f"must be an image reference, got {text!r}")
        if pin.host not in hosts and not any_host:
            raise ConfigError(f"pins[{i}]", f"no upstream lists the registry host {pin.host!r}")
        pins.append(pin)
    return tuple(pins)


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
    _unique(upstreams, "name", lambda u: (u.name,))
    _unique(upstreams, "hosts", lambda u: u.hosts)
    _unique(upstreams, "prefix", lambda u: (u.prefix,) if u.prefix else ())
    _one_mirror(upstreams)
    return upstreams


def _one_mirror(upstreams: tuple[UpstreamConfig, ...]) -> None:
    """A mirror answers for every registry host no other upstream lists: there is one such."""
    mirrors = [(i, u.name) for i, u in enumerate(upstreams) if u.type == "mirror"]
    if len(mirrors) > 1:
        raise ConfigError(
            f"upstreams[{mirrors[1][0]}].type",
            f"only one upstream may be of type mirror, and {mirrors[0][1]!r} is: it answers"
            " for every registry host no other upstream lists",
        )


def _unique(
    upstreams: tuple[UpstreamConfig, ...], key: str, values: Callable[[UpstreamConfig], Any]
) -> None:
    seen: dict[str, str] = {}
    for i, upstream in enumerate(upstreams):
        for value in values(upstream):
            if value in seen:
                where = f"upstreams[{i}].{key}"
                raise ConfigError(where, f"{value!r} is already used by upstream {seen[value]!r}")
            seen[value] = upstream.name


_UPSTREAM_KEYS = {
    "name", "url", "hosts", "prefix", "default", "tag_ttl", "auth", "ratelimit_reserve",
    "access", "allowed_realms", "max_fetches", "max_queued", "timeouts", "retries", "type",
}  # fmt: skip


def _upstream(data: object, key: str) -> UpstreamConfig:
    if isinstance(data, dict) and ("username" in data or "password_env" in data):
        moved = "username" if "username" in data else "password_env"
        raise ConfigError(f"{key}.{moved}", "moved under auth: (auth: {type: basic, ...})")
    raw = _mapping(data, key, _UPSTREAM_KEYS)
    for required in ("name", "url"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "is required")
    name = _typed(raw, "name", key, str, "")
    if not _UPSTREAM_NAME.fullmatch(name):
        raise ConfigError(f"{key}.name", f"invalid name {name!r}: lowercase letters, digits, -_.")
    url = parse_url(raw["url"], f"{key}.url")
    reserve = _typed(raw, "ratelimit_reserve", key, int, 0)
    if reserve < 0 or isinstance(reserve, bool):
        raise ConfigError(f"{key}.ratelimit_reserve", f"must be a number >= 0, got {reserve!r}")
    auth = _auth(raw.get("auth", {}), f"{key}.auth", url)
    kind = _upstream_type(raw, key)
    defaults = UpstreamConfig(name, url)
    return UpstreamConfig(
        name=name,
        url=url,
        hosts=() if kind == "mirror" else _hosts(raw, key, url),
        prefix=_prefix(raw, key),
        default=_typed(raw, "default", key, bool, False),
        tag_ttl=parse_duration(raw.get("tag_ttl", DEFAULT_TAG_TTL), f"{key}.tag_ttl"),
        auth=auth,
        ratelimit_reserve=reserve,
        access=_access(raw, key, auth),
        allowed_realms=_host_list(raw, "allowed_realms", key, ()),
        max_fetches=_positive(raw, "max_fetches", key, defaults.max_fetches),
        max_queued=_positive(raw, "max_queued", key, defaults.max_queued),
        timeouts=_timeouts(raw.get("timeouts", {}), f"{key}.timeouts"),
        retries=_retries(raw, key, defaults.retries),
        type=kind,
    )


def _upstream_type(raw: Mapping[str, Any], key: str) -> UpstreamType:
    kind = _typed(raw, "type", key, str, "registry")
    if kind not in get_args(UpstreamType):
        raise ConfigError(f"{key}.type", f"must be registry or mirror, got {kind!r}")
    if kind == "mirror" and "hosts" in raw:
        raise ConfigError(
            f"{key}.hosts",
            "does not apply to type mirror: it answers for every registry host no other"
            " upstream lists, and tells it which in ns",
        )
    return cast(UpstreamType, kind)


def _access(raw: Mapping[str, Any], key: str, auth: AuthConfig) -> Access:
    # Images of a private registry stay private by default.
    default = "authenticated" if auth.type == "ecr" else "public"
    access = _typed(raw, "access", key, str, default)
    if access not in get_args(Access):
        raise ConfigError(f"{key}.access", f"must be public or authenticated, got {access!r}")
    return cast(Access, access)


def _timeouts(data: object, key: str) -> Timeouts:
    raw = _mapping(data, key, {"connect", "first_byte", "idle"})
    defaults = Timeouts()
    values = {}
    for name in ("connect", "first_byte", "idle"):
        value = parse_duration(raw.get(name, getattr(defaults, name)), f"{key}.{name}")
        if value <= 0:
            raise ConfigError(f"{key}.{name}", "must be longer than 0s")
        values[name] = value
    return Timeouts(**values)


def _retries(raw: Mapping[str, Any], key: str, default: int) -> int:
    value = raw.get("retries", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
        raise ConfigError(f"{key}.retries", f"must be a whole number from 0 to 10, got {value!r}")
    return value


def _hosts(raw: Mapping[str, Any], key: str, url: str) -> tuple[str, ...]:
    hosts = _host_list(raw, "hosts", key, None)
    if hosts is None:
        return default_hosts(url)
    if not hosts:
        raise ConfigError(f"{key}.hosts", "must be a non-empty list of registry host names")
    return hosts


def _host_list(raw: Mapping[str, Any], name: str, key: str, default: T) -> tuple[str, ...] | T:
    if name not in raw:
        return default
    hosts = raw[name]
    if not isinstance(hosts, list):
        raise ConfigError(f"{key}.{name}", "must be a list of host names")
    for i, host in enumerate(hosts):
        if not isinstance(host, str) or not _HOST.fullmatch(host.lower()):
            raise ConfigError(f"{key}.{name}[{i}]", f"invalid host name {host!r}")
    return tuple(dict.fromkeys(host.lower() for host in hosts))


def _prefix(raw: Mapping[str, Any], key: str) -> str | None:
    prefix = _typed(raw, "prefix", key, str, None)
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"{key}.prefix", f"invalid prefix {prefix!r}: a repository path such as ecr or quay/io"
        )
    return prefix


_AUTH_KEYS = {"type", "username", "password_env", "password_file", "region", "registry_id"}
_AUTH_TYPES: tuple[str, ...] = get_args(AuthType)


def _auth(data: object, key: str, url: str) -> AuthConfig:
    raw = _mapping(data, key, _AUTH_KEYS)
    kind = _typed(raw, "type", key, str, "anonymous")
    if kind not in _AUTH_TYPES:
        raise ConfigError(f"{key}.type", f"must be one of {', '.join(_AUTH_TYPES)}, got {kind!r}")
    fields = {name: _typed(raw, name, key, str, None) for name in sorted(_AUTH_KEYS - {"type"})}
    allowed = {
        "anonymous": set(),
        "basic": {"username", "password_env", "password_file"},
        "ecr": {"region", "registry_id"},
    }[kind]
    for name, value in fields.items():
        if value is not None and name not in allowed:
            raise ConfigError(f"{key}.{name}", f"does not apply to auth type {kind}")
    if kind == "basic":
        _basic_auth(fields, key)
    if kind == "ecr":
        fields = _ecr_auth(fields, key, url)
    password_file = fields.pop("password_file")
    return AuthConfig(
        type=cast(AuthType, kind),
        password_file=Path(password_file) if password_file else None,
        **fields,
    )


def _basic_auth(fields: Mapping[str, str | None], key: str) -> None:
    if fields["username"] is None:
        raise ConfigError(f"{key}.username", "is required for auth type basic")
    if (fields["password_env"] is None) == (fields["password_file"] is None):
        raise ConfigError(f"{key}.password_env", "give exactly one of password_env, password_file")


def _ecr_auth(fields: dict[str, str | None], key: str, url: str) -> dict[str, str | None]:
    """Region and registry id default to what the ECR host name says."""
    match = _ECR_HOST.fullmatch(urlsplit(url).hostname or "")
    fields = {
        **fields,
        "registry_id": fields["registry_id"] or (match.group(1) if match else None),
        "region": fields["region"] or (match.group(2) if match else None),
    }
    for name in ("region", "registry_id"):
        if fields[name] is None:
            raise ConfigError(
                f"{key}.{name}", "is required: the url is no <account>.dkr.ecr.<region> host"
            )
    return fields


def _mapping(data: object, key: str, allowed: Set[str]) -> Mapping[str, Any]:
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
