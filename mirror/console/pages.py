"""The console's pages under `/ui/` (built by the `consoleui` part; a stub until then)."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Add the `/ui/` routes."""
