"""The picture routes: ``/api/thumb`` (JPEG thumbnails), ``/api/explain`` ("why it matched", PNG) and the
browser front end's static files."""

from __future__ import annotations

import io
from typing import Any

from aiohttp import web

from plumbing.fsutil import read_input
from serving.errors import BadRequest, Unavailable, json_error
from serving.parsing import check_length, requested_id
from serving.search_routes import find_item
from serving.state import STATE
from serving.thumbnails import DEFAULT_SIDE, ThumbnailCache, ThumbnailUnavailable
from serving.versions import ServedVersion


def run_thumbnail(served: ServedVersion, cache: ThumbnailCache, image_id: str, side: int) -> bytes:
    s = served.searcher
    gid = find_item(served, image_id, "id")
    return cache.get(s.uris[gid], s.sha256[gid], side)


def run_explain(served: ServedVersion, explain: Any, query: bytes | None, query_id: str | None,
                result_id: str, method: str) -> bytes:
    s = served.searcher
    if served.embedder is None:
        raise Unavailable("this service was started without image search (--no-images): no explanation maps")
    result = find_item(served, result_id, "result_id")
    if query is None:
        gid = find_item(served, query_id, "query_id")
        try:
            query = read_input(s.uris[gid])
        except Exception as exc:
            raise BadRequest(f"the query item's bytes cannot be read from {s.uris[gid]}: {exc}") from None
    try:
        picture = explain(s, served.embedder, query, result, method=method)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


async def thumb_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    image_id = requested_id(request)
    try:
        side = int(request.query.get("size", DEFAULT_SIDE))
    except ValueError:
        raise BadRequest(f"size must be an integer, not {request.query.get('size')!r}") from None
    try:
        data = await state.run(run_thumbnail, state.thumbnails, image_id, side)
    except ThumbnailUnavailable as exc:
        return json_error(404, f"no thumbnail for {image_id!r}: {exc}")
    except ValueError as exc:
        if isinstance(exc, BadRequest) and "no item" in str(exc):
            return json_error(404, str(exc))
        raise BadRequest(str(exc)) from None
    return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def explain_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_length(request)
    if request.content_type != "multipart/form-data":
        raise BadRequest("send multipart/form-data with result_id and either an 'image' file or query_id")
    try:
        form = await request.post()
    except ValueError as exc:
        raise BadRequest(f"the multipart body could not be read: {exc}") from None
    upload = form.get("image")
    query = upload.file.read() if upload is not None and hasattr(upload, "file") else None
    query_id = form.get("query_id") if query is None else None
    result_id = form.get("result_id")
    method = form.get("method", "occlusion")
    if not isinstance(result_id, str) or not result_id:
        raise BadRequest("result_id (the image id of the result to explain) is required")
    if query is None and not (isinstance(query_id, str) and query_id):
        raise BadRequest("give the query as an 'image' file or as query_id")
    png = await state.run(run_explain, state.explain, query, query_id, result_id, str(method))
    return web.Response(body=png, content_type="image/png")


def static_file(name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        data, kind = request.app[STATE].static[name]
        return web.Response(body=data, content_type=kind, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    return handler
