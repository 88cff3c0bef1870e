"""The chaining and failover keys of an upstream: prefixes and the fallback shorthand."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mirror.config import UpstreamConfig


def test_a_fallback_url_with_a_path_is_a_base_url_and_a_repository_prefix() -> None:
    upstream = UpstreamConfig(
        url="https://registry-1.docker.io",
        fallbacks=(  # type: ignore[arg-type]
            "https://public.ecr.aws/docker/library/",
            "https://mirror.gcr.io",
            {"url": "https://registry.example.com", "repository_prefix": "hub"},
        ),
    )
    assert [(f.url, f.repository_prefix, f.label) for f in upstream.fallbacks] == [
        ("https://public.ecr.aws", "docker/library", "public.ecr.aws/docker/library"),
        ("https://mirror.gcr.io", "", "mirror.gcr.io"),
        ("https://registry.example.com", "hub", "registry.example.com/hub"),
    ]


@pytest.mark.parametrize("prefix", ["/hub", "hub/", "Hub", "a//b", "a b", "../etc"])
def test_a_repository_prefix_must_be_repository_path_components(prefix: str) -> None:
    with pytest.raises(ValidationError, match="repository_prefix"):
        UpstreamConfig(url="https://registry.example.com", repository_prefix=prefix)
    with pytest.raises(ValidationError, match="repository_prefix"):
        UpstreamConfig(
            url="https://registry.example.com",
            fallbacks=({"url": "https://x.example.com", "repository_prefix": prefix},),  # type: ignore[arg-type]
        )


@pytest.mark.parametrize(
    "fallback",
    ["ftp://x.example.com", "https://user:pw@x.example.com", "https://x.example.com?a=1"],
)
def test_a_fallback_url_is_checked_like_an_upstream_url(fallback: str) -> None:
    with pytest.raises(ValidationError, match="fallbacks"):
        UpstreamConfig(url="https://registry.example.com", fallbacks=(fallback,))  # type: ignore[arg-type]
