"""A real redis-server on a free loopback port, for the Redis metadata backend's tests;
optionally a replica of another one (the Sentinel tests' primary and replica)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from .net import LOOPBACK, Service, free_port, wait_for_port


class RedisServer(Service):
    def __init__(self, workdir: Path, replica_of: int | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.replica_of = replica_of
        self._process = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/bootstrap test installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the process owns it
        self._process = subprocess.Popen(
            [
                binary,
                "--bind",
                LOOPBACK,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
                *(
                    ["--replicaof", LOOPBACK, str(self.replica_of)]
                    if self.replica_of is not None
                    else []
                ),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(LOOPBACK, self.port, timeout=10)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to replicas or sentinels, as in a crash."""
        proc, self._process = self._process, None
        if proc is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
