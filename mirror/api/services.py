"""What the `/v2/` handlers call: the caches, the router and the access rules.

`create_app` builds one `Services` when the app starts and puts it behind `SERVICES`;
the handlers and the `authenticate` middleware read it from there, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from mirror.access import AccessControl
from mirror.cache.blobs import BlobCache
from mirror.cache.listings import Listings
from mirror.cache.manifests import ManifestCache
from mirror.routing import Router


@dataclass(frozen=True, slots=True)
class Services:
    router: Router
    blobs: BlobCache
    manifests: ManifestCache
    listings: Listings
    access: AccessControl


SERVICES = web.AppKey("services", Services)
