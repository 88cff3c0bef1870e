"""`mirror serve --workers N`: several processes on one port, kept alive by a supervisor."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import TAG, Upstream
from prometheus_client.parser import text_string_to_metric_families
from support.mirror_process import MirrorProcess
from support.net import free_port, http_request, wait_until

pytestmark = pytest.mark.slow  # starts registries, servers or processes


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
            lambda: answers(path) and len(mirror.serving_pids()) == 2,
            timeout=30,
            message="requests did not reach two workers",
        )
        workers = mirror.serving_pids()
        assert mirror.pid not in workers  # the supervisor itself serves nothing

        victim = next(iter(workers))
        os.kill(victim, signal.SIGKILL)
        # A new worker takes its place; the port keeps answering meanwhile.
        wait_until(
            lambda: answers(path) and len(mirror.serving_pids() - workers) >= 1,
            timeout=30,
            message="no replacement worker served",
        )
    assert mirror.stop() in (0, None)


def test_metrics_count_every_workers_requests(tmp_path: Path, upstream: Upstream) -> None:
    upstreams = {"local": {"url": upstream.url}}
    mirror = MirrorProcess(
        tmp_path / "m", upstreams, port=free_port(), extra_args=("--workers", "2")
    )
    with mirror:
        sent = 0
        # New connections each time, until both workers have answered some.
        while len(mirror.serving_pids("/v2/")) < 2 or sent < 20:
            assert answers(f"{mirror.url}/v2/")
            sent += 1
            assert sent < 500, "the requests never reached both workers"
        for _ in range(5):  # whichever worker answers the scrape, the total is the same
            text = http_request("GET", f"{mirror.url}/metrics").body.decode()
            counted = sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "mirror_requests_total" and sample.labels.get("kind") == "base"
            )
            assert counted == sent
