"""How the service says no: the failures a route raises and the JSON ``{"error": message}`` answer they become.

A route raises the kind of failure it meets; ``middleware.errors_middleware`` turns it into the status
(400, 503, 504) so that no route builds error answers of its own and no traceback ever leaves.
"""

from __future__ import annotations

from aiohttp import web


class BadRequest(ValueError):
    """The caller's mistake: answered 400 with the message."""


class Unavailable(RuntimeError):
    """The server cannot answer this now or at all (overloaded, no embedder): answered 503."""


class TimedOut(RuntimeError):
    """The request ran past the per-request time limit: answered 504."""


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
