"""Which upstream and which repository a request is for.

In order: the `ns=<registry>` query parameter (containerd, dockerd with the
containerd store); a first path component naming an upstream, as in
`/v2/docker.io/library/alpine/...` (CRI-O and podman mirrors); otherwise the
default upstream (dockerd `registry-mirrors`). Only configured upstreams can
ever be chosen: an `ns` or a host-like prefix that names none is NAME_UNKNOWN
before any connection is made. For Docker Hub a one-component name `x` is
`library/x` upstream. A repository the upstream's policy does not allow is
DENIED here, before any cache or upstream work. An `ns` that is not a registry
host (`host[:port]`, `[v6]:port`) is NAME_INVALID: it is echoed back as
`OCI-Namespace`, so nothing else may pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mirror.errors import Denied, NameInvalid, NameUnknown
from mirror.oci import validate_name
from mirror.policy import UpstreamPolicy


@dataclass(frozen=True, slots=True)
class UpstreamNames:
    """How clients may name one upstream."""

    name: str
    aliases: tuple[str, ...] = ()
    docker_hub: bool = False
    policy: UpstreamPolicy | None = None


@dataclass(frozen=True, slots=True)
class Route:
    upstream: str  # the configured upstream's name
    repository: str  # the repository's name on the upstream
    client_name: str  # the name as it appeared in the request path
    namespace: str | None = None  # the `ns` the client sent, echoed as OCI-Namespace


_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_REGISTRY_HOST_RE = re.compile(
    rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?|\[[0-9A-Fa-f:.]{{2,45}}\])(?::[0-9]{{1,5}})?"
)
HOST_MAX_LENGTH = 255


def is_registry_host(text: str) -> bool:
    """A registry as clients name it in `ns=`: a DNS name or [IPv6], with an optional port."""
    return (
        len(text) <= HOST_MAX_LENGTH
        and text.isascii()
        and _REGISTRY_HOST_RE.fullmatch(text) is not None
    )


def _looks_like_host(component: str) -> bool:
    # Docker's own rule for telling a registry host from a repository component.
    return "." in component or ":" in component or component == "localhost"


class Router:
    """Maps a request's name and `ns` to a configured upstream."""

    def __init__(self, upstreams: Iterable[UpstreamNames], default: str | None):
        self._by_name: dict[str, UpstreamNames] = {}
        for upstream in upstreams:
            for key in (upstream.name, *upstream.aliases):
                self._by_name[key.lower()] = upstream
        self._default = self._by_name.get(default.lower()) if default else None

    def _lookup(self, key: str) -> UpstreamNames | None:
        return self._by_name.get(key.lower())

    def resolve(self, name: str, namespace: str | None = None) -> Route:
        validate_name(name)
        if namespace is not None:
            if not is_registry_host(namespace):
                raise NameInvalid(
                    "ns must name a registry host", detail={"ns": namespace[:HOST_MAX_LENGTH]}
                )
            upstream = self._lookup(namespace)
            if upstream is None:
                raise NameUnknown(
                    "no upstream is configured for this registry", detail={"ns": namespace[:255]}
                )
            # A client given a path-prefixed mirror URL may send ns too: one name, not two.
            # (Only a registry-like prefix: "private/app" stays a repository name.)
            head, sep, rest = name.partition("/")
            if sep and _looks_like_host(head) and self._lookup(head) is upstream:
                name = rest
            return self._route(upstream, name, name, namespace)
        head, sep, rest = name.partition("/")
        if sep:
            upstream = self._lookup(head)
            if upstream is not None:
                return self._route(upstream, rest, name, None)
            if _looks_like_host(head):
                raise NameUnknown(
                    "no upstream is configured for this registry", detail={"registry": head}
                )
        if self._default is None:
            raise NameUnknown(
                "no default upstream: name the registry with ?ns= or a path prefix",
                detail={"name": name},
            )
        return self._route(self._default, name, name, None)

    @staticmethod
    def _route(
        upstream: UpstreamNames, repository: str, client_name: str, namespace: str | None
    ) -> Route:
        if upstream.docker_hub and "/" not in repository:
            repository = f"library/{repository}"
        if upstream.policy is not None and not upstream.policy.allows(repository):
            raise Denied(
                "this mirror's policy does not allow this repository",
                detail={"upstream": upstream.name, "repository": repository},
            )
        return Route(upstream.name, repository, client_name, namespace)
