"""Where upstream tokens are kept: this process's memory, and optionally Redis.

With the Redis metadata backend the token cache is shared, so a fleet of mirrors asks
an upstream's token server once per scope and lifetime, not once per process. Memory
is always consulted first (no round trip on the hot path), and a Redis that cannot be
reached only costs the sharing: tokens are then fetched and kept locally.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import structlog
from aiocache import RedisCache, SimpleMemoryCache
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

# Memory copies of shared tokens live at most this long, so a token refreshed by another
# process after a 401 reaches this one soon.
LOCAL_TTL_CAP = 60.0


class TokenCache:
    def __init__(self, shared: Any | None = None):
        self._local = SimpleMemoryCache()
        self._shared = shared

    @classmethod
    def for_redis(cls, redis_url: str, prefix: str) -> TokenCache:
        parts = urlsplit(redis_url)
        database = parts.path.strip("/") or "0"
        shared = RedisCache(
            endpoint=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(database) if database.isdigit() else 0,
            password=parts.password,
            ssl=parts.scheme == "rediss",
            namespace=f"{prefix}token:",
            create_connection_timeout=2,
        )
        return cls(shared)

    async def get(self, key: str) -> str | None:
        value = await self._local.get(key)
        if value is not None or self._shared is None:
            return None if value is None else str(value)
        try:
            shared = await self._shared.get(key)
            remaining = (
                await self._shared.raw("ttl", self._shared.build_key(key)) if shared else None
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("token_cache_shared_unavailable", error=repr(exc))
            return None
        if shared is None:
            return None
        text = shared.decode() if isinstance(shared, bytes) else str(shared)
        ttl = (
            min(float(remaining), LOCAL_TTL_CAP)
            if isinstance(remaining, int) and remaining > 0
            else 1.0
        )
        await self._local.set(key, text, ttl=ttl)
        return text

    async def set(self, key: str, token: str, ttl: float) -> None:
        await self._local.set(key, token, ttl=min(ttl, LOCAL_TTL_CAP) if self._shared else ttl)
        if self._shared is not None:
            try:
                await self._shared.set(key, token, ttl=max(int(ttl), 1))
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("token_cache_shared_unavailable", error=repr(exc))

    async def delete(self, key: str) -> None:
        await self._local.delete(key)
        if self._shared is not None:
            try:
                await self._shared.delete(key)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("token_cache_shared_unavailable", error=repr(exc))

    async def close(self) -> None:
        await self._local.close()
        if self._shared is not None:
            try:
                await self._shared.close()
            except (RedisError, OSError) as exc:
                log.debug("token_cache_close_failed", error=repr(exc))
