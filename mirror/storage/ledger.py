"""The one account of disk space kept by every process writing under a storage root.

`<root>/ledger.json` holds the bytes committed under `blobs/` and, per live process,
the bytes it has reserved for writes not yet committed (a download reserves its
Content-Length before its first byte). It is read and rewritten under an exclusive
`flock` on `<root>/ledger.lock`, so `serve --workers N`, `mirror seed` and other
nodes on a shared volume admit writes against one sum, not N separate ones.

A process's reservations die with it: an entry from this host whose pid is gone is
dropped at once; any entry not refreshed for `STALE_AFTER` seconds is dropped too
(another host's process cannot be asked; a live writer refreshes its entry at least
every `HEARTBEAT` seconds). A missing or unreadable file means the committed bytes are
unknown: the store rescans `blobs/` under the lock.

Only `mirror/storage/blobstore.py` uses this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

HEARTBEAT = 30.0
STALE_AFTER = 300.0
HOST = socket.gethostname()


@dataclass(slots=True)
class ProcessEntry:
    host: str
    pid: int
    reserved: int
    updated: float


@dataclass(slots=True)
class LedgerState:
    """What the ledger holds; changed in place inside `Ledger.transaction`."""

    committed: int | None
    processes: dict[str, ProcessEntry] = field(default_factory=dict)

    def reserved(self, excluding: str | None = None) -> int:
        return sum(e.reserved for key, e in self.processes.items() if key != excluding)

    def adjust(self, owner: str, delta: int, now: float) -> None:
        """Change `owner`'s reservations by `delta` bytes (never below zero)."""
        entry = self.processes.get(owner)
        if entry is None:
            entry = ProcessEntry(HOST, os.getpid(), 0, now)
            self.processes[owner] = entry
        entry.reserved = max(entry.reserved + delta, 0)
        entry.updated = now
        if not entry.reserved:
            del self.processes[owner]

    def drop_dead(self, now: float) -> list[str]:
        """Forget the reservations of processes that are gone; return their keys."""
        dead = [
            key
            for key, entry in self.processes.items()
            if now - entry.updated > STALE_AFTER
            or (entry.host == HOST and not _pid_alive(entry.pid))
        ]
        for key in dead:
            del self.processes[key]
        return dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class Ledger:
    def __init__(self, root: Path):
        self.path = root / "ledger.json"
        self._lock_path = root / "ledger.lock"
        # Unique per process (a pid alone can be reused after a crash).
        self.owner = f"{HOST}:{os.getpid()}:{secrets.token_hex(4)}"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LedgerState]:
        """The state under the exclusive lock; written back if the block changed it."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self._read()
            before = _encode(state)
            state.drop_dead(time.time())
            yield state
            after = _encode(state)
            if after != before:
                self._write(after)
        finally:
            os.close(fd)  # releases the lock

    def _write(self, text: str) -> None:
        # One name for every writer: only the holder of the lock writes.
        temp = self.path.with_name("ledger.json.tmp")
        try:
            temp.write_text(text, encoding="utf-8")
            os.replace(temp, self.path)
        except OSError as exc:
            # A full disk must not wedge the account: without the file the count is
            # unknown, and the next transaction rescans blobs/ (removing needs no space).
            temp.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
            log.warning("ledger_write_failed", path=str(self.path), error=str(exc))

    def read(self) -> LedgerState:
        """A snapshot without the lock (for metrics and reports)."""
        return self._read()

    def _read(self) -> LedgerState:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            committed = data["committed"]
            processes = {
                key: ProcessEntry(
                    str(value["host"]),
                    int(value["pid"]),
                    int(value["reserved"]),
                    float(value["updated"]),
                )
                for key, value in data["processes"].items()
            }
        except FileNotFoundError:
            return LedgerState(None)
        except (ValueError, KeyError, TypeError, AttributeError):
            # Unreadable (a torn write cannot happen: it is replaced whole; but someone
            # may have edited it): start again from a scan.
            return LedgerState(None)
        return LedgerState(committed if isinstance(committed, int) else None, processes)


def _encode(state: LedgerState) -> str:
    return json.dumps(
        {
            "committed": state.committed,
            "processes": {
                key: {
                    "host": e.host,
                    "pid": e.pid,
                    "reserved": e.reserved,
                    "updated": e.updated,
                }
                for key, e in state.processes.items()
            },
        },
        sort_keys=True,
    )
