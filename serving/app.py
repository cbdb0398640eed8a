"""The HTTP routes of ``cbir serve``: a JSON search API and the browser front end, on aiohttp.

Routes (every ``/api/`` route takes the bearer token when the service has one):

====================  ==================================================================
``GET /``             the browser front end (``static/``: no build step, nothing fetched elsewhere)
``GET /healthz``      served version, what ``LATEST`` names, and the error when a new version
                      failed to open (always open: probes carry no token)
``GET /api/info``     the served version, its size, methods and re-ranking capabilities, limits
``POST /api/search``  JSON ``{"image_id" | "vector", "k", "method", "rerank", "qe", "qe_alpha",
                      "diffusion", "verify", "like", "unlike", ...}``, or multipart with an
                      ``image`` file and an ``options`` JSON field: search by uploaded bytes
``GET /api/item``     ``?id=IMAGE_ID``: the item's metadata (label, uri, digest, shard)
``GET /api/thumb``    ``?id=IMAGE_ID&size=N``: a JPEG thumbnail, at most ``size`` px a side
``POST /api/explain`` "why it matched" heat map (PNG), only when ``inspection.explain`` is importable
====================  ==================================================================

Why the shape: searches are CPU work (numpy, Annoy, faiss, TensorFlow), so they run in a
bounded thread pool, never on the event loop (``state.ServiceState``); a request beyond the pool
and its queue is answered 503 at once rather than piling up, each request has a time limit, and
bodies are limited before they are read. Each request holds a lease on the index version it
started with (``versions.VersionFollower``), and every answer names that version, so a swap to a
new version never mixes two versions in one answer. Errors are JSON ``{"error": message}``
(``errors``, ``middleware``) with a 4xx status for the caller's mistakes and 5xx for the server's;
never a traceback. This module wires the routes (``search_routes``, ``media_routes``) together.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from serving.config import ServiceConfig
from serving.media_routes import explain_handler, static_file, thumb_handler
from serving.middleware import errors_middleware, security_headers, token_middleware
from serving.search_routes import info_handler, item_handler, search_handler
from serving.state import STATE, ServiceState
from serving.versions import VersionFollower

__all__ = ["ServiceConfig", "ServiceState", "make_app"]

log = logging.getLogger(__name__)


async def healthz_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = state.follower.status()
    body.update(in_flight=state.in_flight, capacity=state.capacity, answered=state.answered, rejected=state.rejected)
    return web.json_response(body, status=503 if body["status"] == "down" else 200)


async def _follow(app: web.Application) -> Any:
    """Background task: check ``LATEST`` every ``poll_seconds`` (opening runs off the request pool)."""
    state = app[STATE]
    loop = asyncio.get_running_loop()

    async def poll() -> None:
        while True:
            await asyncio.sleep(state.follower.poll_seconds)
            try:
                await loop.run_in_executor(state.admin, state.follower.check)
            except Exception:  # check records its own errors; anything else must not stop the polling
                log.exception("checking %s/LATEST failed", state.follower.index_dir)

    task = asyncio.create_task(poll()) if state.follower.poll_seconds > 0 else None
    yield
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    state.close()


def make_app(follower: VersionFollower, config: ServiceConfig | None = None) -> web.Application:
    """The aiohttp application over a started follower (``follower.start()`` opened the first version)."""
    config = config or ServiceConfig()
    state = ServiceState(follower, config)
    app = web.Application(client_max_size=config.max_upload_bytes, middlewares=[errors_middleware, token_middleware])
    app[STATE] = state
    app.on_response_prepare.append(security_headers)
    app.cleanup_ctx.append(_follow)
    app.router.add_get("/", static_file("index.html"))
    app.router.add_get("/static/app.js", static_file("app.js"))
    app.router.add_get("/static/app.css", static_file("app.css"))
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/api/info", info_handler)
    app.router.add_post("/api/search", search_handler)
    app.router.add_get("/api/item", item_handler)
    app.router.add_get("/api/thumb", thumb_handler)
    if state.explain is not None:
        app.router.add_post("/api/explain", explain_handler)
    return app
