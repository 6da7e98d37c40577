"""Who may pull through which upstream: Basic credentials checked against an htpasswd file.

Anonymous stays the default: dockerd sends its Docker Hub credentials to a mirror, so on a
`public` upstream credentials are never looked at. An `authenticated` upstream needs a user
of the htpasswd file (bcrypt entries, as `htpasswd -B` writes them). Checks are cached,
since bcrypt is slow on purpose, and failed logins are limited per client address (an
IPv6 client per /64, which one host commonly holds whole), in a table of bounded size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import bcrypt

from mirror.errors import ConfigError, LoginRequired, TooManyRequests

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
MAX_FAILURES = 5  # failed logins from one address within FAILURE_WINDOW...
FAILURE_WINDOW = 60.0  # ...after which that address is refused until the window passes
# Client networks whose failed logins are remembered at once: past this, the one that
# failed least recently is forgotten (a few hundred bytes each).
FAILURE_TABLE_SIZE = 10_000
CHECK_CACHE_TTL = 300.0
CHECK_CACHE_SIZE = 10_000


def read_htpasswd(path: Path) -> dict[str, bytes]:
    """`user:$2y$...` lines; anything else is refused, naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("auth.htpasswd", f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:  # a NUL in the path, or a file that is not UTF-8
        raise ConfigError("auth.htpasswd", f"cannot read {path!r}: {exc}") from None
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, hashed = line.partition(":")
        if not user or not hashed.startswith(BCRYPT_PREFIXES):
            raise ConfigError(
                "auth.htpasswd",
                f"{path} line {number}: not a user:bcrypt-hash entry (write it with htpasswd -B)",
            )
        users[user] = hashed.encode()
    if not users:
        raise ConfigError("auth.htpasswd", f"{path} lists no users")
    return users


class Gate:
    """Checks the Basic credentials of requests for `authenticated` upstreams."""

    def __init__(self, users: Mapping[str, bytes] | None, anyone_may_pull: bool = True) -> None:
        self.users = users
        self.anyone_may_pull = anyone_may_pull  # some upstream is `public`
        self._checked: dict[bytes, tuple[bool, float]] = {}
        self.failures = FailedLogins()

    @property
    def enabled(self) -> bool:
        return self.users is not None

    async def require(self, authorization: str | None, address: str) -> str:
        """The user logged in by `authorization`; else LoginRequired (or TooManyRequests)."""
        self._refuse_if_blocked(address)
        credentials = _basic_credentials(authorization)
        if credentials is None:
            raise LoginRequired("this upstream needs a login to the mirror")
        user, password = credentials
        if not await self._valid(user, password):
            self._failed(address)
            raise LoginRequired(f"wrong user name or password for {user!r}")
        return user

    def anonymous(self, authorization: str | None) -> bool:
        """No credentials, or the empty ones a client without any sends (`Basic Og==`)."""
        return _basic_credentials(authorization) is None

    async def _valid(self, user: str, password: str) -> bool:
        hashed = self.users.get(user) if self.users is not None else None
        if hashed is None:
            return False
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        now = time.monotonic()
        cached = self._checked.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        # bcrypt takes a good part of a second of CPU: off the event loop.
        valid = await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)
        if len(self._checked) >= CHECK_CACHE_SIZE:
            self._checked.clear()
        self._checked[key] = (valid, now + CHECK_CACHE_TTL)
        return valid

    def _refuse_if_blocked(self, address: str) -> None:
        wait = self.failures.retry_after(address, time.monotonic())
        if wait is not None:
            raise TooManyRequests(f"too many failed logins from {address}", str(wait))

    def _failed(self, address: str) -> None:
        self.failures.add(address, time.monotonic())


class FailedLogins:
    """The latest failed logins (at most MAX_FAILURES) of each client network, for at
    most `size` networks, the least recently failing first in line to be forgotten. A
    network's entry goes FAILURE_WINDOW after its last failure."""

    def __init__(self, size: int = FAILURE_TABLE_SIZE) -> None:
        self.size = size
        self._times: OrderedDict[str, tuple[float, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._times)

    def retry_after(self, address: str, now: float) -> int | None:
        """Seconds until a client at `address` may try to log in again; None: it may now."""
        if not self._times:
            return None  # no parsing of addresses while nobody fails
        network = client_network(address)
        times = self._times.get(network)
        if times is None:
            return None
        times = tuple(t for t in times if t > now - FAILURE_WINDOW)
        if not times:
            del self._times[network]
            return None
        self._times[network] = times
        if len(times) < MAX_FAILURES:
            return None
        return int(times[0] + FAILURE_WINDOW - now) + 1

    def add(self, address: str, now: float) -> None:
        network = client_network(address)
        earlier = self._times.pop(network, ())
        self._times[network] = (*earlier[-(MAX_FAILURES - 1) :], now)
        while len(self._times) > self.size:
            self._times.popitem(last=False)
        while True:  # expired entries, from the least recently failing on
            oldest = next(iter(self._times.values()))
            if oldest[-1] > now - FAILURE_WINDOW:
                break
            self._times.popitem(last=False)


def client_network(address: str) -> str:
    """What failed logins are counted by: an IPv4 address (IPv4-mapped IPv6 included),
    an IPv6 /64; anything else (a Unix socket's peer) as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) from a Basic header; None when absent, empty or not Basic."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    return (user, password) if user or password else None
