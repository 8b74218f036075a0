"""The dashboard's routes on the router's aiohttp app: the page (``/dashboard/``, static files shipped in the
package, no build step) and its JSON (``/dashboard/api/state``, keyed by the router's ``--api-key`` like every
compute route; the page asks for the key and never embeds it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from slicelm.router.dashboard.sampler import Sampler
from slicelm.router.errors import error_response

if TYPE_CHECKING:
    from slicelm.router.app import Router

STATIC = Path(__file__).resolve().parent / "static"
PAGE = "/dashboard/"
API = "/dashboard/api/state"
NO_CACHE = {"Cache-Control": "no-store"}

StateFn = Callable[[], Awaitable[dict[str, Any] | None]]


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("dashboard/")  # relative: the page's own links stay relative behind a path prefix


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers=NO_CACHE)


def add_page_routes(app: web.Application, state: StateFn) -> None:
    """The page, its files and the state endpoint answered by ``state`` (live, or a recording: replay.py)."""

    async def api_state(request: web.Request) -> web.Response:
        body = await state()
        if body is None:
            return error_response(503, "the dashboard has no sample yet; retry in a few seconds",
                                  code="dashboard_not_ready")
        return web.json_response(body, headers=NO_CACHE)

    app.router.add_get("/dashboard", _redirect)
    app.router.add_get(PAGE, _index)
    app.router.add_static("/dashboard/static", STATIC, append_version=False)
    app.router.add_get(API, api_state)


def register_dashboard(app: web.Application, router: Router, version: str) -> Sampler:
    """Adds the dashboard to the router's app; its sampler runs while the app does."""
    sampler = Sampler(router, version)
    add_page_routes(app, sampler.view)
    app.on_startup.append(sampler.start)
    app.on_cleanup.append(sampler.stop)
    return sampler
