"""Upstream auth: challenge parsing, the site rule for credentials, and the token flow.

The token flow runs through a real `Upstream` against `FakeUpstream`, an aiohttp server on
loopback that plays Docker Hub's registry and token service.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import pytest
from fake_upstream import OCI_MANIFEST, FakeUpstream, manifest_bytes
from yarl import URL

from mirror.config import AuthConfig, Timeouts, UpstreamConfig
from mirror.errors import Unauthorized, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from mirror.upstream import auth
from mirror.upstream.auth import (
    Authenticator,
    Challenge,
    parse_challenge,
    same_site,
)
from mirror.upstream.client import Upstream
from mirror.upstream.credentials import PasswordCredentials

ACCEPT = (OCI_MANIFEST,)
PASSWORD = "s3cret-Pa55"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/alpine:pull",
                },
            ),
            id="hub",
        ),
        pytest.param(
            'Bearer realm="https://r.example/token",scope="repository:a/b:pull,push",service="s"',
            Challenge(
                "bearer",
                {
                    "realm": "https://r.example/token",
                    "scope": "repository:a/b:pull,push",
                    "service": "s",
                },
            ),
            id="comma-inside-quotes",
        ),
        pytest.param(
            'Bearer realm="https://r.example/token", service="s",   '
            'scope="repository:a:pull repository:b:pull",error="insufficient_scope"',
            Challenge(
                "bearer",
                {
                    "realm": "https://r.example/token",
                    "service": "s",
                    "scope": "repository:a:pull repository:b:pull",
                    "error": "insufficient_scope",
                },
            ),
            id="spaces-and-extra-params",
        ),
        pytest.param(
            "bearer realm=https://r.example/token,service=s",
            Challenge("bearer", {"realm": "https://r.example/token", "service": "s"}),
            id="unquoted-values",
        ),
        pytest.param(
            'BEARER Realm="https://r.example/token",Service="s"',
            Challenge("bearer", {"realm": "https://r.example/token", "service": "s"}),
            id="case-insensitive-scheme-and-keys",
        ),
        pytest.param(
            'Basic realm="Registry Realm"',
            Challenge("basic", {"realm": "Registry Realm"}),
            id="basic",
        ),
        pytest.param(
            'Basic realm="say \\"hi\\""',
            Challenge("basic", {"realm": 'say "hi"'}),
            id="escaped-quotes",
        ),
        pytest.param(
            'Bearer realm="",scope=""',
            Challenge("bearer", {"realm": "", "scope": ""}),
            id="empty-values",
        ),
        pytest.param("", None, id="empty"),
        pytest.param("   ", None, id="blank"),
        pytest.param(None, None, id="none"),
    ],
)
def test_parse_challenge(header: str | None, expected: Challenge | None) -> None:
    assert parse_challenge(header) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("https://registry-1.docker.io", "https://registry-1.docker.io/token", True),
        ("https://registry-1.docker.io", "https://auth.docker.io/token", True),
        ("https://REGISTRY-1.Docker.IO", "https://auth.docker.io", True),
        ("http://127.0.0.1:5000", "http://127.0.0.1:6000/token", True),
        ("https://ghcr.io", "https://ghcr.io/token", True),
        ("https://foo.com", "https://bar.com", False),
        ("https://registry-1.docker.io", "https://docker.io.evil.com", False),
        ("https://registry-1.docker.io", "https://evil-docker.io", False),
        ("https://quay.io", "https://auth.docker.io", False),
        ("http://127.0.0.1:5000", "http://localhost:5000", False),
        ("http://localhost", "http://a.localhost", False),
        # IP addresses have no registrable domain: only the same address is the same site.
        ("http://10.0.0.1:5000", "http://192.168.0.1/token", False),
        ("http://127.0.0.1", "http://10.0.0.1", False),
        ("http://[::1]:5000", "http://[::1]:6000", True),
        ("http://[fd00::1]", "http://[fe80::1]", False),
        ("https://registry.example.co.uk", "https://evil.co.uk", False),
        ("https://registry.example.co.uk", "https://auth.example.co.uk", True),
        ("https://registry.gitlab.com", "https://gitlab.com/jwt/auth", True),
    ],
)
def test_same_site(a: str, b: str, expected: bool) -> None:
    assert same_site(URL(a), URL(b)) is expected
    assert same_site(URL(b), URL(a)) is expected


# --- the token flow through Upstream ------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def hub(fake_upstream: FakeUpstream) -> FakeUpstream:
    """A registry that wants Bearer tokens, with two repositories."""
    fake_upstream.auth.scheme = "bearer"
    fake_upstream.manifests.put("library/x", "latest", manifest_bytes("x"))
    fake_upstream.manifests.put("library/y", "latest", manifest_bytes("y"))
    return fake_upstream


def upstream_for(url: str, session: aiohttp.ClientSession, username: str | None = None) -> Upstream:
    auth = (
        AuthConfig("basic", username=username, password_env="FAKE_UPSTREAM_PASSWORD")
        if username
        else AuthConfig()
    )
    config = UpstreamConfig(name="fake", url=url, default=True, auth=auth)
    return Upstream(config, session)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


async def test_token_fetched_then_reused(hub: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream = upstream_for(hub.url, session)

    first = await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert first.body == manifest_bytes("x")
    assert [(t.query.get("service"), t.query.get("scope")) for t in hub.token_requests] == [
        ("fake", "repository:library/x:pull")
    ]
    assert hub.token_requests[0].authorization is None  # anonymous: no credentials configured

    second = await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert second.body == first.body
    assert len(hub.token_requests) == 1
    manifest_gets = [s for s in hub.seen if "/manifests/" in s.path]
    assert [(s.authorization, s.status) for s in manifest_gets] == [
        (None, 401),
        ("Bearer token-1", 200),
        ("Bearer token-1", 200),
    ]


async def test_concurrent_requests_fetch_one_token(
    hub: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream = upstream_for(hub.url, session)
    results = await asyncio.gather(
        *(upstream.get_manifest("library/x", "latest", ACCEPT) for _ in range(10))
    )
    assert all(r.body == manifest_bytes("x") for r in results)
    assert len(hub.token_requests) == 1
    assert hub.count("GET", "/manifests/", status=200) == 10


async def test_each_repository_gets_its_own_token(
    hub: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream = upstream_for(hub.url, session)
    for _ in range(2):
        x = await upstream.get_manifest("library/x", "latest", ACCEPT)
        y = await upstream.get_manifest("library/y", "latest", ACCEPT)
        assert (x.body, y.body) == (manifest_bytes("x"), manifest_bytes("y"))
    scopes = [t.query.get("scope") for t in hub.token_requests]
    assert scopes == ["repository:library/x:pull", "repository:library/y:pull"]


async def test_credentials_go_to_a_realm_on_the_upstreams_host(
    hub: FakeUpstream, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_UPSTREAM_PASSWORD", PASSWORD)
    upstream = upstream_for(hub.url, session, username="alice")
    manifest = await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert manifest.body == manifest_bytes("x")
    assert [t.authorization for t in hub.token_requests] == [basic("alice", PASSWORD)]


async def test_a_realm_on_another_site_is_not_contacted(
    hub: FakeUpstream, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same server, but the challenge names it `localhost` while the upstream is
    # configured as 127.0.0.1: another site as far as the mirror can know.
    hub.auth.realm_host = "localhost"
    monkeypatch.setenv("FAKE_UPSTREAM_PASSWORD", PASSWORD)
    upstream = upstream_for(hub.url, session, username="alice")
    with pytest.raises(UpstreamError, match=r"token realm localhost.*allowed_realms"):
        await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert hub.token_requests == []


@pytest.mark.parametrize("listed", ["localhost", "localhost:{port}"])
async def test_a_realm_listed_in_allowed_realms_is_trusted(
    hub: FakeUpstream, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, listed: str
) -> None:
    hub.auth.realm_host = "localhost"
    monkeypatch.setenv("FAKE_UPSTREAM_PASSWORD", PASSWORD)
    config = UpstreamConfig(
        name="fake",
        url=hub.url,
        default=True,
        auth=AuthConfig("basic", username="alice", password_env="FAKE_UPSTREAM_PASSWORD"),
        allowed_realms=(listed.format(port=hub.port),),
    )
    manifest = await Upstream(config, session).get_manifest("library/x", "latest", ACCEPT)
    assert manifest.body == manifest_bytes("x")
    [token_request] = hub.token_requests
    assert token_request.headers["Host"].startswith("localhost:")
    assert token_request.authorization == basic("alice", PASSWORD)


@pytest.mark.parametrize(
    ("upstream", "realm", "trusted"),
    [
        ("https://registry-1.docker.io", "https://auth.docker.io/token", True),
        ("https://registry-1.docker.io", "http://auth.docker.io/token", False),  # downgrade
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", True),
        ("http://127.0.0.1:5000", "https://127.0.0.1:5001/token", True),
        ("https://registry.example.co.uk", "https://evil.co.uk/token", False),
    ],
)
async def test_which_realms_get_credentials(
    session: aiohttp.ClientSession, upstream: str, realm: str, trusted: bool
) -> None:
    credentials = PasswordCredentials("alice", lambda: PASSWORD)
    auth = Authenticator("fake", URL(upstream), credentials, session)
    assert auth.trusts_realm(URL(realm)) is trusted


class FakeClock(SimpleNamespace):
    """Stands in for the `time` module inside `mirror.upstream.auth`."""

    now: float = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("expires_in", "reused_after", "renewed_after"),
    [
        pytest.param(None, 40.0, 61.0, id="no-expires_in-means-60s"),
        pytest.param(300, 200.0, 301.0, id="expires_in-300"),
    ],
)
async def test_token_lifetime(
    hub: FakeUpstream,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    expires_in: int | None,
    reused_after: float,
    renewed_after: float,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(auth, "time", clock)
    hub.auth.expires_in = expires_in
    upstream = upstream_for(hub.url, session)

    await upstream.get_manifest("library/x", "latest", ACCEPT)
    start = clock.now
    clock.now = start + reused_after
    await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert len(hub.token_requests) == 1
    clock.now = start + renewed_after
    await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert len(hub.token_requests) == 2
    # A renewed token is used straight away, without a 401 first.
    assert hub.seen[-1].status == 200
    assert hub.seen[-1].authorization == "Bearer token-2"


async def test_rejected_token_is_renewed_once(
    hub: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream = upstream_for(hub.url, session)
    await upstream.get_manifest("library/x", "latest", ACCEPT)
    hub.auth.revoke()
    manifest = await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert manifest.body == manifest_bytes("x")
    assert len(hub.token_requests) == 2
    last_two = [(s.authorization, s.status) for s in hub.seen if "/manifests/" in s.path][-2:]
    assert last_two == [("Bearer token-1", 401), ("Bearer token-2", 200)]


async def test_a_token_that_never_works_is_not_fetched_in_a_loop(
    hub: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    hub.mode = "reject"
    upstream = upstream_for(hub.url, session)
    for attempt in (1, 2):
        with pytest.raises(Unauthorized) as caught:
            await upstream.get_manifest("library/x", "latest", ACCEPT)
        assert (caught.value.code, caught.value.status) == ("UNAUTHORIZED", 401)
        assert len(hub.token_requests) == attempt
        assert hub.count("GET", "/manifests/") == 2 * attempt


@pytest.mark.parametrize(
    ("token_status", "error", "status"),
    [
        (401, Unauthorized, 401),
        (403, Unauthorized, 401),
        (500, UpstreamError, 502),
    ],
)
async def test_token_service_errors(
    hub: FakeUpstream,
    session: aiohttp.ClientSession,
    token_status: int,
    error: type[UpstreamError | Unauthorized],
    status: int,
) -> None:
    hub.auth.token_status = token_status
    upstream = upstream_for(hub.url, session)
    with pytest.raises(error) as caught:
        await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert type(caught.value) is error
    assert caught.value.status == status
    assert "token service" in caught.value.message


async def test_token_service_unreachable(
    hub: FakeUpstream, session: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    upstream = upstream_for(hub.url, session)
    challenge = Challenge("bearer", {"realm": f"http://127.0.0.1:{unused_tcp_port}/token"})
    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        await upstream.auth.answer(challenge, "repository:library/x:pull", None)


async def test_token_service_that_never_answers_times_out(
    hub: FakeUpstream, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.auth.token_delay = 5.0
    upstream = Upstream(
        UpstreamConfig(
            name="fake", url=hub.url, default=True, timeouts=Timeouts(first_byte=2, idle=0.3)
        ),
        session,
    )
    with pytest.raises(UpstreamTimeout) as caught:
        await upstream.get_manifest("library/x", "latest", ACCEPT)
    assert caught.value.status == 504


async def test_invalid_realm_is_refused(session: aiohttp.ClientSession) -> None:
    upstream = upstream_for("http://127.0.0.1:9", session)
    challenge = Challenge("bearer", {"realm": "file:///etc/passwd"})
    with pytest.raises(UpstreamError, match="invalid token realm"):
        await upstream.auth.answer(challenge, "repository:library/x:pull", None)
