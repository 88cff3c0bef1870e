"""Per-upstream policy: which repositories may be pulled, and how long tags are trusted.

Globs (`fnmatch`, where `*` also crosses `/`) match the repository name as it is on
the upstream (after Docker Hub's `library/`), and the tag. `deny` wins over
`allow`; an empty `allow` allows everything. Tag rules are tried in order and the
first match decides: a TTL of its own, or `immutable` (never revalidated once cached,
for release schemes that never move a tag).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from mirror.config import TagRule, UpstreamConfig

FOREVER = math.inf


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    tag_ttl: float
    max_stale: float
    tag_rules: Sequence[TagRule] = ()
    allow: Sequence[str] = ()
    deny: Sequence[str] = ()

    @classmethod
    def from_config(cls, upstream: UpstreamConfig) -> UpstreamPolicy:
        return cls(
            upstream.tag_ttl, upstream.max_stale, upstream.tag_rules, upstream.allow, upstream.deny
        )

    def allows(self, repository: str) -> bool:
        if any(fnmatchcase(repository, pattern) for pattern in self.deny):
            return False
        return not self.allow or any(fnmatchcase(repository, pattern) for pattern in self.allow)

    def ttl_for(self, repository: str, tag: str) -> float:
        """Seconds a tag is answered without asking the upstream (`FOREVER` if immutable)."""
        for rule in self.tag_rules:
            if fnmatchcase(repository, rule.repository) and fnmatchcase(tag, rule.tag):
                return FOREVER if rule.immutable else float(rule.tag_ttl or 0.0)
        return self.tag_ttl
