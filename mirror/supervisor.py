"""`mirror serve --workers N`: N worker processes sharing one port (SO_REUSEPORT).

The supervisor prepares the storage once (sweeping tmp/ before any worker writes
there), then starts the workers: each is `mirror serve` again with `--worker`, binding
the same address with SO_REUSEPORT so the kernel spreads connections across them. They
share the storage root and the metadata store; cross-process single-flight comes from
the store's leases. A worker that dies is started again (with a growing pause if it
keeps dying); SIGTERM or SIGINT stops them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

import structlog
from prometheus_client.multiprocess import mark_process_dead

from mirror.config import MirrorConfig
from mirror.core import default_sweep, make_blob_store
from mirror.metrics import MULTIPROCESS_ENV

log = structlog.get_logger(__name__)

MAX_RESTART_PAUSE = 30.0
HEALTHY_AFTER = 60.0  # a worker that lived this long resets the restart pause


class Supervisor:
    def __init__(self, config: MirrorConfig, worker_argv: Sequence[str], workers: int):
        self._config = config
        self._argv = [sys.executable, "-m", "mirror", *worker_argv, "--worker"]
        self._workers = workers
        self._processes: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self._stopping = False
        self._env: dict[str, str] = dict(os.environ)

    def run(self) -> int:
        swept = make_blob_store(self._config).prepare(default_sweep(self._config).older_than)
        log.info("supervisor_started", workers=self._workers, temp_files_swept=swept)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        # Workers count into shared files here, so any worker's /metrics reports them all.
        with tempfile.TemporaryDirectory(prefix="mirror-metrics-") as metrics_dir:
            self._env = {**os.environ, MULTIPROCESS_ENV: metrics_dir}
            return self._supervise()

    def _supervise(self) -> int:
        for slot in range(self._workers):
            self._start(slot)
        pause = 1.0
        while self._processes:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            found = next((s for s, (p, _) in self._processes.items() if p.pid == pid), None)
            if found is None:
                continue
            slot = found
            process, started = self._processes.pop(slot)
            process.returncode = os.waitstatus_to_exitcode(status)
            mark_process_dead(pid, self._env[MULTIPROCESS_ENV])  # type: ignore[no-untyped-call]
            if self._stopping:
                continue
            lived = time.monotonic() - started
            pause = 1.0 if lived > HEALTHY_AFTER else min(pause * 2, MAX_RESTART_PAUSE)
            log.error("worker_died", slot=slot, pid=pid, status=status, restart_in=pause)
            time.sleep(pause)
            if not self._stopping:
                self._start(slot)
        log.info("supervisor_stopped")
        return 0

    def _start(self, slot: int) -> None:
        process = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, env=self._env)
        self._processes[slot] = (process, time.monotonic())
        log.info("worker_started", slot=slot, pid=process.pid)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        for process, _ in list(self._processes.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
