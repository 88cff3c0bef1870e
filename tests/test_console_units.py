"""The console's rules and arithmetic without a server: who may view and act (the gate,
with requests from addresses a loopback test server cannot receive), the CSRF secret,
the traffic history and upstream health on an injected clock, and the catalog snapshot."""

from __future__ import annotations

import asyncio
import collections
import os
import stat
from pathlib import Path
from typing import Any, cast
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from support.htpasswd import basic, write_htpasswd

from mirror.access import AccessControl
from mirror.config import MirrorConfig, load_config
from mirror.console import jobs as jobs_module
from mirror.console.gate import ConsoleGate, csrf_secret, is_console_path
from mirror.console.history import Totals, TrafficHistory, metric_totals
from mirror.console.jobs import Jobs
from mirror.console.snapshot import Catalog
from mirror.core import MirrorCore
from mirror.errors import Denied, Unauthorized
from mirror.metadata.base import BlobRecord
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.metrics import Metrics
from mirror.upstream.client import UpstreamHealth

SECRET = b"k" * 32


def config(tmp_path: Path, **settings: Any) -> MirrorConfig:
    return load_config(
        None,
        storage={"root": str(tmp_path / "root")},
        upstreams={"local": {"url": "http://127.0.0.1:1"}},
        **settings,
    )


def with_users(tmp_path: Path, **ui: Any) -> MirrorConfig:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "alice-pw", "bob": "bob-pw"})
    auth = {"htpasswd": str(htpasswd), "groups": {"ops": ["alice"]}}
    return config(tmp_path, auth=auth, ui={"admins": "ops", **ui})


def gate(mirror: MirrorConfig) -> ConsoleGate:
    return ConsoleGate(AccessControl(mirror.auth), mirror, SECRET)


def request(remote: str, host: str = "localhost:5000", method: str = "GET", **headers: str) -> Any:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (remote, 40000) if name == "peername" else default
    )
    return make_mocked_request(
        method, "/api/v1/session", headers={"Host": host, **headers}, transport=transport
    )


BASIC_ALICE, BASIC_BOB = basic("alice", "alice-pw"), basic("bob", "bob-pw")


async def test_without_users_loopback_acts_and_remote_is_refused(tmp_path: Path) -> None:
    console = gate(config(tmp_path))
    for remote, host in (("127.0.0.1", "localhost:5000"), ("::1", "[::1]:5000")):
        viewer = await console.viewer(request(remote, host))
        assert viewer.admin
        assert viewer.user is None
    for refused in (
        request("10.1.2.3", "mirror.example:5000"),
        # Through a reverse proxy on this host: remote, whatever the socket says.
        request("127.0.0.1", **{"X-Forwarded-For": "10.1.2.3"}),
        request("127.0.0.1", Forwarded="for=10.1.2.3"),
        # A page from another name that resolves to us (DNS rebinding): not local.
        request("127.0.0.1", "attacker.example:5000"),
    ):
        with pytest.raises(Denied):  # no login to ask for
            await console.viewer(refused)
    opened = gate(config(tmp_path, ui={"allow_remote": True}))
    viewer = await opened.viewer(request("10.1.2.3", "mirror.example"))
    assert not viewer.admin  # may look, never act


async def test_with_users_remote_logs_in_and_admins_are_a_group(tmp_path: Path) -> None:
    console = gate(with_users(tmp_path))
    with pytest.raises(Unauthorized) as refused:
        await console.viewer(request("10.1.2.3", "mirror.example"))
    assert refused.value.headers["WWW-Authenticate"] == 'Basic realm="registry-mirror"'
    alice = await console.viewer(request("10.1.2.3", "mirror.example", **BASIC_ALICE))
    bob = await console.viewer(request("10.1.2.3", "mirror.example", **BASIC_BOB))
    assert (alice.user, alice.admin) == ("alice", True)
    assert (bob.user, bob.admin) == ("bob", False)
    # Loopback without logging in may view; with users configured it is no admin.
    assert not (await console.viewer(request("127.0.0.1"))).admin
    with pytest.raises(Unauthorized):
        await console.viewer(request("10.1.2.3", Authorization="Basic YWxpY2U6bm9wZQ=="))


async def test_actions_check_origin_token_and_role(tmp_path: Path) -> None:
    console = gate(with_users(tmp_path))
    alice = await console.viewer(request("10.1.2.3", "mirror.example", **BASIC_ALICE))
    bob = await console.viewer(request("10.1.2.3", "mirror.example", **BASIC_BOB))
    token = console.csrf_token("alice")
    assert token != console.csrf_token("bob")
    assert token == gate(with_users(tmp_path)).csrf_token("alice")  # same secret, same token

    def post(**headers: str) -> Any:
        return request("10.1.2.3", "mirror.example", method="POST", **headers)

    console.check_action(post(**{"X-CSRF-Token": token}), alice)
    console.check_action(post(**{"X-CSRF-Token": token, "Origin": "http://mirror.example"}), alice)
    for headers in (
        {},
        {"X-CSRF-Token": console.csrf_token("bob")},
        {"X-CSRF-Token": token, "Origin": "http://evil.example"},
        {"X-CSRF-Token": token, "Origin": "null"},
    ):
        with pytest.raises(Denied):
            console.check_action(post(**headers), alice)
    with pytest.raises(Denied):
        console.check_action(post(**{"X-CSRF-Token": console.csrf_token("bob")}), bob)


def test_console_paths() -> None:
    assert all(map(is_console_path, ["/ui", "/ui/", "/ui/static/x.js", "/api/v1/overview"]))
    assert not any(map(is_console_path, ["/uix", "/v2/", "/api/v10", "/api/v1x/a"]))


def test_csrf_secret_is_shared_and_private(tmp_path: Path) -> None:
    mirror = config(tmp_path)
    meta = tmp_path / "root" / "meta"
    first = csrf_secret(mirror, meta)
    assert csrf_secret(mirror, meta) == first  # another worker, or a restart
    assert stat.S_IMODE(os.stat(meta / "console-secret").st_mode) == 0o600
    assert [p.name for p in meta.iterdir()] == ["console-secret"]  # no temp file left
    clustered = config(tmp_path / "c", cluster={"secret": "s" * 20})
    assert csrf_secret(clustered, tmp_path / "c" / "meta") != first
    assert not (tmp_path / "c" / "meta").exists()  # the cluster's secret needs no file


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_history_buckets_are_snapshot_differences() -> None:
    clock = Clock(1_000_040.0)  # 20 s into a minute
    live = Totals()
    history = TrafficHistory(lambda: live, clock)
    history.sample()  # the baseline: nothing before it is known
    live = Totals(requests=4, hits=3, misses=1, cache=300, upstream=100)
    clock.now += 60  # next minute
    history.sample()
    live = Totals(requests=6, hits=5, misses=1, cache=500, upstream=100, peer=7)
    view = history.view()
    hour = view["traffic"]["hour"]["points"]
    assert len(hour) == 60
    assert [p["t"] for p in hour[-2:]] == [1_000_020.0, 1_000_080.0]
    assert hour[-2]["requests"] == 4
    assert hour[-2]["bytes"] == {"cache": 300, "upstream": 100, "peer": 0}
    assert hour[-1]["hits"] == 2  # the open minute: live less its snapshot
    assert hour[-1]["bytes"]["peer"] == 7
    assert all(p["requests"] == 0 for p in hour[:-2])
    assert view["hit_ratio"]["hour"] == round(5 / 6, 4)
    assert view["bytes_saved"] == {"hour": 507, "day": 507}
    day = view["traffic"]["day"]["points"]
    assert len(day) == 96
    assert sum(p["requests"] for p in day) == 6
    assert history.since(clock.now - 15).requests == 2  # since this minute began
    assert history.since(clock.now - 30).requests == 6  # since the one before


def test_history_reads_the_metrics_counters() -> None:
    metrics = Metrics()
    metrics.observe_request("local", "r", "blob", "hit", 100)
    metrics.observe_request("local", "r", "blob", "miss", 40)
    metrics.observe_request("local", "r", "manifest", "revalidated", 5)
    metrics.observe_request("local", "r", "tags", "hit", 9)  # not a blob or manifest
    metrics.observe_request("local", "r", "blob", "peer", 11)
    totals = metric_totals(metrics)()
    assert totals == Totals(requests=4, hits=2, misses=2, cache=105, upstream=40, peer=11)
    assert totals.hit_ratio == 0.5
    assert totals.saved == 116


def test_upstream_health_counts_the_last_hours_failures_by_cause() -> None:
    clock = Clock(10_000.0)
    no_answer: collections.Counter[str] = collections.Counter()
    health = UpstreamHealth(no_answer, clock)
    health.mark()
    no_answer["connect"] += 2  # an old outage
    health.answered(503)
    for _ in range(61):  # an hour and a minute of marks
        clock.now += 60
        health.mark()
    assert health.recent_failures(3600) == {}
    assert health.last_success is None
    health.answered(401)  # a token challenge: neither success nor failure
    assert health.last_success is None
    health.answered(429)
    health.answered(403)
    no_answer["timeout"] += 1
    health.answered(200)
    assert health.last_success == clock.now
    assert health.recent_failures(3600) == {"rate_limited": 1, "denied": 1, "timeout": 1}
    assert health.recent_failures(7 * 3600) == {
        "connect": 2,
        "server_error": 1,
        "rate_limited": 1,
        "denied": 1,
        "timeout": 1,
    }


async def test_catalog_snapshot_counts_blobs_and_bytes_saved(tmp_path: Path) -> None:
    metadata = EmbeddedMetadataStore(tmp_path / "meta")
    try:
        index, old, layer = ("sha256:" + c * 64 for c in "abc")
        await metadata.put_blob(index, BlobRecord(10, 100.0, 500.0, "x"))
        await metadata.put_blob(old, BlobRecord(10, 100.0, 200.0, "x"))
        await metadata.put_blob(layer, BlobRecord(99, 100.0, 900.0))
        await metadata.add_repository("hub", "library/app")
        await metadata.add_repository("hub", "library/empty")
        await metadata.add_counters({"bytes:cache": 7, "bytes:peer": 3, "bytes:upstream": 50})
        catalog = Catalog(metadata, clock=Clock(1234.0))
        snapshot = await catalog.refresh()
        assert catalog.snapshot is snapshot
        assert (snapshot.taken_at, snapshot.blobs, snapshot.bytes_saved) == (1234.0, 3, 10)
        assert await catalog.repository_names() == [
            ("hub/library/app", "hub", "library/app"),
            ("hub/library/empty", "hub", "library/empty"),
        ]
    finally:
        await metadata.close()


async def test_a_job_stopped_by_shutdown_is_saved_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def seed_forever(*args: Any, progress: Any, **kwargs: Any) -> list[Any]:
        progress.advance("ref", 42)
        started.set()
        await asyncio.Event().wait()  # a seed that would never end by itself
        return []

    monkeypatch.setattr(jobs_module, "seed", seed_forever)
    metadata = EmbeddedMetadataStore(tmp_path / "meta")
    try:
        jobs = Jobs(metadata)
        job = await jobs.start_seed(cast(MirrorCore, None), ["ref"], None, pin=False, user="alice")
        await asyncio.wait_for(started.wait(), timeout=10)
        await jobs.close()
        stored = await Jobs(metadata).get(job.id)  # what another process sees
        assert stored is not None
        assert (stored.state, stored.bytes, stored.user) == ("failed", 42, "alice")
        assert stored.errors == ["stopped: the mirror shut down"]
        assert stored.finished is not None
    finally:
        await metadata.close()
