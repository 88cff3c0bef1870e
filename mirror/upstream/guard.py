"""Where an upstream may send the mirror: the rule for token realms and redirects.

An upstream names other URLs: the token realm of its Bearer challenge, the target of
a redirect. Each one is checked before any connection to it is made:
- every address its host resolves to is no more internal than the upstream's own
  (`netguard.Reach`: public < private < loopback), and none is SPECIAL (link-local,
  where cloud metadata endpoints live, and the like), whatever the upstream's own;
- credentials (Basic to a realm) never travel over plain HTTP to another host than an
  upstream configured as http://.
A refusal is a warning `upstream_target_refused` and `UpstreamTargetRefused` (502).

A local registry stays a legitimate upstream: its own realm and redirects on
addresses as internal as its own keep working.

DNS rebinding is closed by making the check the session's resolver
(`GuardedResolver`): a name resolves once per `RESOLVE_TTL` and the connection goes to
exactly the addresses that were checked, even if the name answers otherwise a moment
later. Literal addresses, which aiohttp never hands to a resolver, are classified as
they are. Because aiohttp's resolver hears only a host name, and the rule depends on
which upstream named it, each upstream has its own session (`UpstreamNetwork`).

`NetworkOverrides` is the seam for tests: a static host table in place of DNS, and a
reach to assume for an upstream (a loopback fake declared "public").
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from mirror.concurrency import SingleFlight
from mirror.errors import UpstreamBadResponse, UpstreamTargetRefused, UpstreamUnavailable
from mirror.upstream.netguard import Reach, classify_text, parse_address

log = structlog.get_logger(__name__)

RESOLVE_TTL = 60.0
RESOLVE_CACHE_MAX = 1024
CONNECTION_LIMIT = 256
CONNECTION_LIMIT_PER_HOST = 64
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV

TargetKind = Literal["realm", "redirect", "upstream"]
_PHRASES: dict[TargetKind, str] = {
    "realm": "token realm",
    "redirect": "redirect",
    "upstream": "own host",
}


class TargetRefusedError(OSError):
    """The resolver's refusal. An OSError so that aiohttp carries it out of a request
    as `ClientConnectorDNSError.os_error` instead of as a foreign exception."""

    def __init__(self, host: str, reason: str, *, own: bool = False):
        super().__init__(reason)
        self.host = host
        self.reason = reason
        self.own = own  # the configured upstream itself, not a host it named


@dataclass(frozen=True, slots=True)
class NetworkOverrides:
    """What the network looks like, for tests that may reach nothing but loopback.

    `hosts` answers names (lower-case) with fixed addresses instead of DNS; `reach`
    declares an upstream (by name) to be that internal whatever its addresses are;
    `trace_configs` lets a test see every request the upstream sessions start.
    """

    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    reach: Mapping[str, Reach] = field(default_factory=dict)
    trace_configs: tuple[aiohttp.TraceConfig, ...] = ()


def _results(host: str, port: int, addresses: list[str]) -> list[ResolveResult]:
    return [
        {
            "hostname": host,
            "host": address,
            "port": port,
            "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
            "proto": 0,
            "flags": _NUMERIC,
        }
        for address in addresses
    ]


class StaticHostsResolver(AbstractResolver):
    """Names from a fixed table; any other name from `fallback`."""

    def __init__(self, hosts: Mapping[str, tuple[str, ...]], fallback: AbstractResolver):
        self._hosts = {name.lower().rstrip("."): tuple(found) for name, found in hosts.items()}
        self._fallback = fallback

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = self._hosts.get(host.lower().rstrip("."))
        if found is None:
            return await self._fallback.resolve(host, port, family)
        wanted = [
            address
            for address in found
            if family == socket.AF_UNSPEC or (family == socket.AF_INET6) == (":" in address)
        ]
        if not wanted:
            raise OSError(f"no {family.name} address for the host")
        return _results(host, port, wanted)

    async def close(self) -> None:
        await self._fallback.close()


class GuardedResolver(AbstractResolver):
    """One upstream session's resolver: it answers only with addresses the rule admits."""

    def __init__(
        self,
        upstream_url: str,
        inner: AbstractResolver,
        declared: Reach | None = None,
        *,
        ttl: float = RESOLVE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ):
        parts = urlsplit(upstream_url)
        self.own_host = (parts.hostname or "").lower()
        self._own_port = parts.port or (443 if parts.scheme == "https" else 80)
        self._own_literal = parse_address(self.own_host) is not None
        self._inner = inner
        self._declared = declared
        self._ttl = ttl
        self._clock = clock
        self._answers: dict[tuple[str, int, int], tuple[float, list[ResolveResult]]] = {}
        self._inflight: SingleFlight[tuple[str, int, int], list[ResolveResult]] = SingleFlight()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._lookup(host.lower(), port, family)
        await self.admit(host, port, [result["host"] for result in results])
        return results

    def is_own(self, host: str, port: int) -> bool:
        """The configured upstream itself (another port on its host is ranked instead:
        an equal rank passes, and a test may declare the upstream more public)."""
        return host.lower() == self.own_host and port == self._own_port

    async def admit(self, host: str, port: int, addresses: list[str]) -> None:
        """Raise `TargetRefusedError` unless every address may be connected to."""
        host = host.lower()
        if self.is_own(host, port):
            # Named as an address, the upstream is the operator's word; named as a
            # host, its DNS must not lead to a metadata endpoint either.
            if not self._own_literal:
                for address in addresses:
                    if classify_text(address) is Reach.SPECIAL:
                        raise TargetRefusedError(
                            host, "resolves to a special-purpose address", own=True
                        )
            return
        ceiling = await self.own_reach()
        for address in addresses:
            reach = classify_text(address)
            if reach is Reach.SPECIAL:
                raise TargetRefusedError(host, "resolves to a special-purpose address")
            if reach > ceiling:
                raise TargetRefusedError(
                    host,
                    f"resolves to a {reach.name.lower()} address,"
                    f" more internal than the upstream's own ({ceiling.name.lower()})",
                )

    async def own_reach(self) -> Reach:
        """The most internal of the upstream's own addresses (special ones aside)."""
        if self._declared is not None:
            return self._declared
        if self._own_literal:
            addresses = [self.own_host]
        else:
            results = await self._lookup(self.own_host, self._own_port, socket.AF_UNSPEC)
            addresses = [result["host"] for result in results]
        usable = [r for r in map(classify_text, addresses) if r is not Reach.SPECIAL]
        return max(usable, default=Reach.PUBLIC)

    async def _lookup(self, host: str, port: int, family: int) -> list[ResolveResult]:
        key = (host, port, family)
        now = self._clock()
        cached = self._answers.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]

        async def ask() -> list[ResolveResult]:
            results = await self._inner.resolve(host, port, socket.AddressFamily(family))
            self._remember(key, results)
            return results

        return await self._inflight.run(key, ask)

    def _remember(self, key: tuple[str, int, int], results: list[ResolveResult]) -> None:
        now = self._clock()
        if len(self._answers) >= RESOLVE_CACHE_MAX:
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
            if len(self._answers) >= RESOLVE_CACHE_MAX:
                self._answers.clear()  # an upstream naming endless hosts gets no cache
        self._answers[key] = (now + self._ttl, results)

    async def close(self) -> None:
        await self._inflight.close()
        await self._inner.close()


class TargetGuard:
    """Checks the realms and redirects one upstream names, before any connection."""

    def __init__(self, upstream: str, upstream_url: str, resolver: GuardedResolver):
        self._upstream = upstream
        parts = urlsplit(upstream_url)
        self._own_host = (parts.hostname or "").lower()
        self._own_plain = parts.scheme == "http"
        self._resolver = resolver

    async def check(self, kind: TargetKind, url: str) -> None:
        """Refuse `url` unless every address it leads to is allowed."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise UpstreamBadResponse(
                f"upstream named a {kind} with an invalid port", detail={"upstream": self._upstream}
            ) from None
        if not host:
            raise self.refused(kind, TargetRefusedError(host, "names no host"))
        try:
            if parse_address(host) is not None:
                await self._resolver.admit(host, port, [host])
            else:
                await self._resolver.resolve(host, port, socket.AF_UNSPEC)
        except TargetRefusedError as exc:
            raise self.refused(kind, exc) from None
        except OSError as exc:
            raise UpstreamUnavailable(
                f"upstream {kind} host cannot be resolved",
                detail={"upstream": self._upstream, "host": host},
            ) from exc

    def check_credentials(self, kind: TargetKind, url: str) -> None:
        """Refuse to send credentials to `url` over plain HTTP, unless it is the host of
        an upstream configured as http:// (the operator chose that)."""
        parts = urlsplit(url)
        if parts.scheme != "http":
            return
        host = (parts.hostname or "").lower()
        if self._own_plain and host == self._own_host:
            return
        raise self.refused(
            kind, TargetRefusedError(host, "would receive credentials over plain HTTP")
        )

    def refusal_of(
        self, exc: aiohttp.ClientConnectorError, kind: TargetKind | None = None
    ) -> UpstreamTargetRefused | None:
        """The refusal a failed connection carries, if the resolver refused it. Without
        `kind`, a host other than the upstream's own was a redirect's."""
        inner = exc.os_error
        if not isinstance(inner, TargetRefusedError):
            return None
        if kind is None:
            kind = "upstream" if inner.own else "redirect"
        return self.refused(kind, inner)

    def refused(self, kind: TargetKind, exc: TargetRefusedError) -> UpstreamTargetRefused:
        log.warning(
            "upstream_target_refused",
            upstream=self._upstream,
            kind=kind,
            target_host=exc.host,
            reason=exc.reason,
        )
        # The host and the reason only: a realm's or redirect's path and query may carry
        # signatures, and internal URL details are none of the client's business.
        return UpstreamTargetRefused(
            f"refused the upstream's {_PHRASES[kind]}: {exc.host or 'its URL'} {exc.reason}",
            detail={"upstream": self._upstream, "kind": kind, "host": exc.host},
        )


class UpstreamNetwork:
    """One upstream's way out: its session, whose resolver is its guard."""

    def __init__(self, name: str, url: str, overrides: NetworkOverrides | None = None):
        overrides = overrides or NetworkOverrides()
        inner: AbstractResolver = DefaultResolver()
        if overrides.hosts:
            inner = StaticHostsResolver(overrides.hosts, inner)
        self.resolver = GuardedResolver(url, inner, overrides.reach.get(name))
        self.guard = TargetGuard(name, url, self.resolver)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=CONNECTION_LIMIT,
                limit_per_host=CONNECTION_LIMIT_PER_HOST,
                # The resolver keeps the only cache, so what was checked is what is used.
                use_dns_cache=False,
                resolver=self.resolver,
            ),
            auto_decompress=False,
            trust_env=False,
            trace_configs=list(overrides.trace_configs) or None,
        )

    async def close(self) -> None:
        await self.session.close()
        await self.resolver.close()
