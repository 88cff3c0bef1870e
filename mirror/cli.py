"""The `mirror` command: serve, check-config, client-config.

Each sub-command loads and validates the configuration first, so a bad key
stops it with a message naming the key and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from mirror import __version__, clientconfig
from mirror.config import ConfigError, MirrorConfig, load_config
from mirror.logging import AccessLogger, configure_logging

EXIT_CONFIG = 2


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
    # Set by the supervisor for its children: serve on a shared port, leave tmp/ alone.
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("--config", type=Path, required=True)

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
    return parser


def _load(args: argparse.Namespace) -> MirrorConfig:
    overrides = {"listen": args.listen} if getattr(args, "listen", None) else {}
    return load_config(args.config, **overrides)


def serve(config: MirrorConfig, args: argparse.Namespace) -> int:
    from mirror.app import TempSweep, create_app
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
        return Supervisor(config, worker_argv, args.workers).run()
    web.run_app(
        create_app(config, sweep=TempSweep(None) if args.worker else None),
        host=host,
        port=port,
        reuse_port=args.worker,
        access_log_class=AccessLogger,
        print=None,
        shutdown_timeout=10,
    )
    return 0


def check_config(config: MirrorConfig, path: Path) -> int:
    names = ", ".join(sorted(config.upstreams))
    default = config.default_upstream or "(none)"
    print(f"{path}: OK; upstreams: {names}; default: {default}; storage: {config.storage.root}")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "serve":
        return serve(config, args)
    if args.command == "client-config":
        return client_config(config, args)
    return check_config(config, args.config)
