"""The console's JSON API under `/api/v1/` (README: "Console and its API").

Reads: `session`, `overview`, `repositories`, `tags`, `manifest`, `jobs`. Actions (POST,
admins only, CSRF-checked by `gate.py`): `pin`, `unpin`, `refresh`, `evict`, `seed`;
each writes one audit line (event `console_action`). Errors are
`{"errors": [{"code", "message"}]}` through the same middleware as the registry API.

Nothing here scans the metadata store per request: the overview reads counters, the
traffic history (`history.py`) and the background snapshot (`snapshot.py`); browsing
reads the records of one repository or image. What is shown is only what is cached:
these endpoints never ask an upstream, except `refresh` and `seed`, whose job it is.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from mirror.api.errors import expect_handler
from mirror.api.services import SERVICES
from mirror.app import CONFIG, CORE, METADATA, STORE, UPSTREAMS, eviction_listener
from mirror.cache.manifests import Manifest
from mirror.config import (
    EcrCredentialsConfig,
    GcpCredentialsConfig,
    HelperCredentialsConfig,
    UpstreamConfig,
)
from mirror.console.gate import GATE, VIEWER, Viewer
from mirror.console.history import RecentPulls, TrafficHistory
from mirror.console.jobs import Jobs
from mirror.console.snapshot import Catalog
from mirror.errors import (
    BadRequest,
    Conflict,
    ManifestUnknown,
    MetadataUnavailable,
    MirrorError,
    NameUnknown,
)
from mirror.logging import audit_log
from mirror.metadata.base import BlobRecord, MetadataStore
from mirror.oci import INDEX_MEDIA_TYPES, Digest, Reference, validate_name
from mirror.routing import Route
from mirror.seed import parse_image_reference, set_pinned
from mirror.upstream.client import UpstreamClient

log = structlog.get_logger(__name__)

HISTORY = web.AppKey("console_history", TrafficHistory)
PULLS = web.AppKey("console_pulls", RecentPulls)
CATALOG = web.AppKey("console_catalog", Catalog)
JOBS = web.AppKey("console_jobs", Jobs)

BODY_MAX = 64 * 1024  # a seed list of a few hundred references
PAGE_DEFAULT, PAGE_MAX = 100, 1000
SEED_MAX = 500
ERRORS_WITHIN = 3600.0  # an upstream's "recent" errors: the last hour
CONFIG_MAX = 1024 * 1024  # an image config larger than this is not read for its platform


# Requests


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} is required", detail={"field": name})
    return value


def _route(request: web.Request, upstream: Any, repository: Any) -> Route:
    """A configured upstream and a valid repository name the viewer may see."""
    upstream, repository = _text(upstream, "upstream"), _text(repository, "repository")
    if upstream not in request.app[CONFIG].upstreams:
        raise NameUnknown("no such upstream", detail={"upstream": upstream[:100]})
    validate_name(repository)
    viewer = request[VIEWER]
    if not _may_see(request, viewer, upstream, repository):
        raise NameUnknown("no such repository", detail={"repository": repository})
    return Route(upstream, repository, repository)


def _may_see(request: web.Request, viewer: Viewer, upstream: str, repository: str) -> bool:
    """Admins see everything; other viewers what the access rules let them pull."""
    access = request.app[SERVICES].access
    return viewer.admin or access.may_pull(viewer.principal, upstream, repository)


async def _body(request: web.Request) -> dict[str, Any]:
    # Read here, with our own bound: the app's client_max_size is the registry API's.
    data = await request.content.read(BODY_MAX + 1)
    if len(data) > BODY_MAX:
        raise BadRequest("request body too large", detail={"limit": BODY_MAX})
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body is a JSON object")
    return body


def _json(payload: Any) -> web.Response:
    return web.json_response(payload, dumps=lambda value: json.dumps(value, default=str))


# Reading images from the cache


@dataclass
class Platform:
    os: str
    architecture: str
    variant: str | None
    manifest: Manifest
    record: BlobRecord | None
    config: str | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CachedImage:
    """An image as the cache holds it: the top manifest and each cached platform."""

    top: Manifest
    record: BlobRecord | None
    platforms: list[Platform]

    @property
    def digests(self) -> list[str]:
        """Every manifest, config and layer of the image the cache knows of."""
        found = [self.top.digest]
        for platform in self.platforms:
            if platform.manifest.digest != self.top.digest:
                found.append(platform.manifest.digest)
            if platform.config is not None:
                found.append(platform.config)
            found.extend(layer["digest"] for layer in platform.layers)
        return list(dict.fromkeys(found))


def _document(manifest: Manifest) -> dict[str, Any]:
    try:
        document = json.loads(manifest.body or b"{}")
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _descriptor_digest(descriptor: Any) -> str | None:
    """The digest a descriptor names, if it is one we can use."""
    if not isinstance(descriptor, dict):
        return None
    try:
        return str(Digest.parse(str(descriptor.get("digest", ""))))
    except MirrorError:
        return None


def _size(descriptor: dict[str, Any]) -> int:
    size = descriptor.get("size")
    return size if isinstance(size, int) else 0


def _descriptors(document: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    """(digest, descriptor) for each usable descriptor of a manifest's list `key`."""
    listed = document.get(key)
    if not isinstance(listed, list):
        return []
    return [(digest, d) for d in listed if (digest := _descriptor_digest(d)) is not None]


async def _platform(
    request: web.Request, manifest: Manifest, spec: dict[str, Any] | None
) -> Platform:
    metadata = request.app[METADATA]
    document = _document(manifest)
    config = _descriptor_digest(document.get("config"))
    layers = _descriptors(document, "layers")
    # One read for them all: a round trip each queued behind whatever else the loop ran.
    records = await metadata.get_blobs(
        [manifest.digest, *([config] if config else []), *(d for d, _ in layers)]
    )
    if spec is None:
        spec = await _config_platform(request, config) if config else {}
    variant = spec.get("variant")
    return Platform(
        str(spec.get("os") or "unknown"),
        str(spec.get("architecture") or "unknown"),
        str(variant) if variant else None,
        manifest,
        records.get(manifest.digest),
        config,
        [
            {
                "digest": digest,
                "size": _size(layer),
                "media_type": str(layer.get("mediaType", "")),
                "cached": records.get(digest) is not None,
            }
            for digest, layer in layers
        ],
    )


async def _config_platform(request: web.Request, config: str) -> dict[str, Any]:
    """os, architecture and variant from an image config the cache holds."""
    store = request.app[STORE]
    digest = Digest.parse(config)
    size = await store.size(digest)
    if size is None or size > CONFIG_MAX:
        return {}
    body = await store.read_bytes(digest)
    try:
        document = json.loads(body or b"{}")
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


async def cached_image(request: web.Request, route: Route, reference: Reference) -> CachedImage:
    """The image `reference` names, as far as the cache holds it; never asks upstream."""
    metadata = request.app[METADATA]
    manifests = request.app[SERVICES].manifests
    if reference.tag is not None:
        tag = await metadata.get_tag(route.upstream, route.repository, reference.tag)
        if tag is None:
            raise ManifestUnknown("tag not in the cache", detail={"tag": reference.tag})
        digest = tag.digest
    else:
        digest = str(reference.digest)
        if not await _held_by(metadata, digest, route):
            raise ManifestUnknown("manifest not in the cache", detail={"digest": digest})
    top = await manifests.cached(digest)
    if top is None:
        raise ManifestUnknown("manifest not in the cache", detail={"digest": digest})
    platforms = []
    if top.media_type in INDEX_MEDIA_TYPES:
        for child_digest, entry in _descriptors(_document(top), "manifests"):
            child = await manifests.cached(child_digest)
            if child is None:
                continue  # a platform nobody pulled through this cache
            spec = entry.get("platform")
            platforms.append(
                await _platform(request, child, spec if isinstance(spec, dict) else {})
            )
    else:
        platforms.append(await _platform(request, top, None))
    return CachedImage(top, await metadata.get_blob(top.digest), platforms)


async def _held_by(metadata: MetadataStore, digest: str, route: Route) -> bool:
    """A manifest asked for by digest belongs to this repository: a digest alone must not
    show one repository's content under another's name."""
    return (route.upstream, route.repository) in await metadata.blob_repositories(digest)


# Endpoints: reading


async def session(request: web.Request) -> web.Response:
    viewer = request[VIEWER]
    return _json(
        {
            "user": viewer.user,
            "admin": viewer.admin,
            "csrf_token": request.app[GATE].csrf_token(viewer.user),
        }
    )


async def overview(request: web.Request) -> web.Response:
    app = request.app
    config, store = app[CONFIG], app[STORE]
    history = app[HISTORY]
    snapshot = app[CATALOG].snapshot
    disk = os.statvfs(store.root)
    body: dict[str, Any] = {
        "generated_at": history.now(),
        "usage": {
            "bytes": store.usage,
            "blobs": None if snapshot is None else snapshot.blobs,
            "max_size": store.quota.max_size,
            "disk_total": disk.f_blocks * disk.f_frsize,
            "disk_free": disk.f_bavail * disk.f_frsize,
            "counted_at": None if snapshot is None else snapshot.taken_at,
        },
        **history.view(),
    }
    # The lasting counters as of the snapshot, and what was served since.
    body["bytes_saved"]["total"] = (
        None if snapshot is None else snapshot.bytes_saved + history.since(snapshot.taken_at).saved
    )
    body["upstreams"] = [
        _upstream_view(name, config.upstreams[name], client)
        for name, client in app[UPSTREAMS].items()
    ]
    body["downloads"] = [
        dataclasses.asdict(download) for download in app[SERVICES].blobs.in_flight()
    ]
    body["recent_pulls"] = [dataclasses.asdict(pull) for pull in app[PULLS].newest_first()]
    body["replicas"] = await _replicas(request)
    return _json(body)


def _upstream_view(name: str, upstream: UpstreamConfig, client: UpstreamClient) -> dict[str, Any]:
    rate_limit = client.rate_limit
    state = client.settings.credentials.state
    chosen = upstream.credentials
    source = (
        "helper"
        if isinstance(chosen, HelperCredentialsConfig)
        else "ecr"
        if isinstance(chosen, EcrCredentialsConfig)
        else "gcp"
        if isinstance(chosen, GcpCredentialsConfig)
        else "password"
        if upstream.has_credentials
        else None
    )
    return {
        "name": name,
        "url": upstream.url,
        "last_success": client.health.last_success,
        "errors": client.health.recent_failures(ERRORS_WITHIN),
        "rate_limit": None
        if rate_limit is None or rate_limit.remaining is None
        else {"remaining": rate_limit.remaining, "limit": rate_limit.limit},
        "credentials": {
            "source": source,
            "state": "none" if source is None else "failing" if state.failing else "ok",
            "error": state.last_error if source is not None and state.failing else None,
        },
    }


async def _replicas(request: web.Request) -> list[dict[str, Any]]:
    if not request.app[CONFIG].fleet:
        return []
    try:
        alive = await request.app[METADATA].alive_replicas()
    except MetadataUnavailable:
        return []
    return [{"url": url, "alive": True} for url in sorted(alive)]


async def repositories(request: web.Request) -> web.Response:
    needle = request.query.get("q", "").lower()
    limit = _limit(request.query.get("limit"))
    after = _cursor(request.query.get("cursor"))
    viewer = request[VIEWER]
    catalog = request.app[CATALOG]
    chosen = []
    # Ordered by the name the cursor holds, so that pages never skip or repeat one.
    for name, upstream, repository in await catalog.repository_names():
        if after is not None and name <= after:
            continue
        if needle and needle not in name.lower():
            continue
        if not _may_see(request, viewer, upstream, repository):
            continue
        chosen.append((upstream, repository))
        if len(chosen) > limit:
            break
    page, more = chosen[:limit], len(chosen) > limit
    figures = await request.app[METADATA].repository_figures(page)
    listed = [
        {
            "upstream": upstream,
            "repository": repository,
            "tags": figures[upstream, repository].tags,
            "last_pulled": figures[upstream, repository].last_pulled,
        }
        for upstream, repository in page
    ]
    next_cursor = None
    if more and page:
        last = f"{page[-1][0]}/{page[-1][1]}"
        next_cursor = base64.urlsafe_b64encode(last.encode()).decode()
    return _json({"repositories": listed, "next": next_cursor})


def _limit(text: str | None) -> int:
    if text is None:
        return PAGE_DEFAULT
    # ASCII digits only (str.isdigit() also takes "²"), and few: int() refuses thousands.
    if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= PAGE_MAX:
        raise BadRequest(f"limit is a number from 1 to {PAGE_MAX}")
    return int(text)


def _cursor(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return base64.urlsafe_b64decode(text.encode()).decode()
    except ValueError:
        raise BadRequest("invalid cursor") from None


async def tags(request: web.Request) -> web.Response:
    route = _route(request, request.query.get("upstream"), request.query.get("repository"))
    metadata = request.app[METADATA]
    listed = []
    for tag in await metadata.list_tags(route.upstream, route.repository):
        record = await metadata.get_tag(route.upstream, route.repository, tag)
        if record is not None:
            listed.append(
                {
                    "tag": tag,
                    "digest": record.digest,
                    "media_type": record.media_type,
                    "checked_at": record.checked_at,
                }
            )
    return _json({"tags": listed})


async def manifest(request: web.Request) -> web.Response:
    route = _route(request, request.query.get("upstream"), request.query.get("repository"))
    reference = Reference.parse(_text(request.query.get("reference"), "reference"))
    image = await cached_image(request, route, reference)
    record = image.record
    return _json(
        {
            "digest": image.top.digest,
            "media_type": image.top.media_type,
            "size": image.top.size,
            "pinned": record is not None and record.pinned,
            "first_pulled": None if record is None else record.created_at,
            "last_pulled": None if record is None else record.last_access,
            "platforms": [
                {
                    "os": platform.os,
                    "architecture": platform.architecture,
                    "variant": platform.variant,
                    "digest": platform.manifest.digest,
                    "size": platform.manifest.size,
                    "pinned": platform.record is not None and platform.record.pinned,
                    "layers": platform.layers,
                }
                for platform in image.platforms
            ],
        }
    )


async def jobs(request: web.Request) -> web.Response:
    return _json({"jobs": [job.view() for job in await request.app[JOBS].all()]})


async def job(request: web.Request) -> web.Response:
    found = await request.app[JOBS].get(request.match_info["job_id"])
    if found is None:
        raise NameUnknown("no such job")
    return _json(found.view())


# Endpoints: actions


@contextlib.asynccontextmanager
async def _audited(
    request: web.Request,
    action: str,
    upstream: str | None,
    repository: str | None,
    reference: str | None,
) -> AsyncIterator[dict[str, Any]]:
    """One audit line for the action, whatever its outcome; the caller may add to it."""
    extra: dict[str, Any] = {}
    outcome = "ok"
    try:
        yield extra
    except MirrorError as exc:
        outcome = f"failed: {exc.code}"
        extra["error"] = exc.message
        raise
    except BaseException:
        outcome = "failed"
        raise
    finally:
        audit_log.info(
            "console_action",
            user=request[VIEWER].user,
            remote=request.remote,
            action=action,
            upstream=upstream,
            repository=repository,
            reference=reference,
            outcome=outcome,
            **extra,
        )


async def _image_action(request: web.Request, key: str) -> tuple[Route, Reference, str]:
    """The image an action's body names: upstream, repository, and `key` (the reference)."""
    body = await _body(request)
    route = _route(request, body.get("upstream"), body.get("repository"))
    text = _text(body.get(key), key)
    return route, Reference.parse(text), text


async def pin(request: web.Request) -> web.Response:
    return await _set_pinned(request, pinned=True)


async def unpin(request: web.Request) -> web.Response:
    return await _set_pinned(request, pinned=False)


async def _set_pinned(request: web.Request, *, pinned: bool) -> web.Response:
    action = "pin" if pinned else "unpin"
    route, reference, text = await _image_action(request, "reference")
    async with _audited(request, action, route.upstream, route.repository, text) as extra:
        image = await cached_image(request, route, reference)
        marked = await set_pinned(request.app[METADATA], image.digests, pinned=pinned)
        extra["digests"] = len(marked)
    return _json({"digests": marked})


async def refresh(request: web.Request) -> web.Response:
    route, reference, text = await _image_action(request, "tag")
    async with _audited(request, "refresh", route.upstream, route.repository, text) as extra:
        if reference.tag is None:
            raise BadRequest("refresh takes a tag: a digest never changes")
        found = await request.app[SERVICES].manifests.refresh(route, reference.tag)
        extra["digest"] = found.digest
    request.app[CATALOG].changed()
    return _json({"digest": found.digest})


async def evict(request: web.Request) -> web.Response:
    route, reference, text = await _image_action(request, "reference")
    app = request.app
    async with _audited(request, "evict", route.upstream, route.repository, text) as extra:
        image = await cached_image(request, route, reference)
        digests = image.digests
        records = await app[METADATA].get_blobs(digests)
        pinned = [d for d, record in records.items() if record.pinned]
        if pinned:
            raise Conflict("the image is pinned: unpin it first", detail={"pinned": pinned[:20]})
        removed, freed = await _evict(request, [d for d in digests if records.get(d)])
        if reference.tag is not None:
            await app[METADATA].delete_tag(route.upstream, route.repository, reference.tag)
        extra.update(digests=len(removed), freed=freed)
    app[CATALOG].changed()
    return _json({"digests": removed, "freed": freed})


async def _evict(request: web.Request, digests: list[str]) -> tuple[list[str], int]:
    """Remove the blobs (files and records) no client is reading or fetching now."""
    app = request.app
    store, metadata = app[STORE], app[METADATA]
    # Told as eviction tells it: the manifest memory, and a fleet's holder records.
    listener = eviction_listener(app[SERVICES].manifests, app[CORE].fleet)
    busy = app[SERVICES].blobs.in_use()
    removed, freed = [], 0
    for digest in digests:
        if digest in busy:
            continue  # being sent or fetched: eviction's own rule
        freed += await store.delete(Digest.parse(digest))
        await metadata.delete_blob(digest)
        await listener(digest)
        removed.append(digest)
    return removed, freed


async def seed(request: web.Request) -> web.Response:
    body = await _body(request)
    references = body.get("references")
    if (
        not isinstance(references, list)
        or not references
        or len(references) > SEED_MAX
        or not all(isinstance(r, str) and r.strip() for r in references)
    ):
        raise BadRequest(f"references is a list of 1 to {SEED_MAX} image references")
    platforms = body.get("platforms")
    if platforms is not None and (
        not isinstance(platforms, list) or not all(isinstance(p, str) and p for p in platforms)
    ):
        raise BadRequest('platforms is null or a list like ["linux/amd64"]')
    pin_them = body.get("pin", False)
    if not isinstance(pin_them, bool):
        raise BadRequest("pin is true or false")
    core = request.app[CORE]
    summary = ", ".join(references)[:500]
    async with _audited(request, "seed", None, None, summary) as extra:
        for text in references:
            ref = parse_image_reference(text, core.router)  # refuse bad names up front
            if not _may_see(request, request[VIEWER], ref.route.upstream, ref.route.repository):
                raise NameUnknown("no such repository", detail={"reference": text[:200]})
        started = await request.app[JOBS].start_seed(
            core, references, platforms, pin=pin_them, user=request[VIEWER].user
        )
        extra["job"] = started.id
    return _json({"job": started.id})


def setup(app: web.Application) -> None:
    """Add the `/api/v1/` routes."""
    routes = app.router
    for path, handler in (
        ("session", session),
        ("overview", overview),
        ("repositories", repositories),
        ("tags", tags),
        ("manifest", manifest),
        ("jobs", jobs),
        ("jobs/{job_id}", job),
    ):
        routes.add_get(f"/api/v1/{path}", handler, expect_handler=expect_handler)
    for path, handler in (
        ("pin", pin),
        ("unpin", unpin),
        ("refresh", refresh),
        ("evict", evict),
        ("seed", seed),
    ):
        routes.add_post(f"/api/v1/{path}", handler, expect_handler=expect_handler)
