"""Which upstream a request is for, and the repository name that upstream knows it by.

In order: containerd's `?ns=<registry host>` names the upstream listing that host, else
the upstream of type mirror, if there is one; else a leading path prefix
(`/v2/<prefix>/<repo>/...`, what a podman mirror location such as `mirror:5000/ecr`
sends) names the upstream with that prefix, and is stripped; else the default upstream.
On a Docker Hub upstream a single-name repository lives under `library/`.

An upstream of type mirror is another mirror (a regional one), which must learn the
registry too. Its repositories are named `<registry host>/<name>` here, as images are
(`ghcr.io/owner/app`), and asked for as `/v2/<name>/...?ns=<registry host>`
(`forwarded`); so two registries' `app:1` are two tags in the cache. A name reaching it
without ns keeps its first component as it is, and goes with an ns only if that
component is a registry host by Docker's rule (`mirror:5000/ghcr.io/...`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mirror.config import UpstreamConfig
from mirror.errors import NameUnknown
from mirror.reference import is_registry_host


@dataclass(frozen=True)
class Route:
    upstream: UpstreamConfig
    repository: str  # as the upstream knows it; behind a mirror, with the registry host
    namespace: str | None  # the `ns` that chose the upstream, echoed as OCI-Namespace


class Router:
    def __init__(self, upstreams: Sequence[UpstreamConfig]) -> None:
        self._by_host = {host: u for u in upstreams for host in u.hosts}
        # Longest first, so `a/b` wins over `a` for `a/b/c`.
        self._by_prefix = sorted(
            ((u.prefix, u) for u in upstreams if u.prefix), key=lambda p: -len(p[0])
        )
        self._default = next(u for u in upstreams if u.default)
        self._mirror = next((u for u in upstreams if u.type == "mirror"), None)

    def route(self, name: str, namespace: str | None = None) -> Route:
        """`name` is a valid repository name as the client sent it."""
        if namespace is not None:
            return self._by_namespace(name, namespace)
        for prefix, upstream in self._by_prefix:
            if name.startswith(prefix + "/"):
                return Route(upstream, _upstream_name(upstream, name[len(prefix) + 1 :]), None)
        return Route(self._default, _upstream_name(self._default, name), None)

    def _by_namespace(self, name: str, namespace: str) -> Route:
        host = namespace.lower()
        upstream = self._by_host.get(host)
        if upstream is not None:
            return Route(upstream, _upstream_name(upstream, name), namespace)
        if self._mirror is not None and is_registry_host(host):
            return Route(self._mirror, f"{host}/{name}", namespace)
        raise NameUnknown(
            f"no upstream of this mirror serves registry {namespace!r} (ns={namespace})"
        )


def forwarded(repository: str) -> tuple[str | None, str]:
    """How an upstream of type mirror is asked for one of its repositories: the registry
    host it begins with (sent as `ns`, None if it begins with none), and the name."""
    first, slash, rest = repository.partition("/")
    if slash and is_registry_host(first):
        return first, rest
    return None, repository


def _upstream_name(upstream: UpstreamConfig, repository: str) -> str:
    if upstream.docker_hub and "/" not in repository:
        return f"library/{repository}"
    return repository
