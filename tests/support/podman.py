"""podman with private storage and a private registries.conf, pulling as a CRI-O node would.

Storage (vfs, no overlay mounts), run root and configuration live under one temp
directory, so nothing of the machine's own container set-up is read or written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class Podman:
    def __init__(self, workdir: Path, registries_conf: Path):
        self.workdir = workdir
        self.registries_conf = registries_conf
        workdir.mkdir(parents=True, exist_ok=True)
        # podman refuses a run root longer than 50 characters; pytest's tmp paths are longer.
        self.runroot = Path(tempfile.mkdtemp(prefix="podman-run-"))
        self.policy = workdir / "policy.json"
        self.policy.write_text(
            '{"default": [{"type": "insecureAcceptAnything"}]}', encoding="utf-8"
        )
        (workdir / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{self.runroot}"\n'
            f'graphroot = "{workdir / "root"}"\n',
            encoding="utf-8",
        )
        # Locks in a file of our own: the default shared-memory locks (/dev/shm/libpod_lock)
        # are whatever another podman on the host left there ("failed to open 2048 locks").
        (workdir / "containers.conf").write_text(
            f'[engine]\nlock_type = "file"\nvolume_path = "{workdir / "volumes"}"\n'
            f'tmp_dir = "{self.runroot / "libpod-tmp"}"\n',
            encoding="utf-8",
        )

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        binary = shutil.which("podman")
        if binary is None:
            raise RuntimeError("podman is not installed (scripts/bootstrap test installs it)")
        env = {
            **{k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "CONTAINERS_STORAGE_CONF": str(self.workdir / "storage.conf"),
            "CONTAINERS_CONF": str(self.workdir / "containers.conf"),
        }
        result = subprocess.run(
            [
                binary,
                "--root",
                str(self.workdir / "root"),
                "--runroot",
                str(self.runroot),
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                *args,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} failed:\n{result.stderr}")
        return result

    def pull(self, reference: str) -> str:
        """Pull and return the image's manifest digest."""
        self.run("pull", "--signature-policy", str(self.policy), reference)
        return self.run("image", "inspect", "--format", "{{.Digest}}", reference).stdout.strip()

    def close(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)
