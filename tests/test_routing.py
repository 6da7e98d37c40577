"""Which upstream a request reaches: `?ns=`, a path prefix, or the default; `library/`."""

from __future__ import annotations

import pytest

from mirror.config import config_from_dict
from mirror.errors import NameUnknown
from mirror.upstream.routing import Router

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
