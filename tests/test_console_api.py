"""The console's JSON API (mirror/console/): a real mirror in front of a real registry,
pulled through with skopeo or plain HTTP, then asked what it holds and told to act."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from conftest import TAG, Mirror, MirrorFactory, Upstream
from support.fake_upstream import FakeUpstream, digest_of
from support.htpasswd import basic, write_htpasswd
from support.images import push, standard_images
from support.mirror_process import MirrorProcess
from support.net import eventually_async, free_port, http_request, wait_until
from support.skopeo import skopeo_copy_async

from mirror.api.services import SERVICES
from mirror.app import EVICTOR, METADATA

USERS = {"alice": "alice-pw", "bob": "bob-pw"}  # alice is an admin, bob only views
OCI, INDEX = Upstream.repo("oci"), Upstream.repo("oci-index")


def login(user: str) -> dict[str, str]:
    return basic(user, USERS[user])


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return write_htpasswd(tmp_path / "htpasswd", USERS)


def auth(htpasswd: Path) -> dict[str, Any]:
    return {"auth": {"htpasswd": str(htpasswd), "groups": {"admins": ["alice"]}}}


class Api:
    """The console's API as a script uses it: JSON in, JSON out, the CSRF token sent."""

    def __init__(self, http: aiohttp.ClientSession, mirror: Mirror, user: str | None = None):
        self.http, self.base = http, f"{mirror.url}/api/v1"
        self.headers = login(user) if user else {}

    async def get(self, path: str, status: int = 200, **params: str) -> Any:
        async with self.http.get(
            f"{self.base}/{path}", params=params, headers=self.headers
        ) as response:
            assert response.status == status, await response.text()
            assert response.content_type == "application/json"
            return await response.json()

    async def post(self, path: str, body: dict[str, Any], status: int = 200, **headers: str) -> Any:
        token = (await self.get("session"))["csrf_token"]
        sent = {"X-CSRF-Token": token, **self.headers, **headers}
        async with self.http.post(f"{self.base}/{path}", json=body, headers=sent) as response:
            assert response.status == status, await response.text()
            return await response.json()


def hour_sum(overview: dict[str, Any]) -> dict[str, int]:
    """The hour's points added up: requests, hits, misses, and bytes by source."""
    total: dict[str, int] = {}
    for point in overview["traffic"]["hour"]["points"]:
        for key, value in (*point["bytes"].items(), *point.items()):
            if isinstance(value, int) and key != "t":
                total[key] = total.get(key, 0) + value
    return total


async def pull(mirror: Mirror, repository: str, dest: Path) -> None:
    await skopeo_copy_async(f"docker://{mirror.host}/{repository}:{TAG}", f"dir:{dest}")


async def test_overview_counts_a_scripted_workload(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    api = Api(http, mirror)
    image = upstream.images["oci"]
    await pull(mirror, OCI, tmp_path / "first")  # every blob from the upstream
    await mirror.settled()
    await pull(mirror, OCI, tmp_path / "second")  # every blob from the cache
    blob_bytes = sum(len(blob) for blob in image.all_blobs().values())

    async def counted() -> bool:
        # A request is counted once its answer is sent: skopeo may be done sooner.
        total = hour_sum(await api.get("overview"))  # the workload may straddle a minute
        return total["upstream"] >= blob_bytes and total["cache"] >= blob_bytes

    await eventually_async(counted)
    body = await api.get("overview")
    hour = body["traffic"]["hour"]
    assert hour["step"] == 60
    assert len(hour["points"]) == 60
    assert len(body["traffic"]["day"]["points"]) == 96
    hour_total = hour_sum(body)
    assert hour_total["hits"] >= len(image.all_blobs())
    assert hour_total["misses"] >= len(image.all_blobs())
    assert 0 < body["hit_ratio"]["hour"] < 1
    assert body["bytes_saved"]["hour"] == hour_total["cache"] + hour_total["peer"]
    assert body["usage"]["bytes"] >= blob_bytes
    assert body["usage"]["disk_total"] >= body["usage"]["disk_free"] > 0
    [local] = body["upstreams"]
    assert local["name"] == "local"
    assert local["last_success"] is not None
    assert local["credentials"]["state"] == "none"
    assert local["errors"] == {}
    pulls = body["recent_pulls"]
    assert pulls[0]["time"] >= pulls[-1]["time"]
    assert {(p["kind"], p["repository"], p["status"]) for p in pulls} >= {
        ("manifest", OCI, 200),
        ("blob", OCI, 200),
    }
    assert {p["cache"] for p in pulls if p["kind"] == "blob"} >= {"hit", "miss"}
    assert body["downloads"] == []
    assert body["replicas"] == []


async def test_browse_lists_images_with_platforms(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    api = Api(http, mirror)
    await pull(mirror, INDEX, tmp_path / "index")  # --all: both platforms
    started = time.time()
    await pull(mirror, OCI, tmp_path / "oci")
    await mirror.settled()
    await mirror.server.app[SERVICES].blobs.flush_access()  # as it is every few seconds
    listed = await api.get("repositories")
    assert {(r["upstream"], r["repository"]) for r in listed["repositories"]} == {
        ("local", INDEX),
        ("local", OCI),
    }
    assert all(r["tags"] == 1 for r in listed["repositories"])
    pulled = {r["repository"]: r["last_pulled"] for r in listed["repositories"]}
    assert pulled[INDEX] <= started <= pulled[OCI] <= time.time()
    found = await api.get("repositories", q="INDEX")
    assert [r["repository"] for r in found["repositories"]] == [INDEX]
    page = await api.get("repositories", limit="1")
    assert len(page["repositories"]) == 1
    assert page["next"] is not None
    rest = await api.get("repositories", limit="1", cursor=page["next"])
    assert [r["repository"] for r in page["repositories"]] == [OCI]
    assert [r["repository"] for r in rest["repositories"]] == [INDEX]
    assert rest["next"] is None

    index = upstream.images["oci-index"]
    [tag] = (await api.get("tags", upstream="local", repository=INDEX))["tags"]
    assert (tag["tag"], tag["digest"]) == (TAG, index.digest)
    shown = await api.get("manifest", upstream="local", repository=INDEX, reference=TAG)
    assert shown["digest"] == index.digest
    assert shown["pinned"] is False
    assert shown["first_pulled"] is not None
    assert shown["last_pulled"] >= shown["first_pulled"]
    platforms = {(p["os"], p["architecture"]): p for p in shown["platforms"]}
    assert set(platforms) == {("linux", "amd64"), ("linux", "arm64")}
    for child in index.children:
        entry = next(p for p in shown["platforms"] if p["digest"] == child.digest)
        assert [layer["digest"] for layer in entry["layers"]] == child.layer_digests
        assert all(layer["cached"] for layer in entry["layers"])
    # A single manifest: its platform comes from its config blob.
    single = await api.get("manifest", upstream="local", repository=OCI, reference=TAG)
    [platform] = single["platforms"]
    assert (platform["os"], platform["architecture"]) == ("linux", "amd64")

    missing = await api.get(
        "manifest", status=404, upstream="local", repository=OCI, reference="nope"
    )
    assert missing["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    bad = await api.get("tags", status=400, upstream="local", repository="Not/Valid")
    assert bad["errors"][0]["code"] == "NAME_INVALID"
    await api.get("tags", status=404, upstream="elsewhere", repository=OCI)


async def test_pin_spares_an_image_from_eviction_and_evict_removes(
    make_mirror: MirrorFactory, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # A limit below what two images take: an eviction pass must remove something.
    mirror = await make_mirror(
        {"local": {"url": upstream.url, "tag_ttl": "1h"}}, storage={"max_size": "2MiB"}
    )
    api = Api(http, mirror)
    await pull(mirror, INDEX, tmp_path / "index")
    await mirror.settled()
    pinned = await api.post("pin", {"upstream": "local", "repository": INDEX, "reference": TAG})
    image = upstream.images["oci-index"]
    expected = {m.digest for m in image.all_manifests()} | set(image.all_blobs())
    assert set(pinned["digests"]) == expected
    await pull(mirror, OCI, tmp_path / "oci")
    await mirror.settled()
    app = mirror.server.app
    await app[EVICTOR].evict()
    for digest in expected:
        record = await app[METADATA].get_blob(digest)
        assert record is not None, digest
        assert record.pinned, digest
    shown = await api.get("manifest", upstream="local", repository=INDEX, reference=TAG)
    assert shown["pinned"]
    assert all(p["pinned"] for p in shown["platforms"])

    refused = await api.post(
        "evict", {"upstream": "local", "repository": INDEX, "reference": TAG}, status=409
    )
    assert refused["errors"][0]["code"] == "CONFLICT"
    await api.post("unpin", {"upstream": "local", "repository": INDEX, "reference": TAG})
    evicted = await api.post("evict", {"upstream": "local", "repository": INDEX, "reference": TAG})
    assert set(evicted["digests"]) == expected
    assert evicted["freed"] > 0
    assert await app[METADATA].get_blob(image.digest) is None
    await api.get("manifest", status=404, upstream="local", repository=INDEX, reference=TAG)


async def test_actions_need_an_admin_a_token_and_this_origin(
    make_mirror: MirrorFactory, upstream: Upstream, htpasswd: Path, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror({"local": {"url": upstream.url}}, **auth(htpasswd))
    alice, bob = Api(http, mirror, "alice"), Api(http, mirror, "bob")
    assert await alice.get("session") == {
        "user": "alice",
        "admin": True,
        "csrf_token": (await alice.get("session"))["csrf_token"],
    }
    session = await bob.get("session")
    assert session["user"] == "bob"
    assert session["admin"] is False
    assert session["csrf_token"] != (await alice.get("session"))["csrf_token"]
    # Loopback and anonymous, with users configured: may view, may not act.
    anonymous = Api(http, mirror)
    assert (await anonymous.get("session"))["admin"] is False
    seed = {"references": [f"{OCI}:{TAG}"]}
    body = {"upstream": "local", "repository": OCI, "reference": TAG}

    denied = await bob.post("pin", body, status=403)
    assert denied["errors"][0]["code"] == "DENIED"
    await anonymous.post("seed", seed, status=401)
    await alice.post("pin", body, status=404)  # admitted; nothing pulled yet
    url = f"{mirror.url}/api/v1/pin"
    async with http.post(url, json=body, headers=login("alice")) as response:
        assert response.status == 403  # no token
    wrong = {**login("alice"), "X-CSRF-Token": (await bob.get("session"))["csrf_token"]}
    async with http.post(url, json=body, headers=wrong) as response:
        assert response.status == 403  # bob's token is not alice's
    await alice.post("pin", body, status=403, Origin="http://evil.example")
    await alice.post("pin", body, status=404, Origin=mirror.url)
    # A wrong password is refused with the registry's own challenge.
    async with http.get(
        f"{mirror.url}/api/v1/session", headers={"Authorization": "Basic YWxpY2U6bm8="}
    ) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")


async def test_actions_are_audited_and_seed_runs_to_done(
    mirror: Mirror, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    api = Api(http, mirror)  # loopback, no htpasswd: an admin
    assert (await api.get("session"))["admin"] is True
    reference = f"{OCI}:{TAG}"  # the default upstream's
    with structlog.testing.capture_logs() as logs:
        started = await api.post(
            "seed", {"references": [reference], "platforms": None, "pin": True}
        )

        async def finished() -> bool:
            job = await api.get(f"jobs/{started['job']}")
            return bool(job["state"] != "running")

        await eventually_async(finished, timeout=60)
        await api.post("unpin", {"upstream": "local", "repository": OCI, "reference": TAG})
    job = await api.get(f"jobs/{started['job']}")
    image = upstream.images["oci"]
    assert job["state"] == "done", job
    assert (job["done"], job["total"], job["errors"]) == (1, 1, [])
    assert job["bytes"] == sum(len(b) for b in image.all_blobs().values())
    assert [j["id"] for j in (await api.get("jobs"))["jobs"]] == [started["job"]]
    actions = [line for line in logs if line["event"] == "console_action"]
    assert [(a["action"], a["outcome"]) for a in actions] == [
        ("seed", "ok"),
        ("seed_finished", "done"),
        ("unpin", "ok"),
    ]
    assert actions[2]["repository"] == OCI
    assert actions[2]["reference"] == TAG
    await api.get("jobs/unknown", status=404)
    bad = await api.post("seed", {"references": "alpine"}, status=400)
    assert bad["errors"][0]["code"] == "BAD_REQUEST"


def test_workers_share_the_token_the_traffic_and_the_jobs(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Under `serve --workers 2`, whichever worker a new connection reaches gives the same
    CSRF token, counts every worker's traffic, and knows a job another worker runs."""
    mirror = MirrorProcess(
        tmp_path / "m",
        {"local": {"url": upstream.url, "tag_ttl": "1h"}},
        port=free_port(),
        default_upstream="local",
        extra_args=("--workers", "2"),
    )
    image = upstream.images["oci"]
    blob_bytes = sum(len(blob) for blob in image.all_blobs().values())

    def get(path: str) -> Any:
        response = http_request("GET", f"{mirror.url}/api/v1/{path}")  # a new connection
        assert response.status == 200, response.body
        return json.loads(response.body)

    with mirror:
        tokens, sent = set(), 0
        while len(mirror.serving_pids("/api/v1/session")) < 2:
            tokens.add(get("session")["csrf_token"])
            sent += 1
            assert sent < 200, "the requests never reached both workers"
        assert len(tokens) == 1
        for digest in image.all_blobs():
            assert http_request("GET", f"{mirror.url}/v2/{OCI}/blobs/{digest}").status == 200
        # A request is counted once its answer is sent: the client may ask sooner.
        wait_until(lambda: hour_sum(get("overview"))["upstream"] == blob_bytes, timeout=10)
        for _ in range(10):  # whichever worker answers, all of the traffic
            assert hour_sum(get("overview"))["upstream"] == blob_bytes
        started = http_request(
            "POST",
            f"{mirror.url}/api/v1/seed",
            body=json.dumps({"references": [f"{INDEX}:{TAG}"]}).encode(),
            headers={"X-CSRF-Token": tokens.pop()},
        )
        assert started.status == 200, started.body
        job = json.loads(started.body)["job"]
        wait_until(lambda: get(f"jobs/{job}")["state"] != "running", timeout=60)
        for _ in range(10):
            assert get(f"jobs/{job}")["state"] == "done"
        assert len(mirror.serving_pids(f"/api/v1/jobs/{job}")) == 2


async def test_refresh_revalidates_a_tag_now(
    make_mirror: MirrorFactory,
    fresh_upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    mirror = await make_mirror({"local": {"url": fresh_upstream.url, "tag_ttl": "1h"}})
    api = Api(http, mirror)
    await pull(mirror, OCI, tmp_path / "before")
    newer = standard_images(seed_base=int(time.monotonic_ns() % 1000) + 40)["oci"]
    push(fresh_upstream.url, OCI, newer, TAG)  # the tag moves upstream
    [tag] = (await api.get("tags", upstream="local", repository=OCI))["tags"]
    assert tag["digest"] == fresh_upstream.images["oci"].digest  # within tag_ttl: unchanged
    body = {"upstream": "local", "repository": OCI, "tag": TAG}
    assert await api.post("refresh", body) == {"digest": newer.digest}
    [tag] = (await api.get("tags", upstream="local", repository=OCI))["tags"]
    assert tag["digest"] == newer.digest
    missing = await api.post("refresh", {**body, "tag": "nope"}, status=404)
    assert missing["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    digest = await api.post("refresh", {**body, "tag": newer.digest}, status=400)
    assert digest["errors"][0]["code"] == "BAD_REQUEST"


async def test_overview_shows_a_download_in_flight_and_ui_can_be_off(
    make_mirror: MirrorFactory,
    stalled_blob: tuple[FakeUpstream, str, bytes, asyncio.Event, str],
    http: aiohttp.ClientSession,
) -> None:
    _fake, path, blob, release, url = stalled_blob
    mirror = await make_mirror({"fake": {"url": url}})
    api = Api(http, mirror)
    try:
        async with http.get(mirror.url + path) as response:
            await response.content.readexactly(1024)  # the download is under way, stalled

            async def shown() -> bool:
                downloads = (await api.get("overview"))["downloads"]
                return bool(downloads) and downloads[0]["received"] >= 256 * 1024

            await eventually_async(shown)
            [download] = (await api.get("overview"))["downloads"]
            assert download["digest"] == digest_of(blob)
            assert (download["upstream"], download["repository"]) == ("fake", "team/app")
            assert (download["size"], download["clients"]) == (len(blob), 1)
            assert download["started"] <= time.time()
            release.set()
            assert await response.read() == blob[1024:]
    finally:
        release.set()
    await mirror.settled()
    assert (await api.get("overview"))["downloads"] == []

    off = await make_mirror({"fake": {"url": url}}, ui={"enabled": False})
    async with http.get(f"{off.url}/api/v1/session") as response:
        assert response.status == 404
