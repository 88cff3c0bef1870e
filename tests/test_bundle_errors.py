"""`mirror import` of malformed bundles: every one ends in a message naming the file and
key, exit status 1, no traceback, and a cache (files, temp files and records) exactly as
it was.

The bundles are built here, byte by byte, from a small valid OCI layout; the valid one
imports, so each refusal is down to its one defect. No upstream is involved: the site is
offline, as an air-gapped one is.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import mirror_cli

from mirror.bundle import import_bundle
from mirror.config import load_config
from mirror.core import TempSweep, open_core
from mirror.errors import BundleError
from mirror.metadata.embedded import EmbeddedMetadataStore
from mirror.storage.blobstore import FilesystemBlobStore

REGISTRY = "reg.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()

Files = dict[str, bytes]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def valid_layout(name: str, seed: int) -> Files:
    """A one-image OCI layout, `reg.test/<name>`, its layer 64 KiB of seeded bytes."""
    layer = hashlib.sha256(str(seed).encode()).digest() * 2048
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor(OCI_MANIFEST, manifest, annotations={REF_NAME: f"{REGISTRY}/{name}"})
        ],
    }
    files = {"oci-layout": LAYOUT, "index.json": json.dumps(index).encode()}
    for data in (layer, config, manifest):
        files[blob_name(digest_of(data))] = data
    return files


def write_tar(files: Files, path: Path, extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    """The files, then `extra` members: what is staged before a refusal must go again."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for member in extra:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


def write_dir(files: Files, path: Path) -> Path:
    for name, data in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return path


# Edits of a valid layout, each introducing one defect.


def index_of(files: Files) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(files["index.json"])
    return document


def edit_index(change: Callable[[dict[str, Any]], object]) -> Callable[[Files], None]:
    def edit(files: Files) -> None:
        index = index_of(files)
        change(index)
        files["index.json"] = json.dumps(index).encode()

    return edit


def edit_entry(**values: Any) -> Callable[[Files], None]:
    """Set (or, with None, delete) keys of index.json's first entry."""

    def change(index: dict[str, Any]) -> None:
        entry = index["manifests"][0]
        for key, value in values.items():
            if value is None:
                del entry[key]
            else:
                entry[key] = value

    return edit_index(change)


def edit_manifest(change: Callable[[dict[str, Any]], object]) -> Callable[[Files], None]:
    """Change the image manifest in place; its blob and index.json's entry follow."""

    def edit(files: Files) -> None:
        document = json.loads(files[blob_name(index_of(files)["manifests"][0]["digest"])])
        change(document)
        manifest_body(json.dumps(document).encode())(files)

    return edit


def manifest_body(body: bytes) -> Callable[[Files], None]:
    """The image manifest's bytes replaced by `body`, under its own digest."""

    def edit(files: Files) -> None:
        index = index_of(files)
        entry = index["manifests"][0]
        del files[blob_name(entry["digest"])]
        files[blob_name(digest_of(body))] = body
        entry.update(digest=digest_of(body), size=len(body))
        files["index.json"] = json.dumps(index).encode()

    return edit


def replace(name: str, data: bytes | None) -> Callable[[Files], None]:
    def edit(files: Files) -> None:
        if data is None:
            del files[name]
        else:
            files[name] = data

    return edit


def drop_layer(files: Files) -> None:
    manifest = json.loads(files[blob_name(index_of(files)["manifests"][0]["digest"])])
    del files[blob_name(manifest["layers"][0]["digest"])]


def drop_manifest(files: Files) -> None:
    del files[blob_name(index_of(files)["manifests"][0]["digest"])]


def corrupt_layer(files: Files) -> None:
    manifest = json.loads(files[blob_name(index_of(files)["manifests"][0]["digest"])])
    name = blob_name(manifest["layers"][0]["digest"])
    files[name] = files[name][:-1] + b"?"


def entry_size_plus_one(files: Files) -> None:
    edit_index(lambda index: index["manifests"][0].update(size=index["manifests"][0]["size"] + 1))(
        files
    )


BAD_DIGEST = "sha256:" + "z" * 64
HEX = "a" * 64

CASES: dict[str, tuple[Callable[[Files], None], str]] = {
    "index-not-json": (replace("index.json", b"{not json"), "index.json is not valid JSON"),
    "index-not-utf8": (replace("index.json", b"\xff\xfe\x00"), "index.json is not valid JSON"),
    "index-a-list": (replace("index.json", b"[]"), "index.json: expected a JSON object"),
    "index-missing": (replace("index.json", None), "index.json is missing"),
    "schema-version-3": (
        edit_index(lambda index: index.update(schemaVersion=3)),
        "index.json: schemaVersion: 3, not 2",
    ),
    "manifests-missing": (
        edit_index(lambda index: index.pop("manifests")),
        "index.json: manifests is missing",
    ),
    "manifests-an-object": (
        edit_index(lambda index: index.update(manifests={"a": 1})),
        "index.json: manifests: expected a list",
    ),
    "entry-a-string": (
        edit_index(lambda index: index.update(manifests=["x"])),
        "index.json: manifests[0]: expected a descriptor object",
    ),
    "digest-missing": (edit_entry(digest=None), "index.json: manifests[0].digest is missing"),
    "media-type-missing": (
        edit_entry(mediaType=None),
        "index.json: manifests[0].mediaType is missing",
    ),
    "size-missing": (edit_entry(size=None), "index.json: manifests[0].size is missing"),
    "digest-not-hex": (
        edit_entry(digest=BAD_DIGEST),
        f"index.json: manifests[0].digest: '{BAD_DIGEST}' is not a valid digest",
    ),
    "digest-unknown-algorithm": (
        edit_entry(digest="md5:" + "a" * 32),
        "manifests[0].digest: 'md5:",
    ),
    "digest-control-characters": (
        edit_entry(digest="sha256:\r\nX-Evil: 1"),
        "manifests[0].digest: 'sha256:\\r\\nX-Evil: 1' is not a valid digest",
    ),
    "digest-a-number": (
        edit_entry(digest=12),
        "index.json: manifests[0].digest: expected a string, found 12",
    ),
    "size-a-string": (
        edit_entry(size="123"),
        "index.json: manifests[0].size: expected an integer, found '123'",
    ),
    "size-a-bool": (edit_entry(size=True), "manifests[0].size: expected an integer, found True"),
    "size-negative": (edit_entry(size=-1), "index.json: manifests[0].size: -1 is negative"),
    "size-wrong": (entry_size_plus_one, "index.json: manifests[0].size: "),
    "media-type-not-a-manifest": (
        edit_entry(mediaType="text/plain"),
        "index.json: manifests[0].mediaType: 'text/plain' is not a manifest type",
    ),
    "annotations-a-list": (
        edit_entry(annotations=["x"]),
        "index.json: manifests[0].annotations: expected an object",
    ),
    "ref-name-a-number": (
        edit_entry(annotations={REF_NAME: 5}),
        f"manifests[0].annotations[{REF_NAME}]: 5 is not a name",
    ),
    "ref-name-unknown-registry": (
        edit_entry(annotations={REF_NAME: "elsewhere.test/app:1"}),
        "no upstream is configured",
    ),
    "manifest-blob-missing": (drop_manifest, "manifests[0].digest: the bundle lacks blob sha256:"),
    "layer-blob-missing": (drop_layer, "layers[0].digest: the bundle lacks blob sha256:"),
    "layer-corrupt": (corrupt_layer, "does not match its digest"),
    "manifest-a-list": (manifest_body(b"[]"), "expected a JSON object, found list"),
    "manifest-not-json": (manifest_body(b"\x1f\x8b gzip?"), "is not valid JSON"),
    "manifest-layers-a-string": (
        edit_manifest(lambda m: m.update(layers="x")),
        "layers: expected a list, found 'x'",
    ),
    "manifest-config-missing": (
        edit_manifest(lambda m: m.pop("config")),
        "config: expected a descriptor object, found None",
    ),
    "manifest-layer-digest-missing": (
        edit_manifest(lambda m: m["layers"][0].pop("digest")),
        "layers[0].digest is missing",
    ),
    "blob-name-invalid": (
        replace("blobs/sha256/not-a-digest", b"x"),
        "a blob with an invalid name: 'blobs/sha256/not-a-digest'",
    ),
    "oci-layout-missing": (replace("oci-layout", None), "oci-layout is missing"),
    "oci-layout-not-json": (replace("oci-layout", b"1.0.0"), "oci-layout is not valid JSON"),
    "oci-layout-a-string": (replace("oci-layout", b'"1.0.0"'), "oci-layout: expected a JSON"),
    "oci-layout-version-2": (
        replace("oci-layout", b'{"imageLayoutVersion": "2.0.0"}'),
        "oci-layout: imageLayoutVersion: '2.0.0'",
    ),
    "oci-layout-version-missing": (
        replace("oci-layout", b"{}"),
        "oci-layout: imageLayoutVersion is missing",
    ),
}


def special(name: str, kind: bytes, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size
    return info


TAR_MEMBERS: dict[str, tuple[tarfile.TarInfo, str]] = {
    "traversal": (special("../evil", tarfile.REGTYPE, size=4), "'../evil' points outside"),
    "traversal-inside-blobs": (
        special(f"blobs/../../{HEX}", tarfile.REGTYPE, size=4),
        "points outside the layout",
    ),
    "absolute-path": (special("/tmp/evil", tarfile.REGTYPE, size=4), "points outside"),
    "symlink": (
        special(f"blobs/sha256/{HEX}", tarfile.SYMTYPE, "/etc/passwd"),
        "is a link (to '/etc/passwd')",
    ),
    "hard-link": (special(f"blobs/sha256/{HEX}", tarfile.LNKTYPE, "oci-layout"), "is a link"),
    "fifo": (special("blobs/sha256/pipe", tarfile.FIFOTYPE), "is not a regular file"),
    "device": (special("dev", tarfile.CHRTYPE), "is not a regular file"),
}


@dataclass
class Site:
    config: Path
    root: Path
    work: Path


def cache_state(root: Path) -> tuple[list[str], list[str], list[Any]]:
    """Blob files, temp files and every metadata record of a site."""
    store = FilesystemBlobStore(root)
    files = sorted(
        p.relative_to(root).as_posix() for p in store.blobs_dir.rglob("*") if p.is_file()
    )
    temps = sorted(p.name for p in store.tmp_dir.iterdir())

    async def records() -> list[Any]:
        metadata = EmbeddedMetadataStore(store.meta_dir)
        try:
            return [
                sorted(map(repr, await metadata.tag_records())),
                sorted(map(repr, await metadata.list_blobs())),
                sorted(await metadata.list_repositories()),
            ]
        finally:
            await metadata.close()

    return files, temps, asyncio.run(records())


def make_site(work: Path) -> Site:
    work.mkdir(parents=True, exist_ok=True)
    config = work / "site.yaml"
    data = {
        "offline": True,
        "default_upstream": REGISTRY,
        "storage": {"root": str(work / "cache")},
        "upstreams": {REGISTRY: {"url": "http://127.0.0.1:1"}},
    }
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return Site(config, work / "cache", work)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """A site already holding one image, so that 'unchanged' means something."""
    site = make_site(tmp_path_factory.mktemp("bundle-errors"))
    bundle = write_tar(valid_layout("team/base:1", seed=1), site.work / "base.tar")
    result = mirror_cli("import", "--config", site.config, bundle)
    assert result.returncode == 0, result.stderr
    assert cache_state(site.root)[0], "the base image left no blob"
    return site


def refusal_of(site: Site, bundle: Path) -> BundleError:
    """Import in this process, as the command does (same core, same sweep): the error."""

    async def attempt() -> None:
        async with open_core(load_config(site.config), sweep=TempSweep(None)) as core:
            await import_bundle(core, bundle)

    with pytest.raises(BundleError) as refused:
        asyncio.run(attempt())
    return refused.value


def assert_refused(site: Site, bundle: Path, named: str) -> None:
    # In process: a command per case would cost seconds each. The command's own way of
    # saying it is checked once, below.
    before = cache_state(site.root)
    assert named in refusal_of(site, bundle).message
    assert cache_state(site.root) == before


@pytest.mark.slow  # the mirror command, as a process
def test_the_command_says_what_it_refused_without_a_traceback(site: Site, tmp_path: Path) -> None:
    files = valid_layout("team/app:1", seed=2)
    CASES["size-wrong"][0](files)
    bundle = write_tar(files, tmp_path / "bundle.tar")
    before = cache_state(site.root)
    result = mirror_cli("import", "--config", site.config, bundle)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("mirror: import refused: index.json: "), result.stderr
    assert CASES["size-wrong"][1] in result.stderr, result.stderr
    assert "nothing was imported" in result.stderr
    assert cache_state(site.root) == before


@pytest.mark.slow  # the mirror command, as a process
def test_the_valid_layout_imports_as_tar_and_directory(tmp_path: Path) -> None:
    """The base the malformed cases are cut from is itself a good bundle."""
    for form in ("tar", "dir"):
        fresh = make_site(tmp_path / form)
        files = valid_layout("team/app:1", seed=2)
        if form == "tar":
            bundle = write_tar(files, tmp_path / "app.tar")
        else:
            bundle = write_dir(files, tmp_path / "app-layout")
        result = mirror_cli("import", "--config", fresh.config, bundle)
        assert result.returncode == 0, result.stderr
        assert f"imported {REGISTRY}/team/app:1" in result.stdout
        assert "3 blobs added" in result.stdout
        blobs, temps, (tags, _, _) = cache_state(fresh.root)
        assert len(blobs) == 3
        assert temps == []
        assert len(tags) == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_layout_is_refused_by_name(site: Site, case: str, tmp_path: Path) -> None:
    edit, named = CASES[case]
    files = valid_layout("team/app:1", seed=2)
    edit(files)
    assert_refused(site, write_tar(files, tmp_path / "bundle.tar"), named)


@pytest.mark.parametrize("case", ["size-wrong", "layer-corrupt"])
def test_a_malformed_layout_directory_is_refused_by_name(
    site: Site, case: str, tmp_path: Path
) -> None:
    edit, named = CASES[case]
    files = valid_layout("team/app:1", seed=2)
    edit(files)
    assert_refused(site, write_dir(files, tmp_path / "layout"), named)


@pytest.mark.parametrize("case", sorted(TAR_MEMBERS))
def test_links_and_escaping_names_in_a_tar_are_refused(
    site: Site, case: str, tmp_path: Path
) -> None:
    member, named = TAR_MEMBERS[case]
    bundle = write_tar(valid_layout("team/app:1", seed=2), tmp_path / "b.tar", extra=(member,))
    assert_refused(site, bundle, named)


def test_a_truncated_or_foreign_tar_is_refused(site: Site, tmp_path: Path) -> None:
    bundle = write_tar(valid_layout("team/app:1", seed=2), tmp_path / "whole.tar")
    data = bundle.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])  # inside the 64 KiB layer
    assert_refused(site, truncated, "is not a readable tar")
    foreign = tmp_path / "foreign.tar"
    foreign.write_bytes(b"PK\x03\x04 a zip, not a tar " * 40)
    assert_refused(site, foreign, "is not a readable tar")
    assert_refused(site, tmp_path / "absent.tar", "absent.tar does not exist")


def test_links_and_special_files_in_a_directory_are_refused(site: Site, tmp_path: Path) -> None:
    layout = write_dir(valid_layout("team/app:1", seed=2), tmp_path / "layout")
    link = layout / "blobs" / "sha256" / HEX
    link.symlink_to("/etc/passwd")
    assert_refused(site, layout, f"'blobs/sha256/{HEX}' is a link")
    link.unlink()
    os.mkfifo(layout / "blobs" / "sha256" / "pipe")  # reading it would hang the import
    assert_refused(site, layout, "'blobs/sha256/pipe' is not a regular file")
