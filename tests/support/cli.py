"""Running the `mirror` command as a user would: a subprocess of this interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def mirror_cli(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`mirror ARGS...`; the caller checks returncode, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "mirror", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


def containerd_hosts(
    config: Path, mirror_url: str, output: Path, fallback: str = "upstream"
) -> Path:
    """`mirror client-config containerd` into `output` (a certs.d directory)."""
    result = mirror_cli(
        "client-config",
        "containerd",
        "--config",
        config,
        "--mirror-url",
        mirror_url,
        "--fallback",
        fallback,
        "--output",
        output,
    )
    assert result.returncode == 0, result.stderr
    return output
