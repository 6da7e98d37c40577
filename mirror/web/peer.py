"""The peer route of fleet mode: another replica of the fleet streams a blob from this one,
which has it or is downloading it, instead of fetching it from the upstream again.

`GET|HEAD /_mirror/peer/blobs/{digest}`, outside /v2/, so no registry client's path
reaches it; answered only to a request with the fleet's secret as its Bearer token. The
answer is what a client joining the blob here gets: the cached file, or the download
under way (from whatever source) streamed as it arrives, the last byte held back until
the digest is verified; ranges alike. 404 when this replica has neither: a peer request
never starts a download. With workers, a worker hands these requests to the primary, as
any request it cannot answer from the cache (worker.py).

A peer is not a client: its requests are counted in `mirror_peer_requests_total`, not as
cache requests nor in the status page's activity.
"""

from __future__ import annotations

import hmac
import logging

from aiohttp import hdrs, web

from mirror.config import SharedConfig
from mirror.errors import BlobUnknown, PeerUnauthorized
from mirror.reference import parse_digest
from mirror.web.middleware import METRICS
from mirror.web.registry import BLOBS
from mirror.web.responses import BlobResponse

log = logging.getLogger(__name__)

PATH = "/_mirror/peer/blobs/{digest}"
REMEMBERED = 1024  # addresses whose refusal was logged, the oldest forgotten past this


class PeerGate:
    """Who may ask: a request carrying the fleet's secret (none configured: nobody). A
    refusal is logged once per remote address, as long as the address is remembered."""

    def __init__(self, secret: str | None) -> None:
        self._secret = None if secret is None else secret.encode()
        self._logged: dict[str, None] = {}  # insertion-ordered: the oldest first

    def check(self, authorization: str | None, remote: str) -> None:
        """Raises PeerUnauthorized unless `authorization` is `Bearer <the secret>`."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if self._secret is None:
            why = "this replica has no shared.peer_secret"
        elif scheme.lower() != "bearer" or not token:
            why = "no fleet secret sent"
        elif hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._secret):
            return
        else:
            why = "a wrong fleet secret"
        self._log_once(remote, why)
        raise PeerUnauthorized(f"peer requests need the fleet's secret: {why}")

    def _log_once(self, remote: str, why: str) -> None:
        if remote in self._logged:
            return
        if len(self._logged) >= REMEMBERED:
            del self._logged[next(iter(self._logged))]
        self._logged[remote] = None
        log.warning("peer request from %s refused: %s (logged once per address)", remote, why)


GATE = web.AppKey("peer_gate", PeerGate)


def add_routes(app: web.Application, shared: SharedConfig | None) -> None:
    """In fleet mode only (`shared`); reads the secret now, so a missing variable stops
    the start."""
    if shared is None:
        return
    secret = shared.fleet_secret()
    if secret is None:
        log.warning(
            "no shared.peer_secret: other replicas' peer requests are refused, and this one"
            " fetches alone a blob another replica is downloading"
        )
    app[GATE] = PeerGate(secret)
    app.router.add_get(PATH, blob, name="peer_blob")


async def blob(request: web.Request) -> web.StreamResponse:
    counted = request.app[METRICS].peer_requests
    try:
        request.app[GATE].check(request.headers.get(hdrs.AUTHORIZATION), request.remote or "")
    except PeerUnauthorized:
        counted.labels("refused").inc()
        raise
    digest = parse_digest(request.match_info["digest"])
    async with request.app[BLOBS].for_peer(digest) as found:
        if found is None:
            counted.labels("absent").inc()
            raise BlobUnknown(f"{digest} is neither cached nor being downloaded here")
        counted.labels("served").inc()
        # Not blob_response: that counts a client's cache request, and its activity.
        response = BlobResponse(found, digest)
        await response.prepare(request)
        await response.write_eof()
        return response
