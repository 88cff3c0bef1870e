"""A real upstream registry for tests: the CNCF distribution binary run as a subprocess.

This module owns the registry's lifecycle (config file, storage directory, port, process,
log file) and the parsing of the access log the registry prints, so that tests can assert on
exactly which requests reached the upstream.

Access log format (checked against distribution 2.8.2): the registry wraps its handler in
gorilla/handlers' CombinedLoggingHandler, which writes Apache "combined" lines to stdout::

    127.0.0.1 - - [27/Nov/2026:19:13:59 +0000] "HEAD /v2/a/manifests/x HTTP/1.1" 404 96 "" "curl/8"

interleaved with logrus lines (``time="..." level=info msg="..."``) on stderr. Both streams
go to one log file; anything that does not parse as an access line is ignored.

Caveats for assertions:

* The access line is written *after* the handler returns. For small responses that happens
  before the client sees the reply, but large blob bodies are streamed (sendfile) before the
  line is written, so a client can finish reading before its line exists. Use
  ``wait_for_access`` (a bounded poll) rather than reading the log once.
* ``bytes_sent`` is what the handler wrote, and for HEAD it is the would-be body length
  (e.g. a HEAD 404 logs the 96-byte JSON error), not what went over the wire.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import yaml

from .net import Service, free_port, http_request, wait_until

DEFAULT_BINARY = "/usr/bin/docker-registry"


def find_registry_binary() -> str:
    """Locate the distribution binary: $REGISTRY_BINARY, the Debian path, or ``registry``."""
    explicit = os.environ.get("REGISTRY_BINARY")
    if explicit:
        return explicit
    for candidate in (DEFAULT_BINARY, "docker-registry", "registry"):
        found = shutil.which(candidate)
        if found:
            return found
    raise FileNotFoundError("no distribution registry binary found (set REGISTRY_BINARY)")


@dataclass(frozen=True)
class TokenAuthSettings:
    """The ``auth: token`` block of a distribution config."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class AccessEntry:
    """One parsed access-log line."""

    remote_addr: str
    user: str
    time: datetime
    method: str
    path: str  # request target as sent, including any query string
    protocol: str
    status: int
    bytes_sent: int
    referer: str
    user_agent: str
    offset: int  # byte offset of the line in the log file; comparable with ``Registry.mark()``

    @property
    def route(self) -> str:
        """The path without its query string."""
        return self.path.split("?", 1)[0]


# gorilla/handlers quotes each field with Go-style escapes: \" and \\ always, non-printable
# bytes as \xNN / \uNNNN / \UNNNNNNNN / \n etc. A quoted field is therefore a run of
# non-quote, non-backslash characters or backslash escapes.
_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_ACCESS_RE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    + _QUOTED.replace("(", "(?P<request>", 1)
    + r" (?P<status>\d{3}) (?P<size>\d+|-) "
    + _QUOTED.replace("(", "(?P<referer>", 1)
    + " "
    + _QUOTED.replace("(", "(?P<agent>", 1)
    + r"\s*$"
)
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unquote(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        esc = match.group(1)
        if len(esc) > 1:
            return chr(int(esc[1:], 16))
        return _SIMPLE_ESCAPES.get(esc, esc)

    return _ESCAPE_RE.sub(replace, text)


def parse_access_line(line: str, offset: int = 0) -> AccessEntry | None:
    """Parse one combined-format access line; return ``None`` for anything else."""
    match = _ACCESS_RE.match(line)
    if match is None:
        return None
    request = _unquote(match["request"]).split(" ")
    if len(request) < 3:
        return None
    method, protocol = request[0], request[-1]
    target = " ".join(request[1:-1])
    if "://" in target:
        # An absolute-form request target (proxy style); keep only path and query.
        parts = urllib.parse.urlsplit(target)
        target = parts.path + ("?" + parts.query if parts.query else "")
    try:
        when = datetime.strptime(match["time"], "%d/%b/%Y:%H:%M:%S %z")
    except ValueError:
        return None
    size = match["size"]
    return AccessEntry(
        remote_addr=match["remote"],
        user=match["user"],
        time=when,
        method=method,
        path=target,
        protocol=protocol,
        status=int(match["status"]),
        bytes_sent=0 if size == "-" else int(size),
        referer=_unquote(match["referer"]),
        user_agent=_unquote(match["agent"]),
        offset=offset,
    )


class RegistryError(RuntimeError):
    """The registry process failed to start or died."""


class Registry(Service):
    """A distribution registry on 127.0.0.1:<port>, storing under ``workdir``.

    The port is chosen once, at construction, so ``restart()`` keeps the same URL and the
    same storage. A fixed ``http.secret`` is written to the config so upload sessions that
    straddle a restart stay valid.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        token_auth: TokenAuthSettings | None = None,
        proxy_remote: str | None = None,
        binary: str | None = None,
        startup_timeout: float = 15,
    ) -> None:
        self.workdir = Path(workdir)
        self.token_auth = token_auth
        # Pull-through mode: a real middle tier in front of another registry.
        self.proxy_remote = proxy_remote
        self.binary = binary or find_registry_binary()
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self._secret = secrets.token_hex(16)
        self._process = None
        self._log_file: IO[bytes] | None = None

    # -- state ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- configuration -----------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The config dict written to ``config.yml`` on every start."""
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host, "secret": self._secret},
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.token_auth is not None:
            cfg["auth"] = {
                "token": {
                    "realm": self.token_auth.realm,
                    "service": self.token_auth.service,
                    "issuer": self.token_auth.issuer,
                    "rootcertbundle": str(self.token_auth.rootcertbundle),
                }
            }
        if self.proxy_remote is not None:
            cfg["proxy"] = {"remoteurl": self.proxy_remote}
        return cfg

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        # Append so marks taken before a restart stay valid offsets into the same file.
        self._log_file = self.log_path.open("ab")
        # The registry reads REGISTRY_* variables as config overrides; keep the caller's out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._process = subprocess.Popen(
            [self.binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_until(
                self._ready,
                timeout=self.startup_timeout,
                interval=0.05,
                message=f"registry on {self.host} did not become ready",
            )
        except (TimeoutError, RegistryError) as exc:
            self.stop()
            raise RegistryError(f"{exc}\n--- registry log tail ---\n{self.log_tail()}") from exc

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RegistryError(f"registry exited with status {self._process.returncode}")
        try:
            resp = http_request("GET", f"{self.url}/v2/", timeout=2)
        except OSError:
            return False
        expected = 401 if self.token_auth is not None else 200
        return resp.status == expected

    def stop(self, timeout: float = 10) -> None:
        """Terminate the registry and wait for it; idempotent."""
        proc, self._process = self._process, None
        if proc is not None:
            if proc.poll() is None:
                # A paused (SIGSTOP) process would hold SIGTERM pending forever.
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the registry: connections are accepted by the kernel but never answered."""
        if self._process is None:
            raise RegistryError("registry is not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause()``."""
        if self._process is None:
            raise RegistryError("registry is not running")
        self._process.send_signal(signal.SIGCONT)

    # -- logs --------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def mark(self) -> int:
        """An opaque position in the access log; pass it as ``since`` to see later requests."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _lines(self, since: int) -> Iterator[tuple[int, str]]:
        # Read one byte before the mark to learn whether the mark sits at a line start.
        before = max(since - 1, 0)
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(before)
                data = fh.read()
        except FileNotFoundError:
            return
        start = since - before
        if since > 0 and data[:1] != b"\n":
            # The mark fell inside a line that was being written; that line belongs before it.
            nl = data.find(b"\n", start)
            if nl < 0:
                return
            start = nl + 1
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                return  # a trailing partial line is still being written; skip it
            yield before + start, data[start:nl].decode("utf-8", errors="replace")
            start = nl + 1

    def access_log(self, since: int = 0) -> list[AccessEntry]:
        """Access entries written at or after ``since`` (a value from ``mark()``)."""
        entries = []
        for offset, line in self._lines(since):
            entry = parse_access_line(line, offset)
            if entry is not None:
                entries.append(entry)
        return entries

    def requests(
        self, method: str = "", path_contains: str = "", since: int = 0
    ) -> list[AccessEntry]:
        """Access entries filtered by method (case-insensitive; "" = any) and path substring."""
        return [
            e
            for e in self.access_log(since)
            if (not method or e.method.upper() == method.upper()) and path_contains in e.path
        ]

    def count(self, method: str, path_contains: str, since: int = 0) -> int:
        return len(self.requests(method, path_contains, since))

    def wait_for_access(
        self,
        method: str,
        path_contains: str,
        count: int = 1,
        since: int = 0,
        timeout: float = 10,
    ) -> list[AccessEntry]:
        """Wait until at least ``count`` matching entries are logged, and return them."""
        found: list[AccessEntry] = []

        def enough() -> bool:
            nonlocal found
            found = self.requests(method, path_contains, since)
            return len(found) >= count

        wait_until(
            enough,
            timeout=timeout,
            message=f"expected {count} x {method} *{path_contains}* in {self.log_path}",
        )
        return found
