"""A real redis-server on a free loopback port, for the Redis metadata backend's tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .net import LOOPBACK, Service, free_port, wait_for_port


class RedisServer(Service):
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
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
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(LOOPBACK, self.port, timeout=10)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
