"""The `mirror` command: serve, check-config.

Each sub-command loads and validates the configuration first, so a bad key
stops it with a message naming the key and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from mirror import __version__
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

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("--config", type=Path, required=True)
    return parser


def _load(args: argparse.Namespace) -> MirrorConfig:
    overrides = {"listen": args.listen} if getattr(args, "listen", None) else {}
    return load_config(args.config, **overrides)


def serve(config: MirrorConfig) -> int:
    from mirror.app import create_app

    configure_logging(config.log.level, config.log.format)
    host, port = config.listen_address
    web.run_app(
        create_app(config),
        host=host,
        port=port,
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "serve":
        return serve(config)
    return check_config(config, args.config)
