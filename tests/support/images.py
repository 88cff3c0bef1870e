"""Deterministic test images built in Python, and a sync pusher for the registry HTTP API.

This module owns the shapes of the images the suite uses (OCI and Docker schema 2 manifests,
OCI indexes and Docker manifest lists), their exact bytes, and how they get into an upstream
registry. Everything is a pure function of a seed, so the same call always yields the same
digests. Manifests are serialized with sorted keys and 3-space indentation (as Docker
does); that indentation also catches any component that re-serializes JSON instead of
passing bytes through.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .net import http_request
from .tokenserver import TokenServer, fetch_token

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
# Every manifest type the suite pushes, for Accept headers.
ALL_MANIFEST_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

# Fixed timestamps keep tar headers, gzip headers and configs byte-identical between runs.
_EPOCH = 1_700_000_000
_CREATED = "2023-11-14T22:13:20Z"

Platform = tuple[str, str]  # (os, architecture)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=3).encode()


def _layer_tar(size: int, seed: int) -> bytes:
    payload = random.Random(seed).randbytes(size)
    buf = io.BytesIO()
    info = tarfile.TarInfo(name=f"data/blob-{seed}.bin")
    info.size = size
    info.mtime = _EPOCH
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    # filename="" and a fixed mtime keep the gzip header deterministic; level 1 because the
    # payload is random and will not shrink anyway.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=_EPOCH, compresslevel=1) as gz:
        gz.write(data)
    return buf.getvalue()


def _layer(size: int, seed: int) -> tuple[bytes, str]:
    """(gzip-compressed layer, diff_id of the uncompressed tar)."""
    tar = _layer_tar(size, seed)
    return _gzip(tar), sha256_digest(tar)


def make_layer(size: int, seed: int) -> bytes:
    """A gzip'd tar holding one file of ``size`` random bytes; deterministic per seed."""
    return _layer(size, seed)[0]


@dataclass
class Image:
    """A manifest (image or index) with every blob it references directly.

    ``manifest`` is exactly the bytes pushed; ``digest`` is their sha256. For indexes,
    ``blobs`` is empty and the referenced manifests are in ``children``.
    """

    manifest: bytes
    media_type: str
    digest: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    children: list[Image] = field(default_factory=list)
    platform: Platform | None = None

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    def parsed(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.manifest)
        return doc

    @property
    def config_digest(self) -> str | None:
        config = self.parsed().get("config")
        return None if config is None else str(config["digest"])

    @property
    def layer_digests(self) -> list[str]:
        return [str(layer["digest"]) for layer in self.parsed().get("layers", [])]

    def all_blobs(self) -> dict[str, bytes]:
        """Blobs of this image and (recursively) of its children."""
        blobs = dict(self.blobs)
        for child in self.children:
            blobs.update(child.all_blobs())
        return blobs

    def all_manifests(self) -> list[Image]:
        """Children (recursively, depth first) followed by this image: push order."""
        out: list[Image] = []
        for child in self.children:
            out.extend(child.all_manifests())
        out.append(self)
        return out

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            desc["platform"] = {"os": self.platform[0], "architecture": self.platform[1]}
        return desc


def _image(
    layer_sizes: list[int],
    seed: int,
    platform: Platform,
    *,
    manifest_type: str,
    config_type: str,
    layer_type: str,
) -> Image:
    blobs: dict[str, bytes] = {}
    layer_descs = []
    diff_ids = []
    for index, size in enumerate(layer_sizes):
        # Distinct per-layer seeds: images built from different seeds share no layers.
        compressed, diff_id = _layer(size, seed * 1000 + index)
        digest = sha256_digest(compressed)
        blobs[digest] = compressed
        diff_ids.append(diff_id)
        layer_descs.append({"mediaType": layer_type, "digest": digest, "size": len(compressed)})
    os_name, arch = platform
    config = _dumps(
        {
            "architecture": arch,
            "os": os_name,
            "created": _CREATED,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "Labels": {"org.example.test-seed": str(seed)},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": _CREATED, "created_by": f"test layer {i} ({size} bytes)"}
                for i, size in enumerate(layer_sizes)
            ],
        }
    )
    config_digest = sha256_digest(config)
    blobs[config_digest] = config
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
            "layers": layer_descs,
        }
    )
    return Image(
        manifest=manifest,
        media_type=manifest_type,
        digest=sha256_digest(manifest),
        blobs=blobs,
        platform=platform,
    )


def oci_image(layer_sizes: list[int], seed: int, platform: Platform = ("linux", "amd64")) -> Image:
    return _image(
        layer_sizes,
        seed,
        platform,
        manifest_type=OCI_MANIFEST,
        config_type=OCI_CONFIG,
        layer_type=OCI_LAYER_GZIP,
    )


def docker_image(
    layer_sizes: list[int], seed: int, platform: Platform = ("linux", "amd64")
) -> Image:
    return _image(
        layer_sizes,
        seed,
        platform,
        manifest_type=DOCKER_MANIFEST,
        config_type=DOCKER_CONFIG,
        layer_type=DOCKER_LAYER_GZIP,
    )


def _index(children: list[Image], media_type: str) -> Image:
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [child.descriptor() for child in children],
        }
    )
    return Image(
        manifest=manifest,
        media_type=media_type,
        digest=sha256_digest(manifest),
        children=list(children),
    )


def oci_index(children: list[Image]) -> Image:
    return _index(children, OCI_INDEX)


def docker_manifest_list(children: list[Image]) -> Image:
    return _index(children, DOCKER_MANIFEST_LIST)


def standard_images(seed_base: int = 0) -> dict[str, Image]:
    """The images the suite uses (about 3.5 MB in all), keyed by a short name.

    Different ``seed_base`` values give disjoint digests, for tests that need fresh content.
    """
    s = seed_base * 100
    kib = 1024
    return {
        "oci": oci_image([300 * kib, 1536 * kib, 2 * kib], seed=s + 1),
        "oci-index": oci_index(
            [
                oci_image([200 * kib, 1 * kib], seed=s + 2, platform=("linux", "amd64")),
                oci_image([180 * kib, 1 * kib], seed=s + 3, platform=("linux", "arm64")),
            ]
        ),
        "docker": docker_image([512 * kib, 4 * kib], seed=s + 4),
        "docker-list": docker_manifest_list(
            [
                docker_image([160 * kib, 3 * kib], seed=s + 5, platform=("linux", "amd64")),
                docker_image([150 * kib, 3 * kib], seed=s + 6, platform=("linux", "arm64")),
            ]
        ),
    }


# -- pushing -------------------------------------------------------------------------------


class PushError(RuntimeError):
    """The registry rejected part of a push."""


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def push_blob(registry_url: str, repo: str, digest: str, data: bytes, token: str | None) -> bool:
    """Monolithic upload (POST then PUT ?digest=); returns False when the blob already existed."""
    base = registry_url.rstrip("/")
    head = http_request("HEAD", f"{base}/v2/{repo}/blobs/{digest}", headers=_auth(token))
    if head.status == 200:
        return False
    start = http_request("POST", f"{base}/v2/{repo}/blobs/uploads/", headers=_auth(token))
    if start.status != 202:
        raise PushError(f"starting upload of {digest} to {repo}: {start.status} {start.body!r}")
    # Location may be absolute or relative, and already carries a query (_state=...).
    location = urllib.parse.urljoin(base + "/", start.header("Location"))
    joiner = "&" if "?" in location else "?"
    put = http_request(
        "PUT",
        f"{location}{joiner}digest={urllib.parse.quote(digest)}",
        body=data,
        headers={**_auth(token), "Content-Type": "application/octet-stream"},
    )
    if put.status != 201:
        raise PushError(f"finishing upload of {digest} to {repo}: {put.status} {put.body!r}")
    return True


def push_manifest(
    registry_url: str, repo: str, image: Image, reference: str, token: str | None
) -> None:
    base = registry_url.rstrip("/")
    resp = http_request(
        "PUT",
        f"{base}/v2/{repo}/manifests/{reference}",
        body=image.manifest,
        headers={**_auth(token), "Content-Type": image.media_type},
    )
    if resp.status != 201:
        raise PushError(f"pushing manifest {repo}:{reference}: {resp.status} {resp.body!r}")
    returned = resp.header("Docker-Content-Digest")
    if returned and returned != image.digest:
        raise PushError(f"registry computed {returned} for {repo}:{reference}, not {image.digest}")


def push(
    registry_url: str,
    repo: str,
    image: Image,
    tag: str | None,
    token: str | None = None,
) -> None:
    """Upload blobs, then child manifests by digest, then ``image`` by tag (or digest)."""
    for manifest in image.all_manifests():
        for digest, data in manifest.blobs.items():
            push_blob(registry_url, repo, digest, data, token)
        is_top = manifest is image
        reference = tag if (is_top and tag is not None) else manifest.digest
        push_manifest(registry_url, repo, manifest, reference, token)


def push_with_token(
    registry_url: str,
    repo: str,
    image: Image,
    tag: str | None,
    token_server: TokenServer,
    username: str,
    password: str,
) -> str:
    """Push into a token-auth registry with a pull,push token for ``username``; returns it."""
    token = fetch_token(
        token_server.realm,
        token_server.service,
        [f"repository:{repo}:pull,push"],
        username,
        password,
    )
    push(registry_url, repo, image, tag, token)
    return token
