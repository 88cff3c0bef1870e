"""An in-memory upstream for the policy tests: no sockets, no event-loop servers.

It has the shape the caches use of `mirror.upstream.client.UpstreamClient`
(`open(method, repository, path, headers=)` returning a response with `status`,
`headers`, `content_length`, `read()`, used as an async context manager), so the
manifest and access policies run against canned answers in milliseconds. Every
request is recorded, so a test can say exactly what reached the upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from types import TracebackType
from typing import Self

from multidict import CIMultiDict, CIMultiDictProxy

from mirror.errors import UpstreamUnavailable


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class CannedResponse:
    """One upstream answer; `content_length` is what a HEAD announces, body or not."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes = b""):
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self._body = body
        self.fallback: str | None = None  # as the upstream itself answered

    @property
    def content_length(self) -> int | None:
        text = self.headers.get("Content-Length")
        return None if text is None else int(text)

    async def read(self, limit: int) -> bytes:
        assert len(self._body) <= limit, "the stub serves nothing over the caller's limit"
        return self._body

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class StubUpstream:
    """Content per repository, answered as a registry would; or every request failing.

    `failure` set to a status answers every request with it (429 with a Retry-After);
    set to an exception, every request raises it, as `UpstreamClient.open` does when
    the upstream cannot be reached.
    """

    def __init__(self) -> None:
        # (repository, "manifests" or "blobs", tag or digest) -> (body, media type)
        self._content: dict[tuple[str, str, str], tuple[bytes, str]] = {}
        self.failure: int | UpstreamUnavailable | None = None
        self.asked: list[tuple[str, str, str]] = []  # (method, repository, path)

    def publish(
        self, repository: str, body: bytes, media_type: str, *, tag: str | None = None
    ) -> str:
        """Serve a manifest by digest (and by `tag`); return its digest."""
        digest = digest_of(body)
        self._content[(repository, "manifests", digest)] = (body, media_type)
        if tag is not None:
            self._content[(repository, "manifests", tag)] = (body, media_type)
        return digest

    def hold_blob(self, repository: str, body: bytes) -> str:
        """Serve a blob by digest in `repository`; return its digest."""
        digest = digest_of(body)
        self._content[(repository, "blobs", digest)] = (body, "application/octet-stream")
        return digest

    def requests(self, method: str | None = None) -> list[tuple[str, str, str]]:
        return [entry for entry in self.asked if method is None or entry[0] == method]

    async def open(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> CannedResponse:
        self.asked.append((method, repository, path))
        if isinstance(self.failure, UpstreamUnavailable):
            raise self.failure
        if self.failure is not None:
            return CannedResponse(self.failure, {"Retry-After": "7"})
        kind, _, reference = path.partition("/")
        found = self._content.get((repository, kind, reference))
        if found is None:
            return CannedResponse(404, {"Content-Type": "application/json"})
        body, media_type = found
        answer = {
            "Content-Type": media_type,
            "Content-Length": str(len(body)),
            "Docker-Content-Digest": digest_of(body),
        }
        return CannedResponse(200, answer, b"" if method == "HEAD" else body)
