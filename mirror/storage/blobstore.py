"""Content-addressed files on local disk: the only writer into `blobs/`.

The layout, version 1:

    <root>/
    ├── layout-version              "1"
    ├── blobs/<algorithm>/<2 hex>/<hex>   complete, verified, immutable
    ├── tmp/                        in-flight downloads; emptied at start
    └── meta/                       the embedded metadata store (not ours)

A file appears under `blobs/` only through `BlobWriter.commit`: the bytes were
hashed while written, compared with the expected digest (and size), fsynced,
then renamed with `os.replace`, and the directory fsynced. A crash at any
moment leaves either no file or a complete verified one. The store knows
nothing of registries; every method here blocks, so async callers run them in
a thread.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mirror.errors import DigestInvalid, UpstreamBadResponse
from mirror.oci import Digest

LAYOUT_VERSION = "1"


class DigestMismatch(UpstreamBadResponse):
    """Bytes received did not hash to the digest (or size) they were fetched for."""


class BlobStore:
    """Verified, content-addressed blobs under one root directory."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.meta_dir = root / "meta"
        self.corrupt_dir = root / "corrupt"
        # Bytes under blobs/ as this process knows them: set by `scan_usage`, kept up to
        # date by commits and deletes here (other processes' are seen at the next scan).
        self.usage = 0

    def prepare(self, sweep_older_than: float | None = 0.0) -> int:
        """Create the layout and sweep left-over temp files; return how many were swept.

        Only this process writes here: sweep everything (`0`). Other processes or nodes
        may be downloading into a shared tmp/: sweep only files idle for longer than
        `sweep_older_than` seconds (a live download touches its file continually).
        `None` sweeps nothing.
        """
        for directory in (self.root, self.blobs_dir, self.tmp_dir, self.meta_dir):
            directory.mkdir(parents=True, exist_ok=True)
        version_file = self.root / "layout-version"
        if version_file.exists():
            found = version_file.read_text(encoding="utf-8").strip()
            if found != LAYOUT_VERSION:
                raise RuntimeError(
                    f"storage root {self.root} has layout version {found}; "
                    f"this mirror uses {LAYOUT_VERSION}"
                )
        else:
            version_file.write_text(LAYOUT_VERSION + "\n", encoding="utf-8")
        if sweep_older_than is None:
            return 0
        swept = 0
        cutoff = time.time() - sweep_older_than
        for entry in self.tmp_dir.iterdir():
            # Nothing in tmp/ survives its writer: an in-flight download is unverified.
            try:
                if sweep_older_than and entry.lstat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            swept += 1
        return swept

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created in tmp/ (readiness)."""
        probe = self.tmp_dir / f".ready-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()

    def path(self, digest: Digest) -> Path:
        # Digest.parse has already restricted algorithm and hex to [a-z0-9], so this
        # path cannot leave blobs/.
        return self.blobs_dir / digest.algorithm / digest.hex[:2] / digest.hex

    def size(self, digest: Digest) -> int | None:
        """The size of a committed blob, or None if it is not here."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_committed(self, digest: Digest) -> tuple[BinaryIO, int] | None:
        """The committed blob opened for reading, with its size; None if not here."""
        try:
            file = open(self.path(digest), "rb")  # noqa: SIM115 - the caller owns it
        except FileNotFoundError:
            return None
        return file, os.fstat(file.fileno()).st_size

    def read_bytes(self, digest: Digest) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def new_writer(self, digest: Digest, expected_size: int | None = None) -> BlobWriter:
        return BlobWriter(self, digest, expected_size)

    def put_bytes(self, digest: Digest, data: bytes) -> Path:
        """Verify and commit a small blob (a manifest) held in memory."""
        writer = self.new_writer(digest, len(data))
        try:
            writer.write(data)
            return writer.commit()
        finally:
            writer.discard()

    def delete(self, digest: Digest) -> int:
        """Remove a committed blob; return the bytes freed. Readers with the file open
        keep reading it whole: the inode lives until they close it."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        self.usage = max(self.usage - size, 0)
        return size

    def move_aside(self, digest: Digest) -> Path | None:
        """Take a (corrupt) blob out of the cache, keeping it under corrupt/ to inspect."""
        self.corrupt_dir.mkdir(exist_ok=True)
        target = self.corrupt_dir / f"{digest.algorithm}-{digest.hex}"
        try:
            size = self.path(digest).stat().st_size
            os.replace(self.path(digest), target)
        except FileNotFoundError:
            return None
        self.usage = max(self.usage - size, 0)
        return target

    def scan_usage(self) -> int:
        """Walk blobs/ and return (and remember) the bytes it holds."""
        self.usage = sum(stat.st_size for _, stat in self.iter_digests())
        return self.usage

    def hash_matches(self, digest: Digest) -> bool:
        """Re-read a committed blob and check it still hashes to its name."""
        hasher = digest.hasher()
        with open(self.path(digest), "rb") as file:
            while chunk := file.read(1024 * 1024):
                hasher.update(chunk)
        return hasher.hexdigest() == digest.hex

    def iter_digests(self) -> Iterator[tuple[Digest, os.stat_result]]:
        """Every committed blob with its stat (size, mtime)."""
        for algorithm_dir in sorted(self.blobs_dir.iterdir()):
            for prefix_dir in sorted(algorithm_dir.iterdir()):
                with os.scandir(prefix_dir) as entries:
                    for entry in entries:
                        try:
                            digest = Digest.parse(f"{algorithm_dir.name}:{entry.name}")
                        except DigestInvalid:
                            continue  # not ours: a stray file someone put there
                        with contextlib.suppress(FileNotFoundError):
                            yield digest, entry.stat()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """A temp file that hashes what is written and commits only a verified blob."""

    def __init__(self, store: BlobStore, digest: Digest, expected_size: int | None):
        self.store = store
        self.digest = digest
        self.expected_size = expected_size
        self.temp_path = store.tmp_dir / f"{digest.hex[:16]}.{secrets.token_hex(8)}"
        self._hasher = digest.hasher()
        self._file = open(self.temp_path, "xb")  # noqa: SIM115 - owned until commit/discard
        self.written = 0
        self._verified = False
        self._committed = False

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hasher.update(chunk)
        self.written += len(chunk)

    def flush(self) -> None:
        """Make written bytes visible to readers of the temp file."""
        self._file.flush()

    def verify(self) -> None:
        """Raise `DigestMismatch` unless what was written hashes to the digest (and size)."""
        if self._verified:
            return
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(
                "upstream content does not match its digest",
                detail={
                    "expected": str(self.digest),
                    "actual": f"{self.digest.algorithm}:{actual}",
                },
            )
        if self.expected_size is not None and self.written != self.expected_size:
            raise DigestMismatch(
                "upstream content has the wrong size",
                detail={"expected": self.expected_size, "actual": self.written},
            )
        self._verified = True

    def commit(self) -> Path:
        """Verify, fsync, and move into `blobs/`: only now is the blob in the cache."""
        self.verify()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.store.path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, final)
        _fsync_dir(final.parent)
        self._committed = True
        self.store.usage += self.written
        return final

    def discard(self) -> None:
        """Close and delete the temp file unless it was committed. Safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if not self._committed:
            self.temp_path.unlink(missing_ok=True)
