"""Which upstream a request reaches: `?ns=`, a path prefix, or the default; `library/`."""

from __future__ import annotations

import pytest

from mirror.config import config_from_dict
from mirror.errors import NameUnknown
from mirror.routing import Router, forwarded

CONFIG = config_from_dict(
    {
        "upstreams": [
            {"name": "hub", "url": "https://registry-1.docker.io", "default": True},
            {"name": "ghcr", "url": "https://ghcr.io", "prefix": "ghcr"},
            {
                "name": "ecr",
                "url": "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                "prefix": "ecr",
                "auth": {"type": "ecr"},
                "access": "public",
            },
            {"name": "deep", "url": "http://127.0.0.1:5001", "prefix": "ecr/deep"},
            {"name": "quay", "url": "https://quay.io", "hosts": ["quay.io", "Mirror.Example:8443"]},
        ]
    }
)
ROUTER = Router(CONFIG.upstreams)


@pytest.mark.parametrize(
    ("name", "ns", "upstream", "repository"),
    [
        # The default upstream, Docker Hub: single names live under library/.
        ("alpine", None, "hub", "library/alpine"),
        ("library/alpine", None, "hub", "library/alpine"),
        ("bitnami/redis", None, "hub", "bitnami/redis"),
        # containerd's ns names the registry; the name is passed as is.
        ("library/alpine", "docker.io", "hub", "library/alpine"),
        ("alpine", "index.docker.io", "hub", "library/alpine"),
        ("alpine", "registry-1.docker.io", "hub", "library/alpine"),
        ("owner/app", "ghcr.io", "ghcr", "owner/app"),
        ("app", "ghcr.io", "ghcr", "app"),  # no library/ outside Docker Hub
        ("team/app", "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "ecr", "team/app"),
        ("org/x", "QUAY.IO", "quay", "org/x"),  # host names compare case-insensitively
        ("org/x", "mirror.example:8443", "quay", "org/x"),
        # ns wins over a prefix: the name is the upstream's own.
        ("ghcr/owner/app", "docker.io", "hub", "ghcr/owner/app"),
        # A path prefix, stripped before going upstream.
        ("ghcr/owner/app", None, "ghcr", "owner/app"),
        ("ecr/team/app", None, "ecr", "team/app"),
        ("ecr/app", None, "ecr", "app"),
        ("ecr/deep/app", None, "deep", "app"),  # the longest prefix wins
        ("ecr/deeper/app", None, "ecr", "deeper/app"),  # whole path segments only
        ("ghcr", None, "hub", "library/ghcr"),  # a prefix alone is no repository of it
        ("ghcrx/app", None, "hub", "ghcrx/app"),
    ],
)
def test_route(name: str, ns: str | None, upstream: str, repository: str) -> None:
    route = ROUTER.route(name, ns)
    assert (route.upstream.name, route.repository) == (upstream, repository)
    assert route.namespace == ns


def test_unknown_namespace_names_the_host() -> None:
    with pytest.raises(NameUnknown, match=r"'gcr\.io'"):
        ROUTER.route("library/alpine", "gcr.io")


def test_hosts_default_from_the_url() -> None:
    hosts = {u.name: u.hosts for u in CONFIG.upstreams}
    assert hosts["hub"] == ("docker.io", "index.docker.io", "registry-1.docker.io")
    assert hosts["ghcr"] == ("ghcr.io",)
    assert hosts["deep"] == ("127.0.0.1:5001",)
    assert hosts["quay"] == ("quay.io", "mirror.example:8443")


def test_ecr_region_and_registry_come_from_the_host() -> None:
    ecr = next(u for u in CONFIG.upstreams if u.name == "ecr")
    assert (ecr.auth.type, ecr.auth.region, ecr.auth.registry_id) == (
        "ecr",
        "eu-west-1",
        "123456789012",
    )


CHAINED = config_from_dict(
    {
        "upstreams": [
            {"name": "regional", "url": "http://regional:5000", "type": "mirror", "default": True},
            {"name": "local", "url": "http://10.0.0.9:5000", "hosts": ["registry.lan"]},
        ]
    }
)
CHAINED_ROUTER = Router(CHAINED.upstreams)


@pytest.mark.parametrize(
    ("name", "ns", "upstream", "repository"),
    [
        # A host no other upstream lists goes to the mirror, named with its host there.
        ("library/alpine", "docker.io", "regional", "docker.io/library/alpine"),
        ("alpine", "docker.io", "regional", "docker.io/alpine"),  # library/: the last hop's
        ("owner/app", "GHCR.io", "regional", "ghcr.io/owner/app"),
        ("team/app", "127.0.0.1:5001", "regional", "127.0.0.1:5001/team/app"),
        ("app", "localhost:5000", "regional", "localhost:5000/app"),
        ("my.org/app", "ghcr.io", "regional", "ghcr.io/my.org/app"),
        # One another upstream lists stays there.
        ("team/app", "registry.lan", "local", "team/app"),
        # No ns: the name as sent, to the default (the mirror here).
        ("library/alpine", None, "regional", "library/alpine"),
        ("alpine", None, "regional", "alpine"),
        ("ghcr.io/owner/app", None, "regional", "ghcr.io/owner/app"),
    ],
)
def test_route_to_a_mirror(name: str, ns: str | None, upstream: str, repository: str) -> None:
    route = CHAINED_ROUTER.route(name, ns)
    assert (route.upstream.name, route.repository, route.namespace) == (upstream, repository, ns)


@pytest.mark.parametrize("ns", ["registry", "ghcr.io/x", "a b.io", "ghcr.io?x=1", ""])
def test_a_mirror_is_sent_registry_hosts_only(ns: str) -> None:
    """An ns that is no registry host by Docker's rule could not be told from the name."""
    with pytest.raises(NameUnknown, match="no upstream of this mirror serves"):
        CHAINED_ROUTER.route("app", ns)


@pytest.mark.parametrize(
    ("repository", "ns", "name"),
    [
        ("docker.io/library/alpine", "docker.io", "library/alpine"),
        ("127.0.0.1:5001/team/app", "127.0.0.1:5001", "team/app"),
        ("[::1]:5000/app", "[::1]:5000", "app"),
        ("localhost/app", "localhost", "app"),
        ("ghcr.io/my.org/app", "ghcr.io", "my.org/app"),
        ("library/alpine", None, "library/alpine"),
        ("alpine", None, "alpine"),
        ("ghcr.io", None, "ghcr.io"),  # a repository of that name, not a host alone
        ("b/team/app", None, "b/team/app"),
    ],
)
def test_forwarded(repository: str, ns: str | None, name: str) -> None:
    assert forwarded(repository) == (ns, name)


def test_every_route_to_a_mirror_is_forwarded_with_its_ns() -> None:
    for host in ("docker.io", "ghcr.io", "127.0.0.1:5001", "[::1]:5000", "localhost"):
        route = CHAINED_ROUTER.route("team/app", host)
        assert forwarded(route.repository) == (host, "team/app")


def test_a_mirror_lists_no_hosts_and_serves_pins_of_any() -> None:
    config = config_from_dict(
        {
            "upstreams": [{"name": "regional", "url": "http://regional:5000", "type": "mirror"}],
            "pins": ["quay.io/org/app:1", "docker.io/library/alpine:3"],
        }
    )
    (regional,) = config.upstreams
    assert (regional.type, regional.hosts, regional.default, regional.docker_hub) == (
        "mirror",
        (),
        True,
        False,
    )
    routes = [Router(config.upstreams).route(p.repository, p.host) for p in config.pins]
    assert [r.repository for r in routes] == ["quay.io/org/app", "docker.io/library/alpine"]
