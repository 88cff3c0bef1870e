"""The event loop `mirror serve` runs on (server.event_loop): asyncio's own by default,
uvloop when asked and it can be imported; and the blob path on a loop without
`loop.sendfile` (uvloop's)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest
import uvloop
from conftest import Mirror, Upstream
from support.mirror_process import MirrorProcess

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


@pytest.mark.slow
async def test_a_loop_without_sendfile_sends_blobs_in_chunks(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As uvloop does: no loop.sendfile. The remote-peer path (sendfile) must fall back.
    refused = []

    async def no_sendfile(*args: object, **kwargs: object) -> int:
        refused.append(args)
        raise NotImplementedError

    monkeypatch.setattr(transport, "peer_is_local", lambda request: False)
    monkeypatch.setattr(asyncio.get_running_loop(), "sendfile", no_sendfile)
    digest, data = max(upstream.images["oci"].blobs.items(), key=lambda item: len(item[1]))
    url = f"{mirror.url}/v2/{Upstream.repo('oci')}/blobs/{digest}"
    async with http.get(url) as response:  # cold: from the download, as it arrives
        assert await response.read() == data
    await mirror.settled()  # cached: what follows is sent from the file
    async with http.get(url) as response:
        assert await response.read() == data
    async with http.get(url, headers={"Range": "bytes=1000-"}) as response:
        assert response.status == 206
        assert await response.read() == data[1000:]
    assert len(refused) == 2  # both took the sendfile path, and fell back
