"""The console's background jobs: seeding a list of references, with progress.

A seed job runs `mirror seed`'s own code (`seed.seed`) on the serving process's core,
so a seeded blob takes exactly the path a pulled one does; its progress (references
done, bytes fetched or found, errors) is kept for `GET /api/v1/jobs/ID`. Jobs run in a
`TaskOwner` (cancelled at shut-down). The process running a job knows its state at once;
it also writes it to the metadata store (at the start, every `SAVE_EVERY` seconds while
it runs, and at the end; kept for `KEEP_FOR`), so every worker and replica can answer
for it. A metadata outage leaves the job running and known to its own process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from mirror.concurrency import TaskOwner, cancel_and_wait
from mirror.core import MirrorCore
from mirror.errors import MetadataUnavailable
from mirror.logging import audit_log
from mirror.metadata.base import MetadataStore
from mirror.seed import SeedOutcome, seed

log = structlog.get_logger(__name__)

KEEP = 50  # jobs this process remembers
KEEP_FOR = 86400.0  # how long the metadata store keeps a job's state
SAVE_EVERY = 1.0
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

    @classmethod
    def from_view(cls, view: dict[str, Any]) -> Job:
        return cls(**view)

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

    def __init__(self, metadata: MetadataStore, keep: int = KEEP):
        self._metadata = metadata
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks = TaskOwner("console-jobs")
        self._numbers = itertools.count(1)
        # Saves go to the store one at a time, in the order they were asked for: a save
        # cut short by shut-down still finishes its write (it runs in a thread), and the
        # final state must land after it, not before.
        self._save_order = asyncio.Lock()

    async def start_seed(
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
        # Saved before it is answered: the client's next request may reach another worker.
        await self._save(job)
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
        running = asyncio.create_task(
            seed(core, references, platforms, pin=pin, concurrency=SEED_CONCURRENCY, progress=job),
            name=f"job:{job.id}:seed",
        )
        try:
            while not running.done():
                await asyncio.wait([running], timeout=SAVE_EVERY)
                await self._save(job)
            running.result()
        except Exception as exc:
            # A bug, not a reference that failed (those are counted by `fail`): the job
            # must still end, and say why.
            log.exception("seed_job_crashed", job=job.id)
            job.errors.append(f"job failed: {exc!r}")
        except asyncio.CancelledError:
            # Shut-down: the seed stops with its job, and the store must not keep
            # showing it running.
            await cancel_and_wait(running)
            job.errors.append("stopped: the mirror shut down")
            await self._end(job)
            raise
        finally:
            await cancel_and_wait(running)
        await self._end(job)

    async def _end(self, job: Job) -> None:
        job.state = "failed" if job.errors else "done"
        job.finished = time.time()
        await self._save(job)
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

    async def _save(self, job: Job) -> None:
        await asyncio.shield(self._save_in_order(job.id, json.dumps(job.view())))

    async def _save_in_order(self, job_id: str, state: str) -> None:
        async with self._save_order:
            try:
                await self._metadata.put_job(job_id, state, KEEP_FOR)
            except MetadataUnavailable as exc:
                log.warning("job_state_not_saved", job=job_id, error=exc.message)

    async def get(self, job_id: str) -> Job | None:
        """The job, from this process if it runs here, else as the store last heard."""
        found = self._jobs.get(job_id)
        if found is not None:
            return found
        try:
            state = await self._metadata.get_job(job_id)
        except MetadataUnavailable:
            return None
        return None if state is None else _parsed(state)

    async def all(self) -> list[Job]:
        """Every job this process or the store knows, oldest first."""
        try:
            stored = [_parsed(state) for state in await self._metadata.list_jobs()]
        except MetadataUnavailable:
            stored = []
        jobs = {job.id: job for job in stored if job is not None}
        jobs.update(self._jobs)
        return sorted(jobs.values(), key=lambda job: job.started)

    async def close(self) -> None:
        await self._tasks.close()


def _parsed(state: str) -> Job | None:
    try:
        return Job.from_view(json.loads(state))
    except (ValueError, TypeError):
        return None  # written by another version: not ours to show
