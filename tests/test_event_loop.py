"""The event loop `mirror serve` runs on (server.event_loop): asyncio's own by default,
uvloop when asked and it can be imported; and the blob path on a loop without
`loop.sendfile` (uvloop's)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import uvloop
from conftest import Upstream
from support.mirror_process import MirrorProcess
from support.net import http_request

from mirror.api import transport
from mirror.server import loop_factory


def test_auto_and_uvloop_choose_uvloop_and_asyncio_chooses_asyncio() -> None:
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_without_uvloop_the_asyncio_loop_serves(
    choice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory(choice) is None


def started_on(mirror: MirrorProcess) -> str:
    for line in mirror.log_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "mirror_started":
            return str(record["event_loop"])
    raise AssertionError("no mirror_started line")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("choice", "loop"), [(None, "asyncio"), ("auto", "uvloop"), ("uvloop", "uvloop")]
)
def test_serve_runs_on_the_chosen_loop(
    tmp_path: Path, upstream: Upstream, choice: str | None, loop: str
) -> None:
    settings = {"server": {"event_loop": choice}} if choice else {}
    upstreams = {"local": {"url": upstream.url}}
    with MirrorProcess(tmp_path / "m", upstreams, **settings) as mirror:
        assert started_on(mirror) == loop


def test_sendfile_is_taken_only_on_a_loop_that_has_it() -> None:
    # uvloop leaves loop.sendfile as asyncio's abstract stub (NotImplementedError).
    for runner_loop, has_it in [(None, True), (uvloop.new_event_loop, False)]:
        with asyncio.Runner(loop_factory=runner_loop) as runner:
            assert runner.run(_has_sendfile()) is has_it


async def _has_sendfile() -> bool:
    return transport._loop_has_sendfile()


@pytest.mark.slow
def test_uvloop_serves_blobs_in_chunks(tmp_path: Path, upstream: Upstream) -> None:
    """On uvloop every blob goes out in chunks: a download in progress, a committed
    file, and a range of it, byte-exact."""
    upstreams = {"local": {"url": upstream.url}}
    settings = {"server": {"event_loop": "uvloop"}}
    digest, data = max(upstream.images["oci"].blobs.items(), key=lambda item: len(item[1]))
    with MirrorProcess(tmp_path / "m", upstreams, **settings) as mirror:
        assert started_on(mirror) == "uvloop"
        url = f"{mirror.url}/v2/{Upstream.repo('oci')}/blobs/{digest}"
        assert http_request("GET", url).body == data  # cold: from the download
        assert http_request("GET", url).body == data  # warm: from the file
        ranged = http_request("GET", url, headers={"Range": "bytes=1000-"})
        assert (ranged.status, ranged.body) == (206, data[1000:])
