"""A real Prometheus server on a free loopback port, scraping the given targets every
second, for the dashboard test: its queries are evaluated the way Grafana has them
evaluated."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from .net import LOOPBACK, Service, free_port, http_request, wait_until

JOB = "registry-mirror"


class PrometheusServer(Service):
    def __init__(self, workdir: Path, targets: list[str]):
        self.workdir = workdir
        self.targets = targets
        self.port = free_port()
        self._process = None

    def start(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (scripts/bootstrap test installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {"job_name": JOB, "static_configs": [{"targets": self.targets}]}
                    ],
                }
            )
        )
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 - the process owns it
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(
            lambda: self._ready(),
            timeout=20,
            interval=0.1,
            message=f"prometheus not ready on port {self.port}",
        )

    def _ready(self) -> bool:
        try:
            return http_request("GET", f"{self.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False
