"""What the bench scripts share: how a script process behaves, and how figures print.

Imported as `harness` by scripts run as `python bench/<script>.py` (their own folder is
first on sys.path).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes an exception, so each script's clean-up stops what it started.
    raise SystemExit(128 + signum)


def prepare_process() -> None:
    """Progress lines show up when piped too, and SIGTERM cleans up like Ctrl-C."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, _terminate)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


Cleanup = list[Callable[[], object]]


def run_in_workdir(
    prefix: str,
    *,
    parent: str | Path | None,
    keep: bool,
    failures: tuple[type[BaseException], ...],
    body: Callable[[Path, Cleanup], int],
) -> int:
    """Run `body` in a fresh work directory and return its exit status.

    `body` appends to the cleanup list whatever it starts; each step runs, last first,
    whatever happens (one that fails is reported and the rest still run). A failure of
    one of the `failures` kinds is reported in a line and exits 1; Ctrl-C exits 130.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    print(f"workdir: {work}")
    cleanup: Cleanup = []
    try:
        return body(work, cleanup)
    except failures as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for step in reversed(cleanup):
            try:
                step()
            except Exception as exc:  # keep cleaning up the rest
                print(f"cleanup step failed: {exc!r}", file=sys.stderr)
        if keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def add_blob_options(parser: argparse.ArgumentParser) -> None:
    """The sizes the blob benchmarks share: a large warm blob, a 5-layer image, readers."""
    parser.add_argument(
        "--blob-mb", type=int, default=1024, help="warm blob size in MiB (default 1024)"
    )
    parser.add_argument(
        "--layer-mb", type=float, default=40, help="size of each of 5 layers, MiB (default 40)"
    )
    parser.add_argument(
        "--streams", type=int, default=8, help="concurrent warm readers (default 8)"
    )


def reconciled_at(log: Path) -> float | None:
    """When the log says the start-up reconcile ended (epoch seconds), or None yet."""
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        if '"reconciled"' in line or '"reconcile_skipped"' in line:
            try:
                stamp = json.loads(line).get("timestamp")
            except ValueError:
                continue
            if isinstance(stamp, str):
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            return time.time()
    return None
