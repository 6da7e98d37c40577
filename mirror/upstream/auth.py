"""Answering an upstream's `WWW-Authenticate` challenge: Basic, or a Bearer token.

Tokens are cached per upstream (each upstream has its own `Authenticator`) and per
scope, and fetched once under a lock however many requests meet the same challenge.
A token realm is contacted only when it is on the upstream's own registrable domain or
listed in the upstream's `allowed_realms`; the credentials go only to such a realm.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from publicsuffixlist import PublicSuffixList
from yarl import URL

from mirror.errors import Unauthorized, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from mirror.upstream.credentials import CredentialSource

DEFAULT_TOKEN_LIFETIME = 60.0  # the distribution token spec's default when expires_in is absent
EXPIRY_MARGIN = 10.0  # renew a little early so a token never expires in flight
MAX_TOKEN_RESPONSE = 64 * 1024

_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_ESCAPED = re.compile(r"\\(.)")
_SUFFIXES = PublicSuffixList()


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """`Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`."""
    if not header or not header.strip():
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): _ESCAPED.sub(r"\1", m.group(2)) if m.group(2) else m.group(3) or ""
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def same_site(a: URL, b: URL) -> bool:
    """Same host, or the same registrable domain by the Public Suffix List (docker.io for
    registry-1.docker.io and auth.docker.io; never co.uk).

    An IP address has no domain: only the very same address is the same site.
    """
    host_a, host_b = (a.host or "").lower(), (b.host or "").lower()
    if host_a == host_b:
        return True
    if _is_ip(host_a) or _is_ip(host_b):
        return False
    domain = _SUFFIXES.privatesuffix(host_a)
    return domain is not None and domain == _SUFFIXES.privatesuffix(host_b)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class _Token:
    header: str
    expires: float


class Authenticator:
    """What to put in `Authorization` for one upstream, per scope."""

    def __init__(
        self,
        upstream_name: str,
        upstream_url: URL,
        credentials: CredentialSource | None,
        session: aiohttp.ClientSession,
        allowed_realms: tuple[str, ...] = (),
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> None:
        self.upstream_name = upstream_name
        self.upstream_url = upstream_url
        self.credentials = credentials
        self.session = session
        self.allowed_realms = allowed_realms
        self.timeout = timeout or aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def header(self, scope: str) -> str | None:
        """The header to send first: a live token for `scope`, else Basic credentials if any."""
        token = self._tokens.get(scope)
        if token is not None and token.expires > time.monotonic():
            return token.header
        return (await self.credentials.get()).basic() if self.credentials else None

    async def answer(self, challenge: Challenge, scope: str, rejected: str | None) -> str | None:
        """A header that may satisfy `challenge`, or None when there is nothing new to try.

        `rejected` is the header the upstream just refused; when another request already
        renewed the token meanwhile, the renewed one is returned without a new fetch.
        """
        if challenge.scheme == "basic":
            return await self._renewed_basic(rejected)
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:
            current = await self.header(scope)
            if current is not None and current != rejected and current.startswith("Bearer "):
                return current
            token = await self._fetch_token(challenge, scope)
            self._tokens[scope] = token
            return token.header

    async def _renewed_basic(self, rejected: str | None) -> str | None:
        """Basic credentials other than the ones just refused, renewed if need be."""
        if self.credentials is None:
            return None
        current = await self.credentials.get()
        if current.basic() != rejected:
            return current.basic()
        renewed = await self.credentials.renew(current)
        return renewed.basic() if renewed is not None else None

    def allows_realm(self, realm: URL) -> bool:
        """Whether this token realm may be contacted at all: on the upstream's site, or
        listed (as host or host:port) in `allowed_realms`."""
        host = (realm.host or "").lower()
        listed = host in self.allowed_realms or f"{host}:{realm.port}" in self.allowed_realms
        return listed or same_site(realm, self.upstream_url)

    def trusts_realm(self, realm: URL) -> bool:
        """Whether the upstream's credentials may go to this token realm: an allowed one,
        and not from https down to plain http."""
        downgrade = realm.scheme == "http" and self.upstream_url.scheme == "https"
        return self.allows_realm(realm) and not downgrade

    async def _fetch_token(self, challenge: Challenge, scope: str) -> _Token:
        realm = URL(challenge.params["realm"])
        if realm.scheme not in ("http", "https") or not realm.host:
            raise UpstreamError(f"upstream {self.upstream_name} names an invalid token realm")
        if not self.allows_realm(realm):
            raise UpstreamError(
                f"upstream {self.upstream_name} names token realm {realm.host}, which is not on"
                " its domain; not contacted (list it under allowed_realms to allow it)"
            )
        query = {"service": challenge.params.get("service", "")}
        query["scope"] = challenge.params.get("scope", scope)
        headers = {}
        if self.credentials and self.trusts_realm(realm):
            headers["Authorization"] = (await self.credentials.get()).basic()
        try:
            async with self.session.get(
                realm.update_query({k: v for k, v in query.items() if v}),
                headers=headers,
                allow_redirects=False,
                timeout=self.timeout,
            ) as response:
                body = await read_at_most(response.content, MAX_TOKEN_RESPONSE)
                status = response.status
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"token service of upstream {self.upstream_name} ({realm.host}) did not answer"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"token service of upstream {self.upstream_name} ({realm.host}) is unreachable"
            ) from exc
        return self._token_from(status, body)

    def _token_from(self, status: int, body: bytes) -> _Token:
        if status in (401, 403):
            raise Unauthorized(
                f"token service of upstream {self.upstream_name} refused the credentials"
            )
        if status != 200:
            raise UpstreamError(f"token service of upstream {self.upstream_name} answered {status}")
        try:
            data = _json_object(body)
            token = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, TypeError) as exc:
            raise UpstreamError(
                f"token service of upstream {self.upstream_name} sent an unreadable answer"
            ) from exc
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"token service of upstream {self.upstream_name} sent no token")
        expires = time.monotonic() + max(lifetime - EXPIRY_MARGIN, 1.0)
        return _Token(f"Bearer {token}", expires)


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body when it has at most `limit` bytes, else its first `limit + 1`.

    (`StreamReader.read(n)` alone returns whatever has arrived, often far less than `n`.)
    """
    body = bytearray()
    while len(body) <= limit:
        chunk = await content.read(limit + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _json_object(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data
