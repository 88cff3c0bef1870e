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
recorded. A corrupted or malformed bundle is refused whole (a `BundleError` naming the
file and key), and the cache is left as it was. Links, special files and names that
climb out of the layout are refused, not followed.
Importing the same bundle twice changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import lzma
import os
import stat
import tarfile
import time
import zlib
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from mirror.core import MirrorCore
from mirror.errors import BundleError, MirrorError
from mirror.metadata.base import BlobRecord, TagRecord
from mirror.oci import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, OCI_INDEX, Digest
from mirror.seed import ImageRef, image_contents, parse_image_reference
from mirror.storage.blobstore import BlobStore, BlobWriter

log = structlog.get_logger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT = b'{"imageLayoutVersion": "1.0.0"}'
CHUNK = 1024 * 1024


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
                async with core.store.local_copy(Digest.parse(digest)) as path:
                    if path is None:
                        raise BundleError(
                            f"{text}: blob {digest} is not in the cache (seed it first)"
                        )
                    await asyncio.to_thread(writer.add_file, _blob_name(digest), path)
                    size = path.stat().st_size
                written.add(digest)
                report.blobs += 1
                report.bytes += size
                progress(f"  {digest} ({size} bytes)")
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
#
# Everything in a bundle is untrusted: each value read from it is checked for type and
# form before use, and a problem is a BundleError naming the file and the key
# (`index.json: manifests[1].digest: ...`), never a KeyError or a traceback.

INDEX_LIMIT = 16 * 1024 * 1024  # an index.json this large is not a layout of images
LAYOUT_LIMIT = 64 * 1024


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
    index: bytes | None = None
    layout_file: bytes | None = None

    def discard(self) -> None:
        for item in self.staged.values():
            if item.writer is not None:
                item.writer.discard()


@dataclass(frozen=True, slots=True)
class _Where:
    """A place in the bundle, for messages: a file and a key path inside it."""

    file: str
    path: str = ""

    def key(self, name: str) -> _Where:
        return _Where(self.file, f"{self.path}.{name}" if self.path else name)

    def item(self, index: int) -> _Where:
        return _Where(self.file, f"{self.path}[{index}]")

    def __str__(self) -> str:
        return f"{self.file}: {self.path}" if self.path else self.file


@dataclass(frozen=True, slots=True)
class _Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, Any]


def _show(value: object) -> str:
    """A bundle's value, quoted and cut short: it may be long or hold control characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_object(data: bytes, where: _Where) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError included
        raise BundleError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BundleError(f"{where}: expected a JSON object, found {type(document).__name__}")
    return document


def _required(mapping: dict[str, Any], name: str, kind: type, where: _Where) -> Any:
    at = where.key(name)
    if name not in mapping:
        raise BundleError(f"{at} is missing")
    value = mapping[name]
    # bool is an int to Python, never to JSON's readers.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BundleError(f"{at}: expected {_KINDS[kind]}, found {_show(value)}")
    return value


_KINDS: dict[type, str] = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _descriptor(value: object, where: _Where) -> _Descriptor:
    """An OCI descriptor: mediaType, digest and size are required, annotations optional."""
    if not isinstance(value, dict):
        raise BundleError(f"{where}: expected a descriptor object, found {_show(value)}")
    media_type = _required(value, "mediaType", str, where)
    digest_text = _required(value, "digest", str, where)
    size = _required(value, "size", int, where)
    try:
        digest = Digest.parse(digest_text)
    except MirrorError:
        raise BundleError(
            f"{where.key('digest')}: {_show(digest_text)} is not a valid digest"
        ) from None
    if size < 0:
        raise BundleError(f"{where.key('size')}: {size} is negative")
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise BundleError(f"{where.key('annotations')}: expected an object")
    return _Descriptor(media_type, digest, size, annotations)


def _check_layout_file(data: bytes | None) -> None:
    if data is None:
        raise BundleError("not an OCI image layout: oci-layout is missing")
    where = _Where("oci-layout")
    version = _required(_json_object(data, where), "imageLayoutVersion", str, where)
    if version.split(".")[0] != "1":
        raise BundleError(
            f"{where.key('imageLayoutVersion')}: {_show(version)}; only 1.x layouts are known"
        )


def _index_entries(data: bytes | None) -> list[_Descriptor]:
    if data is None:
        raise BundleError("not an OCI image layout: index.json is missing")
    where = _Where("index.json")
    if len(data) > INDEX_LIMIT:
        raise BundleError(f"{where} is larger than {INDEX_LIMIT} bytes")
    index = _json_object(data, where)
    if "schemaVersion" in index and index["schemaVersion"] != 2:
        raise BundleError(f"{where.key('schemaVersion')}: {_show(index['schemaVersion'])}, not 2")
    entries = _required(index, "manifests", list, where)
    return [_descriptor(entry, where.key("manifests").item(i)) for i, entry in enumerate(entries)]


def _image_name(entry: _Descriptor, where: _Where) -> str | None:
    for key in (CONTAINERD_NAME, REF_NAME):
        name = entry.annotations.get(key)
        if name is None:
            continue
        if not isinstance(name, str) or not name:
            raise BundleError(f"{where.key('annotations')}[{key}]: {_show(name)} is not a name")
        return name
    return None


def _refuse_member(bundle: Path, name: str, problem: str) -> BundleError:
    return BundleError(f"{bundle}: {_show(name)} {problem}; a layout holds only plain files")


def _tar_name(bundle: Path, member: tarfile.TarInfo) -> str:
    name = member.name.removeprefix("./")
    if name.startswith("/") or ".." in name.split("/"):
        raise _refuse_member(bundle, member.name, "points outside the layout")
    if member.issym() or member.islnk():
        raise _refuse_member(bundle, member.name, f"is a link (to {_show(member.linkname)})")
    if not (member.isfile() or member.isdir()):
        raise _refuse_member(bundle, member.name, "is not a regular file")
    return name


def _members(bundle: Path) -> Generator[tuple[str, IO[bytes]], None, None]:
    """(name, open stream) for every file of a layout directory or tar, in stored order.

    Links and special files are refused rather than followed: a link could make the
    import read any file on this host, and a fifo would hang it.
    """
    if bundle.is_dir():
        for directory, dirs, files in os.walk(bundle):
            dirs.sort()
            for entry in [*dirs, *sorted(files)]:
                path = Path(directory, entry)
                name = path.relative_to(bundle).as_posix()
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    raise _refuse_member(bundle, name, "is a link")
                if stat.S_ISDIR(mode):
                    continue
                if not stat.S_ISREG(mode):
                    raise _refuse_member(bundle, name, "is not a regular file")
                with open(path, "rb") as file:
                    yield name, file
        return
    with tarfile.open(bundle, "r:*") as tar:
        for member in tar:
            name = _tar_name(bundle, member)
            stream = tar.extractfile(member) if member.isfile() else None
            if stream is not None:
                with stream:
                    yield name, stream


def _stage_blob(store: BlobStore, name: str, stream: IO[bytes]) -> _Staged:
    algorithm, _, hex_digest = name.removeprefix("blobs/").partition("/")
    try:
        digest = Digest.parse(f"{algorithm}:{hex_digest}")
    except MirrorError:
        raise BundleError(f"the bundle has a blob with an invalid name: {_show(name)}") from None
    # A blob already in a local store is read, not staged again; elsewhere (an object
    # store) it is staged, and the commit finds it there.
    local = store.local_path(digest)
    writer = None if local is not None and local.exists() else store.new_writer(digest)
    hasher = digest.hasher()
    size = 0
    try:
        while chunk := stream.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            if writer is not None:
                writer.write(chunk)
        if hasher.hexdigest() != digest.hex:
            raise BundleError(f"the bundle is corrupt: blob {digest} does not match its digest")
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
    name = ""  # the member being read, for messages
    try:
        with closing(_members(bundle)) as members:
            for name, stream in members:
                if name == "oci-layout":
                    layout.layout_file = stream.read(LAYOUT_LIMIT + 1)
                elif name == "index.json":
                    layout.index = stream.read(INDEX_LIMIT + 1)
                elif name.startswith("blobs/"):
                    item = _stage_blob(store, name, stream)
                    if str(item.digest) in layout.staged:
                        if item.writer is not None:
                            item.writer.discard()
                        raise BundleError(f"{bundle}: {_show(name)} appears twice")
                    layout.staged[str(item.digest)] = item
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        layout.discard()  # a truncated or damaged archive
        where = f"at {_show(name)}" if name else "at its start"
        raise BundleError(f"{bundle} is not a readable tar ({exc}), {where}") from None
    except OSError as exc:
        layout.discard()  # unreadable, or no room in tmp/ to stage it
        what = f"{bundle}: {name}" if name else str(bundle)
        raise BundleError(f"{what}: {exc.strerror or exc}") from None
    except BaseException:
        layout.discard()
        raise
    return layout


def _body(store: BlobStore, item: _Staged) -> bytes:
    path = item.writer.temp_path if item.writer is not None else store.local_path(item.digest)
    assert path is not None  # not staged: only ever a blob in a local store
    data: bytes = path.read_bytes()
    return data


def _reach(layout: _Layout, descriptor: _Descriptor, where: _Where) -> _Staged:
    """The staged blob a descriptor names, which must be there and of its size."""
    item = layout.staged.get(str(descriptor.digest))
    if item is None:
        raise BundleError(f"{where.key('digest')}: the bundle lacks blob {descriptor.digest}")
    if item.size != descriptor.size:
        raise BundleError(
            f"{where.key('size')}: {descriptor.size}, but blob {descriptor.digest} "
            f"holds {item.size} bytes"
        )
    return item


def _walk(
    store: BlobStore, layout: _Layout, top: _Descriptor, where: _Where
) -> tuple[dict[str, str | None], dict[str, bytes]]:
    """Every digest an index.json entry reaches: digest -> media type (None for a
    plain blob), and the manifests' bodies."""
    reached: dict[str, str | None] = {}
    bodies: dict[str, bytes] = {}
    pending = [(top, where)]
    while pending:
        descriptor, at = pending.pop()
        digest = str(descriptor.digest)
        if digest in reached:
            continue
        if descriptor.media_type not in MANIFEST_MEDIA_TYPES:
            raise BundleError(
                f"{at.key('mediaType')}: {_show(descriptor.media_type)} is not a manifest type"
            )
        item = _reach(layout, descriptor, at)
        reached[digest] = descriptor.media_type
        body = _body(store, item)
        bodies[digest] = body
        inside = _Where(_blob_name(digest))
        document = _json_object(body, inside)
        if descriptor.media_type in INDEX_MEDIA_TYPES:
            children = _required(document, "manifests", list, inside)
            for i, child in enumerate(children):
                child_at = inside.key("manifests").item(i)
                entry = _descriptor(child, child_at)
                # An index may list platforms that were never seeded: those stay out.
                if str(entry.digest) in layout.staged:
                    pending.append((entry, child_at))
            continue
        layers = document.get("layers", [])
        if not isinstance(layers, list):
            raise BundleError(f"{inside.key('layers')}: expected a list, found {_show(layers)}")
        described = [(document.get("config"), inside.key("config"))]
        described += [(layer, inside.key("layers").item(i)) for i, layer in enumerate(layers)]
        for value, value_at in described:
            blob = _descriptor(value, value_at)
            _reach(layout, blob, value_at)
            reached.setdefault(str(blob.digest), None)
    return reached, bodies


async def import_bundle(core: MirrorCore, bundle: Path) -> ImportReport:
    """Verify everything, then commit and record it; see the module docstring.

    A BundleError means nothing was committed or recorded."""
    if not await asyncio.to_thread(bundle.exists):
        raise BundleError(f"{bundle} does not exist")
    layout = await asyncio.to_thread(_stage_all, core.store, bundle)
    report = ImportReport()
    try:
        _check_layout_file(layout.layout_file)
        images: list[tuple[ImageRef | None, _Descriptor, dict[str, str | None]]] = []
        for i, entry in enumerate(_index_entries(layout.index)):
            where = _Where("index.json", f"manifests[{i}]")
            name = _image_name(entry, where)
            ref = None
            if name is not None:
                try:
                    ref = parse_image_reference(name, core.router)
                except MirrorError as exc:
                    raise BundleError(
                        f"{where.key('annotations')}: {_show(name)}: {exc.message} "
                        "(configure its registry as an upstream)"
                    ) from None
            reached, _ = await asyncio.to_thread(_walk, core.store, layout, entry, where)
            images.append((ref, entry, reached))
        # Everything verified and understood: commit, then record.
        wanted = {digest for _, _, reached in images for digest in reached}
        for digest, item in layout.staged.items():
            if digest not in wanted or item.writer is None:
                report.blobs_present += digest in wanted
                continue
            if not await core.store.commit(item.writer):
                report.blobs_present += 1
                continue
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
                digest=str(entry.digest), media_type=entry.media_type, checked_at=now
            )
            await core.metadata.put_tag(
                ref.route.upstream, ref.route.repository, ref.reference.tag, record
            )
        report.images.append(ref.canonical)
    return report
