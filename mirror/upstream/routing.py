"""Which upstream a request is for, and the repository name that upstream knows it by.

In order: containerd's `?ns=<registry host>` names the upstream listing that host; else a
leading path prefix (`/v2/<prefix>/<repo>/...`, what a podman mirror location such as
`mirror:5000/ecr` sends) names the upstream with that prefix, and is stripped; else the
default upstream. On a Docker Hub upstream a single-name repository lives under
`library/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mirror.config import UpstreamConfig
from mirror.errors import NameUnknown


@dataclass(frozen=True)
class Route:
    upstream: UpstreamConfig
    repository: str  # as the upstream knows it
    namespace: str | None  # the `ns` that chose the upstream, echoed as OCI-Namespace


class Router:
    def __init__(self, upstreams: Sequence[UpstreamConfig]) -> None:
        self._by_host = {host: u for u in upstreams for host in u.hosts}
        # Longest first, so `a/b` wins over `a` for `a/b/c`.
        self._by_prefix = sorted(
            ((u.prefix, u) for u in upstreams if u.prefix), key=lambda p: -len(p[0])
        )
        self._default = next(u for u in upstreams if u.default)

    def route(self, name: str, namespace: str | None = None) -> Route:
        """`name` is a valid repository name as the client sent it."""
        if namespace is not None:
            upstream = self._by_host.get(namespace.lower())
            if upstream is None:
                raise NameUnknown(
                    f"no upstream of this mirror serves registry {namespace!r} (ns={namespace})"
                )
            return Route(upstream, _upstream_name(upstream, name), namespace)
        for prefix, upstream in self._by_prefix:
            if name.startswith(prefix + "/"):
                return Route(upstream, _upstream_name(upstream, name[len(prefix) + 1 :]), None)
        return Route(self._default, _upstream_name(self._default, name), None)


def _upstream_name(upstream: UpstreamConfig, repository: str) -> str:
    if upstream.docker_hub and "/" not in repository:
        return f"library/{repository}"
    return repository
