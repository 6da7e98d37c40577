"""The one exception tree of the mirror.

Every error a client can see is a `RegistryError`: it carries its OCI error code and
HTTP status, and `web/middleware.py` is the one place that turns it into the
`{"errors": [...]}` JSON body. `ConfigError` is for the config loader and the CLI.
"""

from __future__ import annotations


class MirrorError(Exception):
    """Base of every error the mirror raises on purpose."""


class ConfigError(MirrorError):
    """A configuration value is missing or wrong; the message names the key path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


class RegistryError(MirrorError):
    """An error answered to a registry client as OCI error JSON."""

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def headers(self) -> dict[str, str]:
        # An HTTP 401 must name a way to authenticate: the mirror's own login, whichever
        # refusal (the mirror's, or an upstream's passed on) it answers.
        return {"WWW-Authenticate": 'Basic realm="mirror"'} if self.status == 401 else {}


class NameInvalid(RegistryError):
    code, status = "NAME_INVALID", 400


class TagInvalid(RegistryError):
    code, status = "TAG_INVALID", 400


class DigestInvalid(RegistryError):
    code, status = "DIGEST_INVALID", 400


class RangeInvalid(RegistryError):
    code, status = "RANGE_INVALID", 416

    def __init__(self, message: str, size: int | None = None) -> None:
        super().__init__(message)
        self.size = size

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"} if self.size is not None else {}


class PaginationInvalid(RegistryError):
    code, status = "PAGINATION_NUMBER_INVALID", 400


class NameUnknown(RegistryError):
    code, status = "NAME_UNKNOWN", 404


class ManifestUnknown(RegistryError):
    code, status = "MANIFEST_UNKNOWN", 404


class BlobUnknown(RegistryError):
    code, status = "BLOB_UNKNOWN", 404


class NotFound(RegistryError):
    """A path under /v2/ that is no endpoint of the distribution API."""

    code, status = "UNSUPPORTED", 404


class Unsupported(RegistryError):
    """Push and delete: a mirror is read-only."""

    code, status = "UNSUPPORTED", 405


class Unauthorized(RegistryError):
    code, status = "UNAUTHORIZED", 401


class LoginRequired(RegistryError):
    """A client of an `authenticated` upstream without valid mirror credentials."""

    code, status = "UNAUTHORIZED", 401


class PeerUnauthorized(RegistryError):
    """A request on the peer route (fleet mode) without the fleet's secret."""

    code, status = "UNAUTHORIZED", 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="mirror-fleet"'}


class Denied(RegistryError):
    code, status = "DENIED", 403


class TooManyRequests(RegistryError):
    code, status = "TOOMANYREQUESTS", 429

    def __init__(self, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after or "60"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after}


class Busy(RegistryError):
    """An upstream's queue of waiting fetches is full: come back shortly."""

    code, status = "UNAVAILABLE", 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamError(RegistryError):
    """The upstream answered with a server error, or with content that fails verification."""

    code, status = "UPSTREAM_ERROR", 502


class PeerRefused(UpstreamError):
    """Another replica of the fleet refused this one's secret: it fetches alone."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached at all."""

    code, status = "UPSTREAM_UNAVAILABLE", 502


class UpstreamTimeout(UpstreamError):
    code, status = "UPSTREAM_TIMEOUT", 504


class UpstreamCut(UpstreamError):
    """The upstream's body broke off (connection lost, or it stalled): worth resuming."""


# Failures after which a cached copy is still worth serving: the upstream, not the
# content, is the problem: the cached copy is served stale.
STALE_SERVABLE: tuple[type[RegistryError], ...] = (
    UpstreamError,
    Busy,
    TooManyRequests,
    Unauthorized,
    Denied,
)
