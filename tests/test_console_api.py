"""The console's JSON API (mirror/console/): a real mirror in front of a real registry,
pulled through with skopeo or plain HTTP, then asked what it holds and told to act."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from conftest import TAG, Mirror, MirrorFactory, Upstream
from support.htpasswd import basic, write_htpasswd
from support.net import eventually_async
from support.skopeo import skopeo_copy_async

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
    body = await api.get("overview")
    hour = body["traffic"]["hour"]
    assert hour["step"] == 60
    assert len(hour["points"]) == 60
    assert len(body["traffic"]["day"]["points"]) == 96
    now = hour["points"][-1]
    blob_bytes = sum(len(blob) for blob in image.all_blobs().values())
    assert now["bytes"]["upstream"] >= blob_bytes
    assert now["bytes"]["cache"] >= blob_bytes
    assert now["hits"] >= len(image.all_blobs())
    assert now["misses"] >= len(image.all_blobs())
    assert 0 < body["hit_ratio"]["hour"] < 1
    assert body["bytes_saved"]["hour"] == now["bytes"]["cache"] + now["bytes"]["peer"]
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
    await pull(mirror, OCI, tmp_path / "oci")
    await mirror.settled()
    listed = await api.get("repositories")
    assert {(r["upstream"], r["repository"]) for r in listed["repositories"]} == {
        ("local", INDEX),
        ("local", OCI),
    }
    assert all(r["tags"] == 1 for r in listed["repositories"])
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
