"""A Sentinel-managed Redis on loopback: a primary, one replica and three sentinels
(quorum 2), each with a free port and a private directory, as Debian's `redis-sentinel`
runs them. Failure detection is tuned down (1 s) so a failover takes seconds in a test.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from .net import LOOPBACK, Service, free_port, wait_for_port, wait_until
from .redis_server import RedisServer

SERVICE = "mymaster"
DOWN_AFTER_MS = 1000


class RedisSentinel(Service):
    """One `redis-sentinel` process watching `SERVICE` at the given primary."""

    def __init__(self, workdir: Path, primary_port: int, quorum: int):
        self.workdir = workdir
        self.port = free_port()
        self.primary_port = primary_port
        self.quorum = quorum
        self._process = None

    def start(self) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError("redis-sentinel is not installed (scripts/bootstrap test does)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Sentinel rewrites its config file as it learns the fleet, so each gets its own.
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {LOOPBACK}\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {SERVICE} {LOOPBACK} {self.primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        log = open(self.workdir / "sentinel.log", "ab")  # noqa: SIM115 - the process owns it
        self._process = subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_port(LOOPBACK, self.port, timeout=10)

    def client(self) -> Redis:
        return Redis(host=LOOPBACK, port=self.port, socket_timeout=2)


class SentinelRedis(Service):
    """Primary, replica and sentinels; `url` is what `metadata.redis_url` takes."""

    def __init__(self, workdir: Path, sentinels: int = 3):
        self.workdir = workdir
        self.primary = RedisServer(workdir / "primary")
        self.replica = RedisServer(workdir / "replica", replica_of=self.primary.port)
        self.sentinels = [
            RedisSentinel(workdir / f"sentinel-{n}", self.primary.port, sentinels // 2 + 1)
            for n in range(sentinels)
        ]
        self.port = self.sentinels[0].port

    @property
    def url(self) -> str:
        hosts = ",".join(sentinel.host for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        # Ready when every sentinel knows the replica and the other sentinels: only then
        # can they agree that the primary is down and elect one of them to promote.
        wait_until(self._ready, timeout=30, interval=0.1, message="sentinels never formed")

    def _ready(self) -> bool:
        others = len(self.sentinels) - 1
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                try:
                    state = client.sentinel_master(SERVICE)
                except RedisError:
                    return False
            if state["num-other-sentinels"] < others or state["num-slaves"] < 1:
                return False
        return self._replica_in_sync()

    def _replica_in_sync(self) -> bool:
        with Redis(host=LOOPBACK, port=self.replica.port, socket_timeout=2) as client:
            return bool(client.info("replication").get("master_link_status") == "up")

    def primary_port(self) -> int | None:
        """The primary's port as every sentinel now reports it; None while they differ."""
        seen = set()
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                try:
                    address = client.sentinel_get_master_addr_by_name(SERVICE)
                except RedisError:
                    return None
            seen.add(int(address[1]) if address else None)
        return seen.pop() if len(seen) == 1 else None

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()
