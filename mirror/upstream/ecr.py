"""AWS ECR credentials: `GetAuthorizationToken`, cached and renewed in the background.

The token is `base64("AWS:<password>")`, valid 12 hours, used as Basic auth. It is
fetched on first use (so a mirror whose AWS credentials are missing still starts and
serves its other upstreams), renewed when three quarters of its life are gone, and
renewed once when the registry refuses it. AWS credentials come from botocore's standard
chain: environment, shared config and credentials files, container or instance role.
Whatever `expiresAt` says (moto answers a date in 2015), renewals are never scheduled
less than `MIN_REFRESH_INTERVAL` apart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from datetime import datetime
from typing import Any

import botocore.config
import botocore.exceptions
import botocore.session

from mirror.errors import Denied, RegistryError, Unauthorized, UpstreamUnavailable
from mirror.upstream.credentials import Credentials

log = logging.getLogger(__name__)

MIN_REFRESH_INTERVAL = 60.0
RENEW_ON_REJECT_INTERVAL = 10.0  # a registry that keeps refusing does not get hammered
REFRESH_AT = 0.75  # of the token's remaining life
_CLIENT_CONFIG = botocore.config.Config(
    connect_timeout=10, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}
)


class EcrCredentials:
    def __init__(self, upstream_name: str, region: str, registry_id: str) -> None:
        self.upstream_name = upstream_name
        self.region = region
        self.registry_id = registry_id
        self._current: Credentials | None = None
        self._expires_at = 0.0  # wall clock, as AWS says it
        self._fetched_at = -float("inf")  # monotonic
        self._lock = asyncio.Lock()
        self._client: Any = None  # botocore's ECR client, typed only by its service model
        self._refresher: asyncio.Task[None] | None = None

    async def get(self) -> Credentials:
        async with self._lock:
            if self._current is None:
                await self._fetch()
                self._refresher = asyncio.create_task(self._refresh_in_background())
            assert self._current is not None
            return self._current

    async def renew(self, rejected: Credentials) -> Credentials | None:
        async with self._lock:
            if self._current is not None and self._current != rejected:
                return self._current  # renewed meanwhile by another request
            if time.monotonic() - self._fetched_at < RENEW_ON_REJECT_INTERVAL:
                return None
            await self._fetch()
            # Tried again even if unchanged: the refusal may have been the registry's hiccup.
            return self._current

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

    async def _fetch(self) -> None:
        """Under the lock: a new token."""
        self._fetched_at = time.monotonic()
        data = await asyncio.to_thread(self._get_authorization_token)
        self._current = _decode(data.get("authorizationToken"), self.upstream_name)
        expires = data.get("expiresAt")
        self._expires_at = expires.timestamp() if isinstance(expires, datetime) else 0.0
        log.info(
            "upstream %s: ECR token for registry %s valid until %s",
            self.upstream_name,
            self.registry_id,
            expires,
        )

    def next_refresh_delay(self) -> float:
        remaining = self._expires_at - time.time()
        return max(remaining * REFRESH_AT, MIN_REFRESH_INTERVAL)

    async def _refresh_in_background(self) -> None:
        while True:
            await asyncio.sleep(self.next_refresh_delay())
            try:
                async with self._lock:
                    await self._fetch()
            except RegistryError as exc:
                # The current token may still be valid: keep it, and try again later.
                log.warning("upstream %s: ECR token renewal failed: %s", self.upstream_name, exc)

    def _get_authorization_token(self) -> dict[str, Any]:
        """In a worker thread: botocore is synchronous."""
        try:
            if self._client is None:
                session = botocore.session.get_session()
                self._client = session.create_client(
                    "ecr", region_name=self.region, config=_CLIENT_CONFIG
                )
            answer = self._client.get_authorization_token(registryIds=[self.registry_id])
        except (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.CredentialRetrievalError,
        ) as exc:
            raise Unauthorized(
                f"upstream {self.upstream_name}: no usable AWS credentials for ECR ({exc})"
            ) from exc
        except botocore.exceptions.ClientError as exc:
            raise Denied(
                f"upstream {self.upstream_name}: ECR GetAuthorizationToken refused: {exc}"
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise UpstreamUnavailable(
                f"upstream {self.upstream_name}: cannot reach ECR for a token: {exc}"
            ) from exc
        entries = answer.get("authorizationData") or [{}]
        return dict(entries[0])


def _decode(token: object, upstream_name: str) -> Credentials:
    try:
        username, _, password = base64.b64decode(str(token)).decode().partition(":")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpstreamUnavailable(f"upstream {upstream_name}: unreadable ECR token") from exc
    if not username or not password:
        raise UpstreamUnavailable(f"upstream {upstream_name}: ECR sent no token")
    return Credentials(username, password)
