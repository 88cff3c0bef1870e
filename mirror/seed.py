"""`mirror seed`: fetch a list of images into the cache ahead of time.

References are written as users write them (`nginx:1.27`, `docker.io/library/nginx:1.27`,
`ghcr.io/org/app@sha256:...`) and routed like client requests: a first component that
looks like a registry names a configured upstream (or alias), anything else goes to the
default upstream. For an index, the index is kept byte-exact and the selected
platforms' manifests and blobs are fetched (by default this host's platform). Blobs
already cached are skipped, so a seed can be run again to resume. `--pin` marks
everything seeded as never evicted.

The walk over an image (`image_contents`) is shared with `mirror export`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from mirror.core import MirrorCore
from mirror.errors import MetadataUnavailable, MirrorError, NameInvalid
from mirror.metadata.base import MetadataStore
from mirror.oci import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    AcceptSet,
    Digest,
    Reference,
)
from mirror.routing import Route, Router

log = structlog.get_logger(__name__)

ACCEPT_ALL = AcceptSet(frozenset(MANIFEST_MEDIA_TYPES), wildcard=True)
_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def host_platform() -> str:
    machine = platform.machine().lower()
    return f"linux/{_MACHINES.get(machine, machine)}"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A user's image reference, resolved to a route."""

    text: str
    route: Route
    reference: Reference

    @property
    def canonical(self) -> str:
        """`<upstream>/<repository>:<tag>` or `...@<digest>`: the name bundles carry."""
        separator = "@" if self.reference.digest is not None else ":"
        return f"{self.route.upstream}/{self.route.repository}{separator}{self.reference}"


def parse_image_reference(text: str, router: Router) -> ImageRef:
    text = text.strip()
    name, at, digest_text = text.partition("@")
    tag = None
    if not at:
        head, colon, maybe_tag = name.rpartition(":")
        if colon and "/" not in maybe_tag:
            name, tag = head, maybe_tag
    reference = Reference.parse(digest_text if at else (tag or "latest"))
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        route = router.resolve(rest, namespace=first)
    elif not name:
        raise NameInvalid("empty image reference", detail={"reference": text})
    else:
        route = router.resolve(name)
    return ImageRef(text, route, reference)


@dataclass
class ImageContents:
    """What one reference stands for in the cache."""

    top_digest: str
    top_media_type: str
    manifests: list[tuple[str, str, bytes]] = field(default_factory=list)  # digest, type, body
    blobs: list[tuple[str, int]] = field(default_factory=list)  # digest, size
    skipped_platforms: list[str] = field(default_factory=list)


def _platform_of(entry: dict[str, Any]) -> str:
    spec = entry.get("platform") or {}
    text = f"{spec.get('os', '')}/{spec.get('architecture', '')}"
    return f"{text}/{spec['variant']}" if spec.get("variant") else text


def _selected(entry: dict[str, Any], platforms: Sequence[str] | None) -> bool:
    if platforms is None:
        return True
    found = _platform_of(entry)
    return any(found == wanted or found.startswith(wanted + "/") for wanted in platforms)


async def image_contents(
    core: MirrorCore,
    ref: ImageRef,
    platforms: Sequence[str] | None,
    *,
    fetch_blobs: bool,
    cached_only: bool = False,
) -> ImageContents:
    """Walk an image from its reference: manifests (fetched into the cache if missing,
    or with `cached_only` skipped) and blobs (fetched when `fetch_blobs`). `platforms`
    None means every platform."""
    top = await core.manifests.get(ref.route, ref.reference, ACCEPT_ALL)
    assert top.body is not None
    contents = ImageContents(top.digest, top.media_type)
    pending = [(top.digest, top.media_type, top.body)]
    while pending:
        digest, media_type, body = pending.pop(0)
        contents.manifests.append((digest, media_type, body))
        document = json.loads(body)
        if media_type in INDEX_MEDIA_TYPES:
            for entry in document.get("manifests", []):
                if not _selected(entry, platforms):
                    contents.skipped_platforms.append(_platform_of(entry))
                    continue
                if cached_only:
                    held = await core.manifests.cached(str(Digest.parse(entry["digest"])))
                    if held is None:
                        contents.skipped_platforms.append(_platform_of(entry))
                        continue
                    child = held
                else:
                    child = await core.manifests.get(
                        ref.route, Reference(digest=Digest.parse(entry["digest"])), ACCEPT_ALL
                    )
                assert child.body is not None
                pending.append((child.digest, child.media_type, child.body))
            continue
        descriptors = [document.get("config"), *document.get("layers", [])]
        for descriptor in descriptors:
            if not descriptor:
                continue
            blob = Digest.parse(descriptor["digest"])
            if fetch_blobs:
                size, _ = await core.blobs.ensure(ref.route, blob)
            else:
                size = int(descriptor.get("size", 0))
            contents.blobs.append((str(blob), size))
    return contents


@dataclass
class SeedOutcome:
    ref: str
    digest: str | None = None
    blobs: int = 0
    fetched: int = 0
    bytes: int = 0
    error: str | None = None


async def seed_one(
    core: MirrorCore, text: str, platforms: Sequence[str] | None, *, pin: bool, progress: Any
) -> SeedOutcome:
    outcome = SeedOutcome(text)
    try:
        ref = parse_image_reference(text, core.router)
        contents = await image_contents(core, ref, platforms, fetch_blobs=False)
        outcome.digest = contents.top_digest
        progress.start(text, total=sum(size for _, size in contents.blobs))
        for blob, size in contents.blobs:
            _, fetched = await core.blobs.ensure(ref.route, Digest.parse(blob))
            outcome.blobs += 1
            outcome.fetched += int(fetched)
            outcome.bytes += size
            progress.advance(text, size)
        if pin:
            await _pin(core, [d for d, _, _ in contents.manifests] + [d for d, _ in contents.blobs])
        progress.finish(text, outcome)
    except MirrorError as exc:
        outcome.error = exc.message
        progress.fail(text, exc.message)
    return outcome


async def _pin(core: MirrorCore, digests: list[str]) -> None:
    await set_pinned(core.metadata, digests, pinned=True)


async def set_pinned(metadata: MetadataStore, digests: Sequence[str], *, pinned: bool) -> list[str]:
    """Mark the recorded blobs among `digests` pinned (never evicted) or not; return the
    digests that have a record."""
    marked = []
    for digest in digests:
        record = await metadata.get_blob(digest)
        if record is None:
            continue
        marked.append(digest)
        if record.pinned != pinned:
            await metadata.put_blob(digest, dataclasses.replace(record, pinned=pinned))
    return marked


class PlainProgress:
    """One line per event: what CI logs want."""

    def start(self, ref: str, total: int) -> None:
        print(f"seeding {ref} ({total} bytes of blobs)", flush=True)

    def advance(self, ref: str, size: int) -> None:
        """Blob by blob is too chatty for a log; the summary says it all."""

    def finish(self, ref: str, outcome: SeedOutcome) -> None:
        print(
            f"ok      {ref} {outcome.digest}: {outcome.blobs} blobs, "
            f"{outcome.fetched} fetched, {outcome.blobs - outcome.fetched} already cached",
            flush=True,
        )

    def fail(self, ref: str, message: str) -> None:
        print(f"FAILED  {ref}: {message}", flush=True)


class BarProgress:
    """A live bar per reference, on a terminal."""

    def __init__(self, progress: Progress):
        self._progress = progress
        self._tasks: dict[str, Any] = {}

    def start(self, ref: str, total: int) -> None:
        self._tasks[ref] = self._progress.add_task(ref, total=total or 1)

    def advance(self, ref: str, size: int) -> None:
        self._progress.advance(self._tasks[ref], size)

    def finish(self, ref: str, outcome: SeedOutcome) -> None:
        task = self._tasks.get(ref)
        if task is not None:
            self._progress.update(task, completed=self._progress.tasks[task].total)

    def fail(self, ref: str, message: str) -> None:
        self._progress.console.print(f"[red]FAILED[/red] {ref}: {message}")


async def seed(
    core: MirrorCore,
    references: Sequence[str],
    platforms: Sequence[str] | None,
    *,
    pin: bool,
    concurrency: int,
    progress: Any = None,
) -> list[SeedOutcome]:
    """Seed `references` (`concurrency` at a time), reporting to `progress` (by default
    bars on a terminal, plain lines otherwise)."""
    limiter = asyncio.Semaphore(max(concurrency, 1))

    async def one(text: str, reporter: Any) -> SeedOutcome:
        async with limiter:
            return await seed_one(core, text, platforms, pin=pin, progress=reporter)

    if progress is not None:
        outcomes = await asyncio.gather(*(one(t, progress) for t in references))
    elif sys.stdout.isatty():
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns) as bars:
            outcomes = await asyncio.gather(*(one(t, BarProgress(bars)) for t in references))
    else:
        plain = PlainProgress()
        outcomes = await asyncio.gather(*(one(t, plain) for t in references))
    try:
        await core.blobs.flush_access()
    except MetadataUnavailable:
        log.warning("access_times_not_saved")
    return list(outcomes)
