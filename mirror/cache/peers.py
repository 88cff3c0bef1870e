"""The fleet, from one replica's side: its heartbeat and holder records in the metadata
store, the peers it fills from, and the peers it leaves out for a while.

In fleet mode (`cluster.listen` set, Redis metadata) every replica advertises its peer
endpoint (`api/peer.py`) through a heartbeat, records the blobs it commits as held by it,
and on a miss may fill from a replica that holds the blob or is downloading it
(`coordination.py` decides which). `PeerClient` is that replica's peer endpoint in the
shape of an upstream client, so the bytes go through the same `BlobDownload` as upstream
bytes: hashed as they arrive, the last one held back until verified, committed locally.

A peer that refuses (down, 404, 401) is left out for that blob briefly, one that broke a
transfer for longer, one that sent wrong bytes for long and loses its holder record: the
next request goes to another holder or the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping

import aiohttp
import structlog

from mirror.concurrency import TaskOwner
from mirror.errors import MetadataUnavailable, UpstreamUnavailable
from mirror.metadata.base import MetadataStore
from mirror.oci import Digest
from mirror.upstream.client import UpstreamResponse

log = structlog.get_logger(__name__)

# A replica renews its heartbeat this often; it is believed for three renewals, so one
# slow Redis round trip does not make a live replica look gone.
HEARTBEAT_EVERY = 3.0
HEARTBEAT_TTL = 3 * HEARTBEAT_EVERY
# How long a peer is left out for a blob, by what went wrong.
LEFT_OUT_SECONDS = {"unavailable": 5.0, "failed": 60.0, "corrupt": 600.0}
PEER_PATH = "/cluster/v1/blobs/"


class PeerClient:
    """One peer replica's endpoint, opened like an upstream (`fetch.SourceClient`)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, secret: Callable[[], str]):
        self.base_url = base_url
        self._session = session
        self._secret = secret

    async def open(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        """`blobs/<digest>` of any repository, from the peer (it serves digests only)."""
        kind, _, digest = path.partition("/")
        if kind != "blobs":
            raise UpstreamUnavailable("a peer serves blobs only")
        sent = {**(headers or {}), "Authorization": f"Bearer {self._secret()}"}
        url = f"{self.base_url}{PEER_PATH}{Digest.parse(digest)}"
        try:
            response = await self._session.request(method, url, headers=sent, allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable("peer replica unreachable", detail=repr(exc)) from exc
        return UpstreamResponse(response, redirected_elsewhere=False)


class OpenedResponse:
    """A peer's answer already checked, handed to `BlobDownload.run` as its client: a
    peer that will not send is found out before any client waits on the download."""

    def __init__(self, response: UpstreamResponse):
        self._response = response

    async def open(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        return self._response


class Fleet:
    """This replica's membership in its fleet, and what it knows about the other peers."""

    def __init__(
        self,
        metadata: MetadataStore,
        own_url: str,
        secret: Callable[[], str],
        timeout: float,
    ):
        self._metadata = metadata
        self.own_url = own_url
        self._secret = secret
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._tasks = TaskOwner("fleet")
        # (peer, digest) -> monotonic time until which that peer is not asked for it.
        self._left_out: dict[tuple[str, str], float] = {}
        self.fills: dict[str, int] = {}  # by outcome, for metrics

    async def start(self) -> None:
        # The timeout bounds each wait for a peer's bytes: a stalled peer fails the fill.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._timeout, sock_read=self._timeout
            ),
            auto_decompress=False,
        )
        with contextlib.suppress(MetadataUnavailable):
            await self._metadata.heartbeat(self.own_url, HEARTBEAT_TTL)
        self._tasks.spawn(self._beat(), name="fleet-heartbeat")
        log.info("fleet_joined", replica=self.own_url)

    async def close(self) -> None:
        await self._tasks.close()
        try:
            await self._metadata.leave(self.own_url)
        except MetadataUnavailable:
            log.warning("fleet_leave_failed", replica=self.own_url)  # its heartbeat lapses
        if self._session is not None:
            await self._session.close()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            try:
                await self._metadata.heartbeat(self.own_url, HEARTBEAT_TTL)
            except MetadataUnavailable:
                log.warning("fleet_heartbeat_failed", replica=self.own_url)

    def client(self, peer_url: str) -> PeerClient:
        assert self._session is not None, "Fleet.start first"
        return PeerClient(peer_url, self._session, self._secret)

    def usable(self, peer_url: str, digest: Digest) -> bool:
        if peer_url == self.own_url:
            return False
        until = self._left_out.get((peer_url, str(digest)))
        return until is None or until <= time.monotonic()

    async def holder(self, digest: Digest) -> str | None:
        """A live replica other than this one recorded as holding the blob, or None."""
        holders = await self._metadata.holders(str(digest))
        candidates = [p for p in holders if self.usable(p, digest)]
        if not candidates:
            return None
        alive = await self._metadata.alive_replicas()
        candidates = [p for p in candidates if p in alive]
        # Spread the fleet's fills over the holders.
        return random.choice(candidates) if candidates else None

    def count(self, outcome: str) -> None:
        self.fills[outcome] = self.fills.get(outcome, 0) + 1

    async def leave_out(self, peer_url: str, digest: Digest, outcome: str, error: str) -> None:
        """Ask `peer_url` for nothing of `digest` for a while (by `outcome`); a peer that
        sent wrong bytes is no longer recorded as holding it."""
        self.count(outcome)
        seconds = LEFT_OUT_SECONDS[outcome]
        now = time.monotonic()
        self._left_out = {k: v for k, v in self._left_out.items() if v > now}
        self._left_out[(peer_url, str(digest))] = now + seconds
        log.warning(
            "peer_left_out",
            peer=peer_url,
            digest=str(digest),
            outcome=outcome,
            seconds=seconds,
            error=error,
        )
        if outcome == "corrupt":
            await self.removed(digest, peer_url)

    async def committed(self, digest: Digest) -> None:
        """This replica now holds the blob."""
        try:
            await self._metadata.add_holder(str(digest), self.own_url)
        except MetadataUnavailable:
            log.warning("fleet_holder_not_recorded", digest=str(digest))

    async def removed(self, digest: Digest | str, peer_url: str | None = None) -> None:
        """`peer_url` (this replica by default) no longer holds the blob."""
        try:
            await self._metadata.remove_holder(str(digest), peer_url or self.own_url)
        except MetadataUnavailable:
            log.warning("fleet_holder_not_removed", digest=str(digest))
