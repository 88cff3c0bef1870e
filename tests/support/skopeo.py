"""Drive skopeo (a real registry client) against loopback registries, sync or async.

This module owns the skopeo command lines the suite uses and the isolation of skopeo from
the host's container configuration: no TLS (everything is plain HTTP on 127.0.0.1), no
signature policy, no retries (a failure must surface, not be papered over), no host
registries.conf mirrors or stored credentials.

The async variants run skopeo with ``asyncio.create_subprocess_exec`` so an aiohttp server in
the same event loop keeps serving while skopeo talks to it; the sync variants would block
that loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TIMEOUT = 120.0


class SkopeoError(RuntimeError):
    """skopeo exited non-zero (or timed out); carries its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"skopeo {status}: {' '.join(self.argv)}\n{stderr.strip()}")


def skopeo_binary() -> str:
    found = os.environ.get("SKOPEO_BINARY") or shutil.which("skopeo")
    if not found:
        raise FileNotFoundError("skopeo not found (set SKOPEO_BINARY)")
    return found


def _isolation_dir() -> Path:
    # A fixed per-user path (not a TemporaryDirectory) so nothing needs cleaning up at exit.
    path = Path(tempfile.gettempdir()) / f"registry-mirror-tests-skopeo-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    conf = path / "registries.conf"
    if not conf.exists():
        conf.write_text("# isolated from the host: no mirrors, no search registries\n")
    auth = path / "auth.json"
    if not auth.exists():
        auth.write_text('{"auths": {}}\n')
    return path


def skopeo_env() -> dict[str, str]:
    """The environment skopeo runs with: host registries.conf and auth files hidden."""
    iso = _isolation_dir()
    env = dict(os.environ)
    env["CONTAINERS_REGISTRIES_CONF"] = str(iso / "registries.conf")
    env["REGISTRY_AUTH_FILE"] = str(iso / "auth.json")
    # skopeo honours proxies for docker:// traffic; loopback tests must never use one.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(name, None)
    return env


def prepare_destination(dst: str) -> None:
    """Create the parent directory of a ``dir:``/``oci:`` destination (skopeo will not)."""
    transport, _, rest = dst.partition(":")
    if transport in ("dir", "oci") and rest:
        # oci:PATH[:REFERENCE]; an absolute PATH never contains ':' in the suite.
        path = rest.split(":", 1)[0] if transport == "oci" else rest
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def copy_argv(
    src: str,
    dst: str,
    *,
    all_images: bool = True,
    src_creds: str | None = None,
    dest_creds: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """argv for ``skopeo copy``; creds are ``USER:PASSWORD``, ``None`` means anonymous."""
    argv = [
        skopeo_binary(),
        "--insecure-policy",
        "copy",
        "--retry-times",
        "0",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]
    argv += ["--src-creds", src_creds] if src_creds is not None else ["--src-no-creds"]
    argv += ["--dest-creds", dest_creds] if dest_creds is not None else ["--dest-no-creds"]
    if all_images:
        argv.append("--all")
    argv += [*extra, src, dst]
    return argv


def inspect_argv(
    ref: str, *, raw: bool = True, creds: str | None = None, extra: Sequence[str] = ()
) -> list[str]:
    argv = [
        skopeo_binary(),
        "--insecure-policy",
        "inspect",
        "--retry-times",
        "0",
        "--tls-verify=false",
    ]
    argv += ["--creds", creds] if creds is not None else ["--no-creds"]
    if raw:
        argv.append("--raw")
    argv += [*extra, ref]
    return argv


def run_skopeo(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Run skopeo; return stdout, raise ``SkopeoError`` with stderr on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=skopeo_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise SkopeoError(argv, None, stderr) from exc
    if proc.returncode != 0:
        raise SkopeoError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc.stdout


async def run_skopeo_async(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Like ``run_skopeo`` but without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=skopeo_env(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        # Never leave a skopeo running (or a transport unclosed) behind a failed test.
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise SkopeoError(argv, proc.returncode, stderr.decode(errors="replace"))
    return stdout


def skopeo_copy(
    src: str,
    dst: str,
    *,
    all_images: bool = True,
    src_creds: str | None = None,
    dest_creds: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """``skopeo copy [--all] SRC DST`` with TLS verification off on both sides."""
    prepare_destination(dst)
    run_skopeo(
        copy_argv(
            src,
            dst,
            all_images=all_images,
            src_creds=src_creds,
            dest_creds=dest_creds,
            extra=extra,
        ),
        timeout,
    )


async def skopeo_copy_async(
    src: str,
    dst: str,
    *,
    all_images: bool = True,
    src_creds: str | None = None,
    dest_creds: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    prepare_destination(dst)
    await run_skopeo_async(
        copy_argv(
            src,
            dst,
            all_images=all_images,
            src_creds=src_creds,
            dest_creds=dest_creds,
            extra=extra,
        ),
        timeout,
    )


def inspect_raw(
    ref: str,
    *,
    creds: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """The raw manifest bytes skopeo fetches for ``ref`` (e.g. ``docker://host/repo:tag``)."""
    return run_skopeo(inspect_argv(ref, creds=creds, extra=extra), timeout)


async def inspect_raw_async(
    ref: str,
    *,
    creds: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    return await run_skopeo_async(inspect_argv(ref, creds=creds, extra=extra), timeout)
