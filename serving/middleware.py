"""What every answer passes through: errors as JSON, the bearer token on ``/api/``, the security headers."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from aiohttp import web

from serving.errors import BadRequest, TimedOut, Unavailable, json_error
from serving.state import STATE

log = logging.getLogger(__name__)


CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as JSON ``{"error": ...}``: 4xx for the caller's mistakes, 5xx for ours, never a traceback."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return json_error(400, str(exc))
    except Unavailable as exc:
        return json_error(503, str(exc), {"Retry-After": "1"})
    except TimedOut as exc:
        return json_error(504, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reasons = {413: f"the request body is larger than the limit of "
                        f"{request.app[STATE].config.max_upload_bytes} bytes",
                   404: f"no such route: {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}"}
        kept = {h: exc.headers[h] for h in ("Allow", "Retry-After") if h in exc.headers}
        return json_error(exc.status, reasons.get(exc.status, exc.reason), kept)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return json_error(500, f"internal error ({type(exc).__name__}); the server log has the details")


@web.middleware
async def token_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """``/api/`` needs ``Authorization: Bearer TOKEN`` when the service has a token (compared in constant time)."""
    token = request.app[STATE].config.token
    if token is not None and request.path.startswith("/api/"):
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return json_error(401, "this service needs a bearer token: send Authorization: Bearer TOKEN",
                              {"WWW-Authenticate": 'Bearer realm="cbir"'})
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.content_type == "text/html":
        response.headers["Content-Security-Policy"] = CSP
