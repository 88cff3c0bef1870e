"""Bundles for air-gapped sites: the cache's images as a standard OCI image layout.

`export` writes `oci-layout`, `index.json` and `blobs/<alg>/<hex>` into a directory or a
tar (streamed: blobs go from the cache files into the archive, never all in memory).
Each image in `index.json` carries `org.opencontainers.image.ref.name` (and containerd's
`io.containerd.image.name`) set to its full source reference, e.g.
`docker.io/library/nginx:1.27`, so `skopeo ... oci-archive:FILE:REF` and other OCI tools
read the bundle directly, and `import` knows which upstream, repository and tag each
image belongs to.

`import` verifies every blob's digest while staging it in tmp/; only when all of them
verify, and every reference names a configured upstream, is anything committed and
recorded. A corrupted bundle is refused whole, and the cache is left as it was.
Importing the same bundle twice changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from mirror.core import MirrorCore
from mirror.errors import MirrorError
from mirror.metadata.base import BlobRecord, TagRecord
from mirror.oci import INDEX_MEDIA_TYPES, OCI_INDEX, Digest
from mirror.seed import ImageRef, image_contents, parse_image_reference
from mirror.storage.blobstore import BlobStore, BlobWriter

log = structlog.get_logger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT = b'{"imageLayoutVersion": "1.0.0"}'
CHUNK = 1024 * 1024


class BundleError(MirrorError):
    code, status = "MANIFEST_INVALID", 400


# Export


@dataclass
class ExportReport:
    images: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    skipped_platforms: dict[str, list[str]] = field(default_factory=dict)


def _blob_name(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"blobs/{algorithm}/{hex_digest}"


class _LayoutWriter:
    """Writes a layout into a directory or a tar, one entry at a time."""

    def __init__(self, output: Path):
        self._tar: tarfile.TarFile | None = None
        self._dir: Path | None = None
        if output.suffix == ".tar":
            output.parent.mkdir(parents=True, exist_ok=True)
            self._tar = tarfile.open(output, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        else:
            output.mkdir(parents=True, exist_ok=True)
            self._dir = output

    def add_bytes(self, name: str, data: bytes) -> None:
        if self._tar is not None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            self._tar.addfile(info, _BytesReader(data))
        else:
            assert self._dir is not None
            target = self._dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def add_file(self, name: str, source: Path) -> None:
        if self._tar is not None:
            info = self._tar.gettarinfo(str(source), arcname=name)
            info.mode, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, "", ""
            with open(source, "rb") as file:
                self._tar.addfile(info, file)
        else:
            assert self._dir is not None
            target = self._dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as src, open(target, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


class _BytesReader:
    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._offset + size
        chunk = self._data[self._offset : end]
        self._offset += len(chunk)
        return bytes(chunk)


async def export_bundle(
    core: MirrorCore,
    references: list[str],
    output: Path,
    *,
    progress: Callable[[str], None] = lambda line: None,
) -> ExportReport:
    """Write the images into an OCI layout at `output` (a directory, or FILE.tar)."""
    report = ExportReport()
    written: set[str] = set()
    entries = []
    writer = _LayoutWriter(output)
    try:
        for text in references:
            ref = parse_image_reference(text, core.router)
            # Only what the cache holds: children of an index that were never seeded are
            # left out (the index itself stays byte-exact).
            contents = await image_contents(core, ref, None, fetch_blobs=False, cached_only=True)
            name = ref.canonical
            for digest, _, body in contents.manifests:
                if digest not in written:
                    await asyncio.to_thread(writer.add_bytes, _blob_name(digest), body)
                    written.add(digest)
            for digest, _ in contents.blobs:
                if digest in written:
                    continue
                path = core.store.path(Digest.parse(digest))
                if not path.exists():
                    raise BundleError(f"{text}: blob {digest} is not in the cache (seed it first)")
                await asyncio.to_thread(writer.add_file, _blob_name(digest), path)
                written.add(digest)
                report.blobs += 1
                report.bytes += path.stat().st_size
                progress(f"  {digest} ({path.stat().st_size} bytes)")
            top_size = len(contents.manifests[0][2])
            entries.append(
                {
                    "mediaType": contents.top_media_type,
                    "digest": contents.top_digest,
                    "size": top_size,
                    "annotations": {REF_NAME: name, CONTAINERD_NAME: name},
                }
            )
            report.images.append(name)
            progress(f"exported {name} {contents.top_digest}")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        writer.add_bytes("oci-layout", LAYOUT)
        writer.add_bytes("index.json", json.dumps(index, indent=2).encode())
    finally:
        writer.close()
    return report


async def all_cached_references(core: MirrorCore) -> list[str]:
    """Every tag the cache holds, as `<upstream>/<repository>:<tag>`."""
    return [f"{u}/{r}:{t}" for u, r, t, _ in await core.metadata.tag_records()]


# Import


@dataclass
class ImportReport:
    images: list[str] = field(default_factory=list)
    blobs_added: int = 0
    blobs_present: int = 0
    bytes_added: int = 0


@dataclass
class _Staged:
    digest: Digest
    writer: BlobWriter | None  # None: the cache had it already (verified all the same)
    size: int


@dataclass
class _Layout:
    staged: dict[str, _Staged] = field(default_factory=dict)
    index: dict[str, Any] | None = None
    has_layout_file: bool = False

    def discard(self) -> None:
        for item in self.staged.values():
            if item.writer is not None:
                item.writer.discard()


def _members(bundle: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, open stream) for every file of a layout directory or tar, in stored order."""
    if bundle.is_dir():
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                with open(path, "rb") as file:
                    yield path.relative_to(bundle).as_posix(), file
        return
    try:
        with tarfile.open(bundle, "r:*") as tar:
            for member in tar:
                stream = tar.extractfile(member) if member.isfile() else None
                if stream is not None:
                    with stream:
                        yield member.name.removeprefix("./"), stream
    except tarfile.TarError as exc:
        raise BundleError(f"{bundle} is not a readable tar: {exc}") from None


def _stage_blob(store: BlobStore, name: str, stream: IO[bytes]) -> _Staged:
    algorithm, _, hex_digest = name.removeprefix("blobs/").partition("/")
    try:
        digest = Digest.parse(f"{algorithm}:{hex_digest}")
    except MirrorError:
        raise BundleError(f"the bundle has a blob with an invalid name: {name}") from None
    writer = None if store.size(digest) is not None else store.new_writer(digest)
    hasher = digest.hasher()
    size = 0
    try:
        while chunk := stream.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            if writer is not None:
                writer.write(chunk)
        if hasher.hexdigest() != digest.hex:
            raise BundleError(
                f"the bundle is corrupt: blob {digest} does not match its digest; "
                "nothing was imported"
            )
        if writer is not None:
            writer.flush()  # manifests are read back from the temp file
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return _Staged(digest, writer, size)


def _stage_all(store: BlobStore, bundle: Path) -> _Layout:
    """Read the whole bundle, verifying and staging every blob in tmp/."""
    layout = _Layout()
    try:
        for name, stream in _members(bundle):
            if name == "oci-layout":
                layout.has_layout_file = True
            elif name == "index.json":
                layout.index = json.loads(stream.read(16 * 1024 * 1024))
            elif name.startswith("blobs/"):
                item = _stage_blob(store, name, stream)
                layout.staged[str(item.digest)] = item
    except BaseException:
        layout.discard()
        raise
    return layout


def _body(store: BlobStore, item: _Staged) -> bytes:
    path = item.writer.temp_path if item.writer is not None else store.path(item.digest)
    data: bytes = path.read_bytes()
    return data


def _walk(
    store: BlobStore, layout: _Layout, top: dict[str, Any]
) -> tuple[dict[str, str | None], dict[str, bytes]]:
    """Every digest an index.json entry reaches: digest -> media type (None for a
    plain blob), and the manifests' bodies."""
    reached: dict[str, str | None] = {}
    bodies: dict[str, bytes] = {}
    pending = [(str(top["digest"]), str(top.get("mediaType", "")))]
    while pending:
        digest, media_type = pending.pop()
        if digest in reached:
            continue
        item = layout.staged.get(digest)
        if item is None:
            raise BundleError(
                f"the bundle lacks {digest}, which it references; nothing was imported"
            )
        reached[digest] = media_type
        body = _body(store, item)
        bodies[digest] = body
        try:
            document = json.loads(body)
        except ValueError:
            raise BundleError(f"manifest {digest} in the bundle is not JSON") from None
        if media_type in INDEX_MEDIA_TYPES:
            # An index may list platforms that were never seeded: those stay out.
            pending += [
                (str(m["digest"]), str(m.get("mediaType", "")))
                for m in document.get("manifests", [])
                if str(m["digest"]) in layout.staged
            ]
            continue
        for descriptor in [document.get("config"), *document.get("layers", [])]:
            if descriptor:
                blob = str(descriptor["digest"])
                if blob not in layout.staged:
                    raise BundleError(f"the bundle lacks blob {blob}; nothing was imported")
                reached.setdefault(blob, None)
    return reached, bodies


async def import_bundle(core: MirrorCore, bundle: Path) -> ImportReport:
    """Verify everything, then commit and record it; see the module docstring."""
    if not await asyncio.to_thread(bundle.exists):
        raise BundleError(f"{bundle} does not exist")
    layout = await asyncio.to_thread(_stage_all, core.store, bundle)
    report = ImportReport()
    try:
        if not layout.has_layout_file or layout.index is None:
            raise BundleError("not an OCI image layout: oci-layout or index.json is missing")
        images: list[tuple[ImageRef | None, dict[str, Any], dict[str, str | None]]] = []
        for entry in layout.index.get("manifests", []):
            annotations = entry.get("annotations") or {}
            name = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME)
            ref = None
            if name:
                try:
                    ref = parse_image_reference(name, core.router)
                except MirrorError as exc:
                    raise BundleError(
                        f"{name}: {exc.message} (configure its registry as an upstream); "
                        "nothing was imported"
                    ) from None
            reached, _ = await asyncio.to_thread(_walk, core.store, layout, entry)
            images.append((ref, entry, reached))
        # Everything verified and understood: commit, then record.
        wanted = {digest for _, _, reached in images for digest in reached}
        for digest, item in layout.staged.items():
            if digest not in wanted or item.writer is None:
                report.blobs_present += digest in wanted
                continue
            await asyncio.to_thread(item.writer.commit)
            report.blobs_added += 1
            report.bytes_added += item.size
    finally:
        layout.discard()
    now = time.time()
    for ref, entry, reached in images:
        for digest, media_type in reached.items():
            existing = await core.metadata.get_blob(digest)
            await core.metadata.put_blob(
                digest,
                BlobRecord(
                    size=layout.staged[digest].size,
                    created_at=existing.created_at if existing else now,
                    last_access=max(existing.last_access, now) if existing else now,
                    media_type=media_type or (existing.media_type if existing else None),
                    pinned=existing.pinned if existing else False,
                ),
            )
            if ref is not None:
                await core.metadata.add_blob_repository(
                    digest, ref.route.upstream, ref.route.repository
                )
        if ref is None:
            continue
        await core.metadata.add_repository(ref.route.upstream, ref.route.repository)
        if ref.reference.tag is not None:
            record = TagRecord(
                digest=str(entry["digest"]), media_type=str(entry["mediaType"]), checked_at=now
            )
            await core.metadata.put_tag(
                ref.route.upstream, ref.route.repository, ref.reference.tag, record
            )
        report.images.append(ref.canonical)
    return report
