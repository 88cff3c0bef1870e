"""A private containerd daemon for pulling through the mirror as a real node would.

Root, state, sockets and the `opt` path all live under one temp directory and the CRI
plugin is off, so it touches nothing of the machine's own containerd. Images are
unpacked with the `native` snapshotter, which needs no overlay mounts.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .net import Service, wait_until

NAMESPACE = "mirror-tests"


class Containerd(Service):
    def __init__(self, workdir: Path | None = None):
        # Unix socket paths are limited to ~100 bytes: without a workdir, a short one
        # of our own, removed again at stop.
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ctd-"))
        self.socket = self.workdir / "containerd.sock"
        self._process = None

    def start(self) -> None:
        binary = shutil.which("containerd")
        if binary is None:
            raise RuntimeError("containerd is not installed (scripts/bootstrap test installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(
            "\n".join(
                [
                    "version = 2",
                    f'root = "{self.workdir / "root"}"',
                    f'state = "{self.workdir / "state"}"',
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                    "[grpc]",
                    f'  address = "{self.socket}"',
                    "[ttrpc]",
                    f'  address = "{self.workdir / "ttrpc.sock"}"',
                    "[debug]",
                    '  address = ""',
                    '[plugins."io.containerd.internal.v1.opt"]',
                    f'  path = "{self.workdir / "opt"}"',
                    "",
                ]
            ),
            encoding="utf-8",
        )
        with open(self.workdir / "containerd.log", "ab") as log:
            self._process = subprocess.Popen(
                [binary, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(lambda: self._answers(), timeout=20, message="containerd did not start")

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        return self.ctr("version", check=False).returncode == 0

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed:\n{result.stderr}")
        return result

    def pull(self, reference: str, hosts_dir: Path) -> None:
        self.ctr(
            "images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", reference
        )

    def remove(self, reference: str) -> None:
        """Forget the image and, once garbage-collected, its content: a pull fetches again."""
        self.ctr("images", "rm", "--sync", reference)

    def image_digest(self, reference: str) -> str:
        for line in self.ctr("images", "list").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                return next(field for field in fields if field.startswith("sha256:"))
        raise KeyError(reference)

    def stop(self) -> None:
        self.stop_process(timeout=20)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
