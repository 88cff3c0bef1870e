"""What `metadata.redis_url` may say, and the redis-py client each form opens.

Two shapes:

    redis://[[user]:password@]host[:port][/db]        one server (also rediss://, unix://)
    redis+sentinel://[[user]:password@]host[:port][,host2[:port]...]/service[/db]
        [?sentinel_password=...]                      a Sentinel-managed primary

With Sentinel the mirror asks the sentinels (port 26379 unless given) where the primary
of `service` is, and asks again whenever a connection to it breaks, so a failover needs
no restart. The user and password are the data nodes'; `sentinel_password` is the
sentinels' own (`requirepass` in sentinel.conf), and they often differ.

`parse_redis_url` runs at config load: its errors name what is wrong and never repeat a
password. `open_redis` is the one place that turns a URL into a client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
_PLAIN_SCHEMES = frozenset({"redis", "rediss", "unix"})
# Sentinel master names are free text in sentinel.conf; keep to what a URL path holds
# without escaping, which is every name seen in practice.
_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class PlainRedisURL:
    """One Redis server; redis-py parses the URL itself."""

    url: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SentinelRedisURL:
    """The primary of `service_name`, as the sentinels report it."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


RedisURL = PlainRedisURL | SentinelRedisURL


def parse_redis_url(url: str) -> RedisURL:
    """The URL's form, checked; `ValueError` says what is wrong (never with a password)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("expected redis://, rediss://, unix:// or redis+sentinel:// URL")
    scheme = scheme.lower()
    if scheme in _PLAIN_SCHEMES:
        return _plain(url)
    if scheme != SENTINEL_SCHEME:
        raise ValueError(
            f"unsupported scheme {scheme!r}: expected redis, rediss, unix or redis+sentinel"
        )
    return _sentinel(rest)


def _plain(url: str) -> PlainRedisURL:
    # Parsing here only so that a typo stops start-up rather than the first command.
    # redis is imported where a client is made (as core.py does): config loading, which
    # runs this check, should not pay for it.
    from redis.asyncio.connection import parse_url

    # redis-py's messages name the query parameter or the port, never the password.
    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"not a valid Redis URL: {exc}") from None
    return PlainRedisURL(url)


def _sentinel(rest: str) -> SentinelRedisURL:
    location, _, query = rest.partition("?")
    if "#" in location or "#" in query:
        raise ValueError("a redis+sentinel URL has no fragment")
    netloc, slash, path = location.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    username, password = _userinfo(userinfo) if at else (None, None)
    sentinels = tuple(_host_port(item) for item in hosts.split(","))
    parts = path.split("/") if slash else []
    if parts and parts[-1] == "":
        parts.pop()  # one trailing slash is harmless
    if not parts or not parts[0]:
        raise ValueError("redis+sentinel URL needs the service name: .../service_name[/db]")
    if len(parts) > 2:
        raise ValueError("redis+sentinel URL path is /service_name[/db]")
    service = unquote(parts[0])
    if not _SERVICE_RE.fullmatch(service):
        raise ValueError(f"service name {service!r} is not a Sentinel master name")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"database {parts[1]!r} is not a non-negative integer")
        db = int(parts[1])
    return SentinelRedisURL(
        sentinels=sentinels,
        service_name=service,
        db=db,
        username=username,
        password=password,
        sentinel_password=_sentinel_password(query),
    )


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None, unquote(password) if colon and password else None)


def _host_port(item: str) -> tuple[str, int]:
    if not item:
        raise ValueError("redis+sentinel URL lists an empty sentinel address")
    if item.startswith("["):
        host, bracket, tail = item[1:].partition("]")
        if not bracket or not host or (tail and not tail.startswith(":")):
            raise ValueError(f"sentinel address {item!r} is not [v6]:port")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = item.partition(":")
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"sentinel host {host!r} is not a host name or address")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"sentinel port {port_text!r} is not a port number")
    return host, int(port_text)


def _sentinel_password(query: str) -> str | None:
    if not query:
        return None
    # strict_parsing would reject "a=1&" too; a blank value is no password.
    values = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(values) - {"sentinel_password"})
    if unknown:
        raise ValueError(f"unknown redis+sentinel URL parameter {unknown[0]!r}")
    given = values.get("sentinel_password", [])
    if len(given) > 1:
        raise ValueError("sentinel_password is given more than once")
    return (given[0] or None) if given else None


@dataclass(frozen=True, slots=True)
class RedisHandle:
    """The data client, and with Sentinel the sentinels' clients, which it does not own."""

    client: aioredis.Redis
    sentinel: Sentinel | None = None

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()


def open_redis(url: str, **options: Any) -> RedisHandle:
    """A client for `url`. `options` (timeouts, health checks) apply to the data
    connections; with Sentinel the socket ones apply to the sentinel connections too."""
    import redis.asyncio as aioredis
    from redis.asyncio.sentinel import Sentinel

    parsed = parse_redis_url(url)
    if isinstance(parsed, PlainRedisURL):
        return RedisHandle(aioredis.Redis.from_url(parsed.url, **options))
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    if parsed.sentinel_password is not None:
        sentinel_options["password"] = parsed.sentinel_password
    # Older redis-py releases leave Sentinel.__init__ unannotated; calling it through Any
    # type-checks the same on every release we accept.
    sentinel_class: Any = Sentinel
    sentinel: Sentinel = sentinel_class(
        list(parsed.sentinels), sentinel_kwargs=sentinel_options, **options
    )
    client: aioredis.Redis = sentinel.master_for(
        parsed.service_name,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        # A PING on every new connection: after a failover the first command on a fresh
        # connection then meets a promoted primary, not a half-open socket.
        check_connection=True,
    )
    return RedisHandle(client, sentinel)
