"""The `mirror` command: serve, check-config, client-config, seed, export, import, gc,
verify, stats.

Each sub-command loads and validates the configuration first, so a bad key
stops it with a message naming the key and exit status 2. Flags beat `MIRROR_*`
variables, which beat the file (`load_config` applies the order). Each sub-command's
parser names its function (`set_defaults(func=...)`), all of one signature. The
commands that work on the cache open it through one of two helpers: `_on_core` (the
whole core, as a server would: seed, export, import) and `_on_store` (storage and
metadata alone: gc, verify, stats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from mirror import __version__, clientconfig
from mirror.config import ConfigError, MirrorConfig, load_config, parse_duration
from mirror.errors import BundleError, MetadataUnavailable, MirrorError, ObjectStoreUnavailable
from mirror.eviction import collect_garbage, verify_blobs
from mirror.logging import AccessLogger, configure_logging
from mirror.metadata.base import MetadataStore
from mirror.metrics import cache_stats
from mirror.policy import UpstreamPolicy
from mirror.storage.blobstore import BlobStore

if TYPE_CHECKING:
    from mirror.core import MirrorCore

EXIT_CONFIG = 2

T = TypeVar("T")
# Every sub-command's entry point, set on its parser with `set_defaults(func=...)`.
Command = Callable[[MirrorConfig, argparse.Namespace], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror", description="Pull-through caching registry mirror"
    )
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    serve.add_argument("--listen", help="host:port, overriding the config's listen")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT); default 1",
    )
    serve.add_argument(
        "--offline", action="store_true", help="never contact an upstream (as offline: true)"
    )
    # Set by the supervisor for its children: serve on a shared port, leave tmp/ alone.
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=serve_command)

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(func=check_config)

    gc = commands.add_parser(
        "gc", help="remove stale temp files, orphaned blobs and records, expired tags"
    )
    gc.add_argument("--config", type=Path, required=True)
    gc.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    gc.add_argument(
        "--temp-age",
        default="15m",
        help="temp files idle this long are stale (default 15m; 0 when no server runs)",
    )
    gc.set_defaults(func=gc_command)

    verify = commands.add_parser(
        "verify", help="re-hash every blob; move corrupt ones aside (exit 1 if any)"
    )
    verify.add_argument("--config", type=Path, required=True)
    verify.add_argument(
        "--sample",
        type=_fraction,
        default=None,
        metavar="PERCENT",
        help="re-hash this share of the blobs, chosen at random (e.g. 10%%); default all",
    )
    verify.set_defaults(func=verify_command)

    stats = commands.add_parser("stats", help="usage, counts, hit ratio, top repositories")
    stats.add_argument("--config", type=Path, required=True)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=stats_command)

    seed_parser = commands.add_parser("seed", help="fetch images into the cache ahead of time")
    seed_parser.add_argument("--config", type=Path, required=True)
    seed_parser.add_argument("references", nargs="*", metavar="REF", help="e.g. nginx:1.27")
    seed_parser.add_argument("-f", "--file", type=Path, help="a file of references, one a line")
    seed_parser.add_argument(
        "--platform",
        action="append",
        help="OS/ARCH[/VARIANT] to fetch from an index; repeatable (default: this host's)",
    )
    seed_parser.add_argument("--all-platforms", action="store_true")
    seed_parser.add_argument("--pin", action="store_true", help="never evict what is seeded")
    seed_parser.add_argument("--concurrency", type=int, default=4)
    seed_parser.set_defaults(func=seed_command)

    export = commands.add_parser("export", help="write cached images as an OCI image layout")
    export.add_argument("--config", type=Path, required=True)
    export.add_argument("--output", type=Path, required=True, help="FILE.tar or a directory")
    export.add_argument("references", nargs="*", metavar="REF")
    export.add_argument("--all", action="store_true", help="every tag the cache holds")
    export.set_defaults(func=export_command)

    importer = commands.add_parser("import", help="load an OCI image layout into the cache")
    importer.add_argument("--config", type=Path, required=True)
    importer.add_argument("bundle", type=Path, help="FILE.tar or a directory")
    importer.set_defaults(func=import_command)

    clients = commands.add_parser(
        "client-config", help="write containerd, Docker or podman configuration for this mirror"
    )
    clients.add_argument("client", choices=["containerd", "docker", "podman"])
    clients.add_argument("--config", type=Path, required=True)
    clients.add_argument(
        "--mirror-url",
        help="how clients reach the mirror (default: from listen), e.g. http://m:5000",
    )
    clients.add_argument(
        "--fallback",
        default="upstream",
        help="where clients go if the mirror does not answer: upstream (default), none, or a URL",
    )
    clients.add_argument(
        "--output", type=Path, help="directory to write into (default: print to stdout)"
    )
    clients.set_defaults(func=client_config)
    return parser


def _load(args: argparse.Namespace) -> MirrorConfig:
    # Only flags actually given: an absent flag must not hide the environment or file.
    flags: dict[str, object] = {}
    if getattr(args, "listen", None):
        flags["listen"] = args.listen
    if getattr(args, "offline", False):
        flags["offline"] = True
    return load_config(args.config, **flags)


def serve_command(config: MirrorConfig, args: argparse.Namespace) -> int:
    from mirror import server
    from mirror.app import create_app, create_peer_app, server_ssl_context
    from mirror.core import TempSweep
    from mirror.supervisor import Supervisor

    configure_logging(config.log.level, config.log.format)
    host, port = config.listen_address
    if args.workers < 1:
        print("mirror: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.workers > 1:
        if port == 0:
            print("mirror: --workers needs a fixed port in listen", file=sys.stderr)
            return EXIT_CONFIG
        worker_argv = ["serve", "--config", str(args.config)]
        if args.listen:
            worker_argv += ["--listen", args.listen]
        if args.offline:
            worker_argv.append("--offline")
        return Supervisor(config, worker_argv, args.workers).run()
    peer = None
    if config.cluster.listen_address is not None:
        peer = server.PeerSite(create_peer_app, *config.cluster.listen_address)
    server.run(
        create_app(config, sweep=TempSweep(None) if args.worker else None),
        host=host,
        port=port,
        ssl_context=server_ssl_context(config.tls),
        idle_timeout=config.server.idle_timeout,
        event_loop=config.server.event_loop,
        reuse_port=args.worker,
        access_log_class=AccessLogger,
        peer=peer,
    )
    return 0


def check_config(config: MirrorConfig, args: argparse.Namespace) -> int:
    names = ", ".join(sorted(config.upstreams))
    default = config.default_upstream or "(none)"
    print(
        f"{args.config}: OK; upstreams: {names}; default: {default}; storage: {config.storage.root}"
    )
    return 0


def client_config(config: MirrorConfig, args: argparse.Namespace) -> int:
    if args.mirror_url and urlsplit(args.mirror_url).scheme not in ("http", "https"):
        print("mirror: --mirror-url must be an http:// or https:// URL", file=sys.stderr)
        return EXIT_CONFIG
    if args.fallback not in ("upstream", "none") and urlsplit(args.fallback).scheme not in (
        "http",
        "https",
    ):
        print("mirror: --fallback takes upstream, none or an http(s) URL", file=sys.stderr)
        return EXIT_CONFIG
    if args.client == "docker":
        default = config.upstreams.get(config.default_upstream or "")
        if default is None or not default.is_docker_hub:
            print(
                "mirror: warning: Docker only mirrors Docker Hub, and default_upstream "
                "is not Docker Hub",
                file=sys.stderr,
            )
    files = clientconfig.generate(config, args.client, args.mirror_url, args.fallback)
    if args.output is None:
        for generated in files:
            print(f"# --- {generated.path}")
            print(generated.content, end="")
        return 0
    for path in clientconfig.write(files, args.output):
        print(f"wrote {path}")
    return 0


def _on_store(
    config: MirrorConfig, work: Callable[[BlobStore, MetadataStore], Awaitable[int]]
) -> int:
    """Open the storage and the metadata alone, run `work` on them, close them.

    For the commands that only read or tidy what is stored (gc, verify, stats): they
    need no upstream session and must not start the caches' background work. Only
    warnings are logged (to stderr): stdout is the command's report, which scripts read
    (`stats --json`), and an object store logs its connection at info."""
    from mirror.core import make_blob_store, open_metadata

    configure_logging("warning", config.log.format)

    async def run() -> int:
        store = make_blob_store(config)
        store.prepare(sweep_older_than=None)  # a server may be running: sweep nothing
        metadata = open_metadata(config, store)
        try:
            await store.start()
            return await work(store, metadata)
        except (MetadataUnavailable, ObjectStoreUnavailable) as exc:
            print(f"mirror: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await metadata.close()
            await store.close()

    return asyncio.run(run())


def _holder_removal(
    config: MirrorConfig, metadata: MetadataStore
) -> Callable[[str], Awaitable[None]] | None:
    """In fleet mode, a blob removed from this replica's disk is no longer held by it."""
    own_url = config.cluster.peer_url
    if not config.fleet or own_url is None:
        return None

    async def removed(digest: str) -> None:
        await metadata.remove_holder(digest, own_url)

    return removed


def gc_command(config: MirrorConfig, args: argparse.Namespace) -> int:
    try:
        temp_age = parse_duration(args.temp_age)
    except ValueError as exc:
        print(f"mirror: --temp-age: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    policies = {name: UpstreamPolicy.from_config(u) for name, u in config.upstreams.items()}

    def usable_for(upstream: str, repository: str, tag: str) -> float:
        policy = policies.get(upstream)
        if policy is None:
            return 0.0  # an upstream no longer configured: its tags are of no use
        return policy.ttl_for(repository, tag) + policy.max_stale

    async def work(store: BlobStore, metadata: MetadataStore) -> int:
        report = await collect_garbage(
            store,
            metadata,
            usable_for,
            temp_age=temp_age,
            dry_run=args.dry_run,
            on_removed=_holder_removal(config, metadata),
        )
        verb = "would remove" if args.dry_run else "removed"
        for label, items in (
            ("temp file", report.temp_files),
            ("orphan blob", report.orphan_files),
            ("dangling record", report.dangling_records),
            ("expired tag", report.expired_tags),
        ):
            for item in items:
                print(f"{verb} {label} {item}")
        total = sum(
            map(
                len,
                (
                    report.temp_files,
                    report.orphan_files,
                    report.dangling_records,
                    report.expired_tags,
                ),
            )
        )
        print(f"{verb} {total} items, {report.bytes_freed} bytes freed")
        return 0

    return _on_store(config, work)


def _fraction(text: str) -> float:
    """A share given as "10%" or "0.1", for argparse."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage like 10%, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected more than 0% and at most 100%, got {text!r}")
    return value


def verify_command(config: MirrorConfig, args: argparse.Namespace) -> int:
    async def work(store: BlobStore, metadata: MetadataStore) -> int:
        report = await verify_blobs(
            store, metadata, _holder_removal(config, metadata), sample=args.sample
        )
        for digest, moved in report.corrupt:
            print(f"corrupt {digest}: moved to {moved}")
        print(
            f"checked {report.checked} blobs ({report.bytes_checked} bytes): "
            f"{len(report.corrupt)} corrupt"
        )
        return 1 if report.corrupt else 0

    return _on_store(config, work)


def stats_command(config: MirrorConfig, args: argparse.Namespace) -> int:
    async def work(store: BlobStore, metadata: MetadataStore) -> int:
        stats = await cache_stats(store, metadata, fleet=config.fleet)
        if args.json:
            print(json.dumps(stats, indent=2))
            return 0
        limit = config.storage.max_size
        print(
            f"usage:        {stats['usage_bytes']} bytes" + (f" of {int(limit)}" if limit else "")
        )
        print(
            f"blobs:        {stats['blobs']} "
            f"({stats['manifests']} manifests, {stats['pinned']} pinned)"
        )
        print(f"tags:         {stats['tags']} in {stats['repositories']} repositories")
        ratio = stats["hit_ratio"]
        print(f"requests:     {stats['requests']}, hit ratio {'-' if ratio is None else ratio}")
        print(
            f"bytes served: {stats['bytes_from_cache']} from cache, "
            f"{stats['bytes_from_upstream']} from upstreams, "
            f"{stats['bytes_from_peers']} from peers"
        )
        if "fleet" in stats:
            fleet = stats["fleet"]
            print(
                f"fleet:        {fleet['replicas_alive']} replicas alive; blobs held once "
                f"{fleet['blobs_held_once']}, several times {fleet['blobs_held_several_times']}, "
                f"by no live replica {fleet['blobs_held_by_none_alive']}"
            )
        for entry in stats["top_repositories"]:
            print(f"  {entry['pulls']:>8}  {entry['repository']}")
        return 0

    return _on_store(config, work)


def _on_core(config: MirrorConfig, work: Callable[[MirrorCore], Awaitable[T]]) -> T:
    """Open the core, run `work` on it, close it; what `work` returns is returned.

    tmp/ is not swept (a server may be running on the same storage), and only
    warnings are logged: the command prints its own report."""
    from mirror.core import TempSweep, open_core

    configure_logging("warning", config.log.format)

    async def run() -> T:
        async with open_core(config, sweep=TempSweep(None)) as core:
            return await work(core)

    return asyncio.run(run())


def _reported_on_core(
    config: MirrorConfig,
    command: str,
    work: Callable[[MirrorCore], Awaitable[T | None]],
    describe: Callable[[T], Iterable[str]],
) -> int:
    """`_on_core` for a command with a report: 1 if `work` failed (a MirrorError is said
    here; None means `work` said why itself), else 0 once the report's lines are printed
    (after the core is closed, so they come last)."""

    async def attempt(core: MirrorCore) -> T | None:
        try:
            return await work(core)
        except MirrorError as exc:
            print(f"mirror: {command} failed: {exc.message}", file=sys.stderr)
            return None

    report = _on_core(config, attempt)
    if report is None:
        return 1
    for line in describe(report):
        print(line)
    return 0


def read_references(args: argparse.Namespace) -> list[str]:
    references = list(args.references)
    if args.file is not None:
        for line in args.file.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                references.append(line)
    return references


def seed_command(config: MirrorConfig, args: argparse.Namespace) -> int:
    from mirror.seed import host_platform, seed

    try:
        references = read_references(args)
    except OSError as exc:
        print(f"mirror: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    if not references:
        print("mirror: no references to seed (give REF... or -f FILE)", file=sys.stderr)
        return EXIT_CONFIG
    platforms = None if args.all_platforms else (args.platform or [host_platform()])
    outcomes = _on_core(
        config,
        lambda core: seed(core, references, platforms, pin=args.pin, concurrency=args.concurrency),
    )
    failed = [o for o in outcomes if o.error]
    done = [o for o in outcomes if not o.error]
    blobs = sum(o.blobs for o in done)
    fetched = sum(o.fetched for o in done)
    print(
        f"seeded {len(done)} of {len(outcomes)} references: {blobs} blobs "
        f"({fetched} fetched, {blobs - fetched} already cached), "
        f"{sum(o.bytes for o in done)} bytes" + (", pinned" if args.pin else "")
    )
    if failed:
        print(f"failed ({len(failed)}):")
        for outcome in failed:
            print(f"  {outcome.ref}: {outcome.error}")
    return 1 if failed else 0


def export_command(config: MirrorConfig, args: argparse.Namespace) -> int:
    from mirror.bundle import ExportReport, all_cached_references, export_bundle

    if not args.references and not args.all:
        print("mirror: name the images to export (REF...) or give --all", file=sys.stderr)
        return EXIT_CONFIG

    async def write(core: MirrorCore) -> ExportReport:
        references = list(args.references)
        if args.all:
            references += await all_cached_references(core)
        return await export_bundle(core, references, args.output, progress=print)

    return _reported_on_core(
        config,
        "export",
        write,
        lambda report: [
            f"wrote {args.output}: {len(report.images)} images, {report.blobs} blobs, "
            f"{report.bytes} bytes"
        ],
    )


def import_command(config: MirrorConfig, args: argparse.Namespace) -> int:
    from mirror.bundle import ImportReport, import_bundle

    async def load(core: MirrorCore) -> ImportReport | None:
        try:
            return await import_bundle(core, args.bundle)
        except BundleError as exc:
            # Refused before anything was committed or recorded.
            print(f"mirror: import refused: {exc.message}; nothing was imported", file=sys.stderr)
            return None

    return _reported_on_core(
        config,
        "import",
        load,
        lambda report: [
            *(f"imported {name}" for name in report.images),
            f"{len(report.images)} images: {report.blobs_added} blobs added "
            f"({report.bytes_added} bytes), {report.blobs_present} already present",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    command: Command = args.func
    return command(config, args)
