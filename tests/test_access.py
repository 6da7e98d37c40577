"""Access control for the mirror itself: htpasswd logins for `authenticated` upstreams,
private blobs kept from public routes, failed logins limited, and HTTPS.

End to end: `mirror serve` in front of two real docker-registry upstreams, a public
default one and a private one under the prefix `private/`, pulled with skopeo.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import bcrypt
import pytest
from conftest import USERS, write_htpasswd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_aiohttp import AiohttpClient
from upstream_registry import (
    OCI_MANIFEST,
    RegistryProcess,
    dir_digests,
    push_image,
    put_blob,
    skopeo_copy_async,
)

from mirror import access
from mirror.access import Gate, read_htpasswd
from mirror.app import make_app
from mirror.config import config_from_dict, load_config, with_overrides
from mirror.errors import ConfigError, LoginRequired, TooManyRequests

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

ALICE = f"alice:{USERS['alice']}"


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


# --- htpasswd and the gate ------------------------------------------------------------------


def test_htpasswd_entries_must_be_bcrypt(tmp_path: Path) -> None:
    good = write_htpasswd(tmp_path / "good")
    assert set(read_htpasswd(good)) == set(USERS)
    bad = tmp_path / "bad"
    bad.write_text("# users\nalice:$apr1$abc$def\n")  # MD5: refused, naming the line
    with pytest.raises(ConfigError, match=r"^auth.htpasswd: .*bad line 2: not a user:bcrypt"):
        read_htpasswd(bad)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="lists no users"):
        read_htpasswd(empty)


async def test_gate_checks_caches_and_limits_failed_logins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(read_htpasswd(write_htpasswd(tmp_path / "htpasswd")))
    checks = 0
    checkpw = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        nonlocal checks
        checks += 1
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    assert await gate.require(basic(ALICE), "10.0.0.1") == "alice"
    assert await gate.require(basic(ALICE), "10.0.0.1") == "alice"
    assert checks == 1  # bcrypt is slow on purpose: a good login is checked once
    for header in (None, basic(":"), "Bearer abc", "Basic !!!"):
        assert gate.anonymous(header)
        with pytest.raises(LoginRequired) as caught:
            await gate.require(header, "10.0.0.2")
        assert caught.value.headers() == {"WWW-Authenticate": 'Basic realm="mirror"'}
    for attempt in range(access.MAX_FAILURES):
        with pytest.raises(LoginRequired):
            await gate.require(basic(f"alice:wrong{attempt}"), "10.0.0.3")
    # The sixth attempt from that address is refused unchecked, even with the right password.
    with pytest.raises(TooManyRequests) as limited:
        await gate.require(basic(ALICE), "10.0.0.3")
    assert 0 < int(limited.value.headers()["Retry-After"]) <= access.FAILURE_WINDOW + 1
    assert await gate.require(basic(ALICE), "10.0.0.4") == "alice"  # other addresses are not


async def test_failed_logins_from_endless_addresses_stay_in_a_bounded_table(
    tmp_path: Path,
) -> None:
    """Whatever the number of client addresses (an IPv6 range is endless), the gate
    remembers failures of at most FAILURE_TABLE_SIZE networks; an IPv6 client counts by
    its /64, so another address of the same /64 does not start afresh."""
    gate = Gate(read_htpasswd(write_htpasswd(tmp_path / "htpasswd")))
    stranger = basic("nobody:guess")  # an unknown user: no bcrypt, quick to fail
    for n in range(3 * access.FAILURE_TABLE_SIZE):
        with pytest.raises(LoginRequired):
            await gate.require(stranger, str(ipaddress.IPv6Address((0x20010DB8 << 96) + (n << 64))))
    assert len(gate.failures) == access.FAILURE_TABLE_SIZE

    for n in range(access.MAX_FAILURES):
        with pytest.raises(LoginRequired):
            await gate.require(stranger, f"2001:db8:ffff:1::{n + 1:x}")
    with pytest.raises(TooManyRequests):  # the same /64, a new address
        await gate.require(basic(ALICE), "2001:db8:ffff:1:abcd::99")
    assert await gate.require(basic(ALICE), "2001:db8:ffff:2::1") == "alice"  # another /64
    assert len(gate.failures) == access.FAILURE_TABLE_SIZE


def test_failed_logins_expire_and_the_least_recent_go_first() -> None:
    failures = access.FailedLogins(size=3)
    for n, address in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]):
        for _ in range(access.MAX_FAILURES):
            failures.add(address, 100.0 + n)
    assert len(failures) == 3
    assert failures.retry_after("10.0.0.1", 104.0) is None  # forgotten: the least recent
    # Refused until the window of the first failure kept is over (rounded up).
    assert failures.retry_after("::ffff:10.0.0.2", 104.0) == 101 + access.FAILURE_WINDOW - 104 + 1
    assert failures.retry_after("10.0.0.4", 104.0) == 103 + access.FAILURE_WINDOW - 104 + 1
    failures.add("10.0.0.5", 103.0 + access.FAILURE_WINDOW + 1)  # the others' window is over
    assert len(failures) == 1


def test_ecr_upstreams_are_authenticated_by_default(tmp_path: Path) -> None:
    ecr = {
        "name": "ecr",
        "url": "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        "auth": {"type": "ecr"},
    }
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"upstreams": [ecr]})
    assert caught.value.key == "upstreams[0].access"
    assert "needs auth.htpasswd" in str(caught.value)
    htpasswd = str(write_htpasswd(tmp_path / "htpasswd"))
    config = config_from_dict({"auth": {"htpasswd": htpasswd}, "upstreams": [ecr]})
    assert config.upstreams[0].access == "authenticated"
    public = config_from_dict({"upstreams": [{**ecr, "access": "public"}]})
    assert public.upstreams[0].access == "public"
    with pytest.raises(ConfigError, match=r"^upstreams\[0\].access: must be public or"):
        config_from_dict({"upstreams": [{**ecr, "access": "private"}]})


@pytest.mark.parametrize(
    ("accesses", "anonymous_ping"), [(["public", "authenticated"], 200), (["authenticated"], 401)]
)
async def test_the_ping_asks_for_a_login_only_when_nothing_is_public(
    aiohttp_client: AiohttpClient, tmp_path: Path, accesses: list[str], anonymous_ping: int
) -> None:
    upstreams = [
        {"name": f"u{i}", "url": f"http://127.0.0.1:{9 + i}", "prefix": f"u{i}", "access": a}
        for i, a in enumerate(accesses)
    ]
    config = config_from_dict(
        {
            "storage": {"path": str(tmp_path / "cache")},
            "auth": {"htpasswd": str(write_htpasswd(tmp_path / "htpasswd"))},
            "upstreams": [{**upstreams[0], "default": True}, *upstreams[1:]],
        }
    )
    mirror = await aiohttp_client(make_app(config))
    for authorization, status in [
        (None, anonymous_ping),
        (basic(":"), anonymous_ping),  # what containers/image sends without credentials
        (basic("alice:wrong"), 401),
        (basic(ALICE), 200),
    ]:
        headers = {"Authorization": authorization} if authorization else {}
        async with mirror.get("/v2/", headers=headers) as response:
            assert response.status == status, authorization
            assert response.headers["WWW-Authenticate"] == 'Basic realm="mirror"'


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture
def private(tmp_path: Path) -> Iterator[RegistryProcess]:
    with RegistryProcess(tmp_path / "private-upstream") as reg:
        yield reg


def write_config(
    tmp_path: Path, public: RegistryProcess, private: RegistryProcess, tls: str = ""
) -> Path:
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    path = tmp_path / "mirror.yaml"
    path.write_text(
        f"storage: {{path: {tmp_path / 'cache'}}}\n"
        f"auth: {{htpasswd: {htpasswd}}}\n"
        f"{tls}"
        "upstreams:\n"
        f"  - {{name: public, url: '{public.url}', default: true}}\n"
        f"  - {{name: private, url: '{private.url}', prefix: private, access: authenticated}}\n"
    )
    load_config(path)
    return path


async def get(url: str, authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Accept": OCI_MANIFEST}
    if authorization:
        headers["Authorization"] = authorization
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_access_control_end_to_end(
    registry: RegistryProcess,
    private: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
) -> None:
    public_image = await push_image(registry.url, "library/app", "1", [4096, 2048])
    secret = await push_image(private.url, "team/app", "1", [8192])
    mirror = start_mirror_process("--config", str(write_config(tmp_path, registry, private)))

    # The ping tells podman and skopeo to send credentials, while anonymous dockerd is fine.
    status, headers, _ = await get(f"{mirror.url}/v2/")
    assert (status, headers["WWW-Authenticate"]) == (200, 'Basic realm="mirror"')
    assert (await get(f"{mirror.url}/v2/", basic("alice:wrong")))[0] == 401

    # Public upstream: anonymous is fine, and credentials it does not know are ignored.
    await skopeo_copy_async(f"{mirror.host}/library/app:1", tmp_path / "public")
    assert dir_digests(tmp_path / "public") >= public_image.blob_digests()
    await skopeo_copy_async(
        f"{mirror.host}/library/app:1",
        tmp_path / "public2",
        extra_args=["--src-creds", "hub:token"],
    )

    # Authenticated upstream: 401 with a Basic challenge without credentials, or wrong ones.
    url = f"{mirror.url}/v2/private/team/app/manifests/1"
    status, headers, body = await get(url)
    assert (status, headers["WWW-Authenticate"]) == (401, 'Basic realm="mirror"')
    assert b'"UNAUTHORIZED"' in body
    with pytest.raises(AssertionError, match=r"(?i)unauthorized|401"):
        await skopeo_copy_async(f"{mirror.host}/private/team/app:1", tmp_path / "anon")
    with pytest.raises(AssertionError, match=r"(?i)unauthorized|401"):
        await skopeo_copy_async(
            f"{mirror.host}/private/team/app:1",
            tmp_path / "wrong",
            extra_args=["--src-creds", "alice:wrong"],
        )
    assert private.count("GET", "/team/app/") == 0  # nothing went upstream for them
    await skopeo_copy_async(
        f"{mirror.host}/private/team/app:1", tmp_path / "alice", extra_args=["--src-creds", ALICE]
    )
    assert dir_digests(tmp_path / "alice") >= secret.blob_digests()

    # Cached now, but only for the authenticated route: through the public one, the mirror
    # asks the public upstream (which has none of it) and serves nothing from its cache.
    [layer] = secret.layer_digests
    registry.reset_counts()
    for path in (f"library/app/blobs/{layer}", f"library/app/manifests/{secret.manifest_digest}"):
        status, _, body = await get(f"{mirror.url}/v2/{path}")
        assert status == 404, body
        status, _, body = await get(f"{mirror.url}/v2/{path}", basic(ALICE))
        assert status == 404, body  # the route decides, not who asks
    await registry.settle()
    assert registry.count("GET", layer) == 2

    # Once the public upstream has the same bytes, they come from there, and are public.
    status, _, data = await get(f"{mirror.url}/v2/private/team/app/blobs/{layer}", basic(ALICE))
    assert status == 200
    async with aiohttp.ClientSession() as session:
        await put_blob(session, registry.url, "library/app", layer, data)
    registry.reset_counts()
    for _ in range(2):
        status, _, body = await get(f"{mirror.url}/v2/library/app/blobs/{layer}")
        assert (status, body) == (200, data)
    await registry.settle()
    assert registry.count("GET", layer) == 1  # fetched once, then a hit


async def test_failed_logins_are_limited_per_address(
    registry: RegistryProcess,
    private: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
) -> None:
    mirror = start_mirror_process("--config", str(write_config(tmp_path, registry, private)))
    url = f"{mirror.url}/v2/private/team/app/manifests/1"
    statuses = [(await get(url, basic(f"alice:guess{n}")))[0] for n in range(access.MAX_FAILURES)]
    assert statuses == [401] * access.MAX_FAILURES
    status, headers, body = await get(url, basic(ALICE))
    assert (status, b"TOOMANYREQUESTS" in body, "Retry-After" in headers) == (429, True, True)


# --- HTTPS --------------------------------------------------------------------------------


def write_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    cert = directory / "cert.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key_path


async def test_https_with_a_certificate_skopeo_trusts(
    registry: RegistryProcess,
    private: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
) -> None:
    cert, key = write_certificate(tmp_path / "tls")
    secret = await push_image(private.url, "team/app", "1", [8192])
    config = write_config(tmp_path, registry, private, f"tls: {{cert: {cert}, key: {key}}}\n")
    mirror = start_mirror_process("--config", str(config), ca=cert)
    assert mirror.url.startswith("https://")

    certs = tmp_path / "certs.d"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(cert.read_bytes())
    verified = ["--src-tls-verify=true", "--src-cert-dir", str(certs)]
    await skopeo_copy_async(
        f"{mirror.host}/private/team/app:1",
        tmp_path / "pulled",
        extra_args=[*verified, "--src-creds", ALICE],
    )
    assert dir_digests(tmp_path / "pulled") >= secret.blob_digests()
    # Again, from the cache: hits go out through TLS too (read and encrypted, no sendfile).
    private.reset_counts()
    await skopeo_copy_async(
        f"{mirror.host}/private/team/app:1",
        tmp_path / "again",
        extra_args=[*verified, "--src-creds", ALICE],
    )
    assert dir_digests(tmp_path / "again") >= secret.blob_digests()
    await private.settle()
    assert private.count("GET", "/blobs/") == 0
    # Without the CA, verification fails: it is a real TLS check.
    with pytest.raises(AssertionError, match=r"(?i)certificate"):
        await skopeo_copy_async(
            f"{mirror.host}/private/team/app:1",
            tmp_path / "untrusted",
            extra_args=["--src-tls-verify=true", "--src-creds", ALICE],
        )


def test_tls_with_worker_processes_is_a_config_error(tmp_path: Path) -> None:
    """A TLS connection cannot be handed from a worker to the primary process."""
    cert, key = write_certificate(tmp_path / "tls")
    with pytest.raises(ConfigError, match=r"^workers: more than 1 needs plain HTTP") as caught:
        config_from_dict({"tls": {"cert": str(cert), "key": str(key)}, "workers": 2})
    assert caught.value.key == "workers"
    tls = config_from_dict({"tls": {"cert": str(cert), "key": str(key)}})
    with pytest.raises(ConfigError, match=r"^--workers: more than 1"):
        with_overrides(tls, workers="2")


def test_a_bad_certificate_is_a_config_error(tmp_path: Path) -> None:
    cert, key = write_certificate(tmp_path / "tls")
    _, other_key = write_certificate(tmp_path / "other")
    for tls, key_path in [
        ({"cert": str(tmp_path / "missing.pem"), "key": str(key)}, "tls.cert"),
        ({"cert": str(cert), "key": str(other_key)}, "tls.cert"),
        ({"cert": str(cert)}, "tls.key"),
    ]:
        with pytest.raises(ConfigError) as caught:
            config_from_dict({"tls": tls})
        assert caught.value.key == key_path, caught.value
