"""`mirror serve` as a real process on a free loopback port, for tests and benchmarks
that need what an in-process server cannot give: several processes, signals, restarts,
and the log a deployed mirror writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import yaml

from .net import Service, free_port, http_request, wait_until


class MirrorProcessError(RuntimeError):
    """The mirror process did not start, or died."""


class MirrorProcess(Service):
    def __init__(
        self,
        workdir: Path,
        upstreams: dict[str, dict[str, Any]],
        *,
        storage: Path | None = None,
        port: int | None = None,
        log_level: str = "info",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        **settings: Any,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.storage = storage or workdir / "storage"
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "mirror.log"
        self.extra_args = extra_args
        self.env = env or {}
        self.config: dict[str, Any] = {
            "listen": self.host,
            "storage": {"root": str(self.storage)},
            "log": {"level": log_level, "format": "json"},
            "upstreams": upstreams,
            **settings,
        }
        self._process = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._log = self.log_path.open("ab")
        # MIRROR_* variables override the config file; keep the caller's out, and
        # pass only those the test gives.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        env.update(self.env)
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mirror",
                "serve",
                "--config",
                str(self.config_path),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            wait_until(self._ready, timeout=timeout, interval=0.05, message="mirror not ready")
        except (TimeoutError, MirrorProcessError) as exc:
            self.stop()
            raise MirrorProcessError(f"{exc}\n--- mirror log ---\n{self.log_tail()}") from exc

    @property
    def pid(self) -> int:
        """The `mirror serve` process (the supervisor, with --workers)."""
        assert self._process is not None, "not started"
        return self._process.pid

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise MirrorProcessError(f"mirror exited with status {self._process.returncode}")
        try:
            return http_request("GET", f"{self.url}/healthz", timeout=2).status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean-up runs, as in a crash."""
        proc, self._process = self._process, None
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._close_log()

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); returns the exit status."""
        proc, self._process = self._process, None
        status: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            status = proc.returncode
        self._close_log()
        return status

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serving_pids(self, path: str | None = None) -> set[int]:
        """The workers that answered requests (for `path` only, if given)."""
        pids = set()
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the line a worker is writing right now
            if record.get("event") == "request" and path in (None, record.get("path")):
                pids.add(record["pid"])
        return pids

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def temp_files(self) -> list[Path]:
        tmp = self.storage / "tmp"
        return sorted(tmp.iterdir()) if tmp.is_dir() else []
