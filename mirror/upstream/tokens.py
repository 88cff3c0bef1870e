"""Where upstream tokens are kept: this process's memory, and the metadata store.

Through the store, processes and nodes that share it (Redis) ask an upstream's token
server once per scope and lifetime, not once each. Memory is always consulted first (no
round trip on the hot path); a store that cannot be reached only costs the sharing.
"""

from __future__ import annotations

import structlog
from aiocache import SimpleMemoryCache

from mirror.errors import MetadataUnavailable
from mirror.metadata.base import MetadataStore

log = structlog.get_logger(__name__)

# Memory copies of shared tokens live at most this long, so a token refreshed by another
# process after a 401 reaches this one soon.
LOCAL_TTL_CAP = 60.0


class TokenCache:
    def __init__(self, shared: MetadataStore | None = None):
        self._local = SimpleMemoryCache()
        self._shared = shared

    async def get(self, key: str) -> str | None:
        value = await self._local.get(key)
        if value is not None or self._shared is None:
            return None if value is None else str(value)
        try:
            found = await self._shared.get_token(key)
        except MetadataUnavailable as exc:
            log.debug("token_store_unavailable", error=exc.message)
            return None
        if found is None or not found[0]:
            return None  # none, or one deleted after the upstream refused it
        token, left = found
        if left > 1.0:
            await self._local.set(key, token, ttl=min(left, LOCAL_TTL_CAP))
        return token

    async def set(self, key: str, token: str, ttl: float) -> None:
        await self._local.set(key, token, ttl=min(ttl, LOCAL_TTL_CAP) if self._shared else ttl)
        if self._shared is not None:
            try:
                await self._shared.put_token(key, token, ttl)
            except MetadataUnavailable as exc:
                log.debug("token_store_unavailable", error=exc.message)

    async def delete(self, key: str) -> None:
        await self._local.delete(key)
        if self._shared is not None:
            try:
                # A refused token: expire it for everyone now.
                await self._shared.put_token(key, "", 0.001)
            except MetadataUnavailable as exc:
                log.debug("token_store_unavailable", error=exc.message)

    async def close(self) -> None:
        await self._local.close()
