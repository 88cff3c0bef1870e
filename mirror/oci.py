"""The OCI grammar: validated names, tags, digests, media types and `Accept` sets.

Untrusted request text becomes one of these typed values before any I/O; no
other module parses a digest or a repository name itself. The grammar is the
distribution-spec's; lengths follow distribution/reference.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

from mirror.errors import DigestInvalid, ManifestUnknown, NameInvalid

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_LOWER_HEX = re.compile(r"[0-9a-f]+")
NAME_MAX_LENGTH = 255

# The algorithms we can verify, with the exact length of their lower-case hex.
_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# What we ask every upstream for, so one cached copy serves every client.
MANIFEST_MEDIA_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
# The Accept header carrying them all.
ACCEPT_ALL_MANIFESTS = ", ".join(MANIFEST_MEDIA_TYPES)
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

# containerd rejects manifests above 4*1048*1048 bytes; we allow some headroom but
# never read an unbounded body into memory.
MANIFEST_MAX_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest we can verify: `sha256:<64 hex>` or `sha512:<128 hex>`."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Self:
        if not _DIGEST_RE.fullmatch(text):
            raise DigestInvalid("invalid digest", detail={"digest": text[:200]})
        algorithm, _, encoded = text.partition(":")
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise DigestInvalid("unsupported digest algorithm", detail={"digest": text[:200]})
        if len(encoded) != length or not _LOWER_HEX.fullmatch(encoded):
            raise DigestInvalid("invalid digest", detail={"digest": text[:200]})
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Self:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def looks_like_digest(reference: str) -> bool:
    """Tags cannot contain ':', so any ':' means the client meant a digest."""
    return ":" in reference


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Self:
        if looks_like_digest(text):
            return cls(digest=Digest.parse(text))
        if not _TAG_RE.fullmatch(text):
            # distribution answers 404 for a reference its router cannot match, and
            # the conformance suite insists on 404 for `.INVALID_MANIFEST_NAME`.
            raise ManifestUnknown("invalid tag", detail={"tag": text[:200]})
        return cls(tag=text)

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)


def is_repository_name(name: str) -> bool:
    """True for repository path components joined by slashes (`library/alpine`)."""
    return len(name) <= NAME_MAX_LENGTH and _NAME_RE.fullmatch(name) is not None


def validate_name(name: str) -> str:
    """Return `name` if it is a valid repository name, else raise NAME_INVALID."""
    if len(name) > NAME_MAX_LENGTH or not _NAME_RE.fullmatch(name):
        raise NameInvalid("invalid repository name", detail={"name": name[:300]})
    return name


def bare_media_type(content_type: str | None) -> str:
    """A Content-Type without parameters, lower-cased; clients ignore parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True, slots=True)
class AcceptSet:
    """The manifest media types a client accepts, from every `Accept` line."""

    types: frozenset[str]
    wildcard: bool

    @classmethod
    def from_headers(cls, values: Iterable[str]) -> Self:
        types: set[str] = set()
        for value in values:
            for item in value.split(","):
                media_type = bare_media_type(item)
                if media_type:
                    types.add(media_type)
        # No Accept at all means anything; containerd always adds */*.
        wildcard = not types or "*/*" in types
        return cls(frozenset(types), wildcard)

    def allows(self, media_type: str) -> bool:
        return self.wildcard or media_type in self.types
