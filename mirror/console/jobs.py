"""The console's background jobs: seeding a list of references, with progress.

A seed job runs `mirror seed`'s own code (`seed.seed`) on the serving process's core,
so a seeded blob takes exactly the path a pulled one does; its progress (references
done, bytes fetched or found, errors) is kept here for `GET /api/v1/jobs/ID`. Jobs run
in a `TaskOwner` (cancelled at shut-down) and are kept in memory, the last `KEEP` of
them, in the process that started them: under `serve --workers` another worker does not
know them (the console polls over one keep-alive connection).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from mirror.concurrency import TaskOwner
from mirror.core import MirrorCore
from mirror.logging import audit_log
from mirror.seed import SeedOutcome, seed

log = structlog.get_logger(__name__)

KEEP = 50
SEED_CONCURRENCY = 2  # `mirror seed`'s default
State = Literal["running", "done", "failed"]


@dataclass
class Job:
    id: str
    kind: Literal["seed"]
    total: int
    user: str | None
    state: State = "running"
    done: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "bytes": self.bytes,
            "errors": list(self.errors),
            "started": self.started,
            "finished": self.finished,
            "user": self.user,
        }

    # The progress protocol `seed.seed_one` reports to.

    def start(self, ref: str, total: int) -> None:
        """The reference's size is known; its bytes are counted as they arrive."""

    def advance(self, ref: str, size: int) -> None:
        self.bytes += size

    def finish(self, ref: str, outcome: SeedOutcome) -> None:
        self.done += 1

    def fail(self, ref: str, message: str) -> None:
        self.done += 1
        self.errors.append(f"{ref}: {message}")


class Jobs:
    """The jobs of this process, newest last."""

    def __init__(self, keep: int = KEEP):
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks = TaskOwner("console-jobs")
        self._numbers = itertools.count(1)

    def start_seed(
        self,
        core: MirrorCore,
        references: Sequence[str],
        platforms: Sequence[str] | None,
        *,
        pin: bool,
        user: str | None,
    ) -> Job:
        # A number to read, and random letters so IDs from two workers never clash.
        job = Job(f"{next(self._numbers)}-{secrets.token_hex(4)}", "seed", len(references), user)
        self._jobs[job.id] = job
        while len(self._jobs) > self._keep:
            oldest = next(iter(self._jobs.values()))
            if oldest.state == "running":
                break  # running jobs are never forgotten
            self._jobs.popitem(last=False)
        self._tasks.spawn(self._seed(core, job, references, platforms, pin), name=f"job:{job.id}")
        return job

    async def _seed(
        self,
        core: MirrorCore,
        job: Job,
        references: Sequence[str],
        platforms: Sequence[str] | None,
        pin: bool,
    ) -> None:
        try:
            await seed(
                core, references, platforms, pin=pin, concurrency=SEED_CONCURRENCY, progress=job
            )
        except Exception as exc:
            # A bug, not a reference that failed (those are counted by `fail`): the job
            # must still end, and say why.
            log.exception("seed_job_crashed", job=job.id)
            job.errors.append(f"job failed: {exc!r}")
        job.state = "failed" if job.errors else "done"
        job.finished = time.time()
        audit_log.info(
            "console_action",
            user=job.user,
            action="seed_finished",
            upstream=None,
            repository=None,
            reference=f"job {job.id}",
            outcome=job.state,
            errors=len(job.errors),
            bytes=job.bytes,
        )

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    async def close(self) -> None:
        await self._tasks.close()
