"""`mirror serve --workers N`: several processes on one port, kept alive by a supervisor."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from conftest import TAG, Upstream
from support.mirror_process import MirrorProcess
from support.net import free_port, http_request, wait_until


def serving_pids(mirror: MirrorProcess) -> set[int]:
    pids = set()
    for line in mirror.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line a worker is writing right now
        if record.get("event") == "request":
            pids.add(record["pid"])
    return pids


def answers(url: str) -> bool:
    try:
        return http_request("GET", url).status == 200
    except OSError:
        return False  # a killed worker resets the connections queued on its socket


def test_two_workers_share_the_port_and_are_restarted(tmp_path: Path, upstream: Upstream) -> None:
    upstreams = {"local": {"url": upstream.url, "tag_ttl": "1h"}}
    mirror = MirrorProcess(
        tmp_path / "m", upstreams, port=free_port(), extra_args=("--workers", "2")
    )
    with mirror:
        path = f"{mirror.url}/v2/{Upstream.repo('oci')}/manifests/{TAG}"
        # Each request on a new connection: the kernel spreads them over both workers.
        wait_until(
            lambda: answers(path) and len(serving_pids(mirror)) == 2,
            timeout=30,
            message="requests did not reach two workers",
        )
        workers = serving_pids(mirror)
        assert mirror.pid not in workers  # the supervisor itself serves nothing

        victim = next(iter(workers))
        os.kill(victim, signal.SIGKILL)
        # A new worker takes its place; the port keeps answering meanwhile.
        wait_until(
            lambda: answers(path) and len(serving_pids(mirror) - workers) >= 1,
            timeout=30,
            message="no replacement worker served",
        )
    assert mirror.stop() in (0, None)
