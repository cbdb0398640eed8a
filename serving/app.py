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
bounded thread pool, never on the event loop; a request beyond the pool and its queue is
answered 503 at once rather than piling up, each request has a time limit, and bodies are
limited before they are read. Each request holds a lease on the index version it started
with (``versions.VersionFollower``), and every answer names that version, so a swap to a
new version never mixes two versions in one answer. Errors are JSON ``{"error": message}``
with a 4xx status for the caller's mistakes and 5xx for the server's; never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.resources
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from aiohttp import web

from plumbing.fsutil import read_input
from search.methods import SearchOptions
from search.rerank import FeedbackWeights
from serving.thumbnails import DEFAULT_SIDE, ThumbnailCache, ThumbnailUnavailable
from serving.versions import ServedVersion, VersionFollower

log = logging.getLogger(__name__)

# the request fields of a search, with what each must be
SEARCH_FIELDS = ("image_id", "vector", "k", "method", "rerank", "qe", "qe_alpha", "diffusion", "verify", "like",
                 "unlike", "include_self", "search_k", "ef_search", "candidates", "feedback_weights")
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Limits and access of the HTTP service (the index side is in ``versions.OpenOptions``)."""

    workers: int = 2  # threads running searches, embeddings and thumbnails
    queue: int = 32  # requests that may wait for a worker; beyond workers + queue: 503 at once
    max_upload_bytes: int = 16 << 20  # request body limit (aiohttp client_max_size): larger is 413
    timeout_seconds: float = 30.0  # per request: 504 beyond it
    max_k: int = 100
    max_feedback: int = 200  # like + unlike ids per request
    max_qe: int = 50
    token: str | None = None  # bearer token for /api/ (None: no token)
    thumbnail_cache_mb: int = 32
    thumbnail_max_input_bytes: int = 64 << 20

    def validate(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, not {self.workers}")
        if self.queue < 0:
            raise ValueError(f"--queue must not be negative, not {self.queue}")
        if self.timeout_seconds <= 0:
            raise ValueError(f"--timeout must be positive, not {self.timeout_seconds}")
        if self.max_upload_bytes < 1024:
            raise ValueError(f"--max-upload-mb is too small: {self.max_upload_bytes} bytes")
        if self.max_k < 1:
            raise ValueError(f"--max-k must be at least 1, not {self.max_k}")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("the token must be at least 16 characters long")


class BadRequest(ValueError):
    """The caller's mistake: answered 400 with the message."""


class Unavailable(RuntimeError):
    """The server cannot answer this now or at all (overloaded, no embedder): answered 503."""


class TimedOut(RuntimeError):
    """The request ran past the per-request time limit: answered 504."""


class ServiceState:
    """What the routes share: the version follower, the worker pool, the in-flight count, the caches."""

    def __init__(self, follower: VersionFollower, config: ServiceConfig):
        config.validate()
        self.follower = follower
        self.config = config
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="cbir-serve")
        self.admin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-follow")  # opening versions
        self.thumbnails = ThumbnailCache(config.thumbnail_cache_mb << 20, config.thumbnail_max_input_bytes)
        self.capacity = config.workers + config.queue
        self.in_flight = 0
        self.answered = 0
        self.rejected = 0
        self.explain = _load_explain()
        self.static = {name: (importlib.resources.files("serving").joinpath("static", name).read_bytes(),
                              kind) for name, kind in STATIC_FILES.items()}

    async def run(self, request_fn: Any, *args: Any) -> Any:
        """``request_fn(served, *args)`` in the pool, under a lease on the current version.

        Refused at once (503) when the pool and its queue are full; 504 past the time limit.
        The lease and the pool place are given back when the work ends, not when the caller
        stops waiting, so a timed-out search still counts until it is done and its version
        is not closed under it; work whose deadline passed while it queued is not started.
        """
        if self.in_flight >= self.capacity:
            self.rejected += 1
            raise Unavailable(f"the server is busy ({self.in_flight} requests in flight, limit {self.capacity}): "
                              "retry shortly")
        try:
            served = self.follower.acquire()
        except LookupError as exc:
            raise Unavailable(str(exc)) from None
        limit = self.config.timeout_seconds
        deadline = time.monotonic() + limit

        def job() -> Any:
            if time.monotonic() > deadline:
                raise TimeoutError("expired while queued")
            return request_fn(served, *args)

        self.in_flight += 1
        future = asyncio.get_running_loop().run_in_executor(self.pool, job)

        def done(finished: asyncio.Future) -> None:
            self.in_flight -= 1
            self.follower.release(served)
            if not finished.cancelled():
                finished.exception()  # marks it seen: a caller that timed out no longer awaits it

        future.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            raise TimedOut(f"the request took longer than the limit of {limit:g}s") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.admin.shutdown(wait=False, cancel_futures=True)
        self.follower.close()


STATE = web.AppKey("cbir_state", ServiceState)


def _load_explain() -> Any:
    """``inspection.explain.explain_match`` when that module is there and imports; else None (no endpoint)."""
    try:
        from inspection.explain import explain_match
    except ImportError:
        return None
    except Exception as exc:  # present but broken: the service still starts, without the map
        log.warning("inspection.explain is present but failed to import (%s: %s): no \"why it matched\" endpoint",
                    type(exc).__name__, exc)
        return None
    return explain_match


# -- errors, access, headers -----------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as JSON ``{"error": ...}``: 4xx for the caller's mistakes, 5xx for ours, never a traceback."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return _error(400, str(exc))
    except Unavailable as exc:
        return _error(503, str(exc), {"Retry-After": "1"})
    except TimedOut as exc:
        return _error(504, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reasons = {413: f"the request body is larger than the limit of "
                        f"{request.app[STATE].config.max_upload_bytes} bytes",
                   404: f"no such route: {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}"}
        kept = {h: exc.headers[h] for h in ("Allow", "Retry-After") if h in exc.headers}
        return _error(exc.status, reasons.get(exc.status, exc.reason), kept)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")


@web.middleware
async def token_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """``/api/`` needs ``Authorization: Bearer TOKEN`` when the service has a token (compared in constant time)."""
    token = request.app[STATE].config.token
    if token is not None and request.path.startswith("/api/"):
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return _error(401, "this service needs a bearer token: send Authorization: Bearer TOKEN",
                          {"WWW-Authenticate": 'Bearer realm="cbir"'})
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.content_type == "text/html":
        response.headers["Content-Security-Policy"] = CSP


# -- reading requests -------------------------------------------------------------------------------


def _integer(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, not {json.dumps(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low} and {high}, not {value}")
    return value


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise BadRequest(f"{key} must be a number, not {json.dumps(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low:g} and {high:g}, not {value:g}")
    return float(value)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false, not {json.dumps(value)}")
    return value


def _ids(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise BadRequest(f"{key} must be a list of image ids (strings)")
    return list(dict.fromkeys(value))


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """One search as asked: exactly one query (an item, a vector or image bytes), options, feedback marks."""

    options: dict[str, Any]  # SearchOptions fields
    image_id: str | None = None
    vector: tuple[float, ...] | None = None
    image: bytes | None = None
    filename: str | None = None
    like: tuple[str, ...] = ()
    unlike: tuple[str, ...] = ()
    include_self: bool = False


def parse_search(body: Any, config: ServiceConfig, image: bytes | None = None,
                 filename: str | None = None) -> SearchRequest:
    """Checks a search body field by field; every refusal names the field and what it must be."""
    if not isinstance(body, dict):
        raise BadRequest("the search must be a JSON object")
    unknown = sorted(set(body) - set(SEARCH_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; a search takes {', '.join(SEARCH_FIELDS)}")
    given = [name for name, present in (("image_id", "image_id" in body), ("vector", "vector" in body),
                                        ("image", image is not None)) if present]
    if len(given) != 1:
        raise BadRequest("give exactly one query: image_id, vector, or an uploaded image" +
                         (f" (got {', '.join(given)})" if given else ""))
    method = body.get("method", "auto")
    if not isinstance(method, str) or not method:
        raise BadRequest(f"method must be a method name, not {json.dumps(method)}")
    options: dict[str, Any] = {
        "k": _integer(body, "k", 10, 1, config.max_k),
        "method": method,
        "rerank": _flag(body, "rerank"),
        "qe": _integer(body, "qe", 0, 0, config.max_qe),
        "qe_alpha": _number(body, "qe_alpha", 0.0, 0.0, 100.0),
    }
    for key in ("search_k", "ef_search", "candidates"):
        if key in body:
            options[key] = _integer(body, key, 0, -1 if key == "search_k" else 0, 1_000_000)
    if _flag(body, "diffusion"):
        options["diffusion"] = True
    if "verify" in body:
        verify = body["verify"]
        verify = (50 if verify else 0) if isinstance(verify, bool) else _integer(body, "verify", 0, 0, 1000)
        if verify:
            options["verify"] = verify
    if "feedback_weights" in body:
        weights = body["feedback_weights"]
        if not (isinstance(weights, list) and len(weights) == 3 and all(
                isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights)):
            raise BadRequest("feedback_weights must be three non-negative numbers [alpha, beta, gamma]")
        options["feedback"] = FeedbackWeights(*map(float, weights))
    like, unlike = _ids(body, "like"), _ids(body, "unlike")
    if len(like) + len(unlike) > config.max_feedback:
        raise BadRequest(f"at most {config.max_feedback} like + unlike marks per search, not {len(like) + len(unlike)}")
    both = sorted(set(like) & set(unlike))
    if both:
        raise BadRequest(f"{both[0]!r} is marked both relevant and not relevant")
    request = SearchRequest(options=options, like=tuple(like), unlike=tuple(unlike),
                            include_self=_flag(body, "include_self"), image=image, filename=filename)
    if "image_id" in body:
        if not isinstance(body["image_id"], str) or not body["image_id"]:
            raise BadRequest(f"image_id must be a non-empty string, not {json.dumps(body['image_id'])}")
        request = dataclasses.replace(request, image_id=body["image_id"])
    elif "vector" in body:
        vec = body["vector"]
        if not isinstance(vec, list) or not vec or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in vec):
            raise BadRequest("vector must be a non-empty list of numbers")
        request = dataclasses.replace(request, vector=tuple(float(x) for x in vec))
    return request


# -- doing the work (in the pool) -------------------------------------------------------------------


def _find(served: ServedVersion, image_id: str, role: str) -> int:
    try:
        return served.find(image_id)
    except KeyError:
        raise BadRequest(f"{role}: no item {image_id!r} in index version {served.version}") from None


def _options(served: ServedVersion, fields: dict[str, Any]) -> SearchOptions:
    try:
        return served.searcher.options(SearchOptions(**fields))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def run_search(served: ServedVersion, req: SearchRequest) -> dict[str, Any]:
    """The search itself, on one leased version; returns the response body (which names that version)."""
    s = served.searcher
    started = time.perf_counter()
    opts = _options(served, req.options)
    caps = served.capabilities
    if opts.verify and not caps.get("verify"):
        raise BadRequest(f"index version {served.version} carries no local features, so verification cannot run "
                         "(extract with --local-features, then rebuild the index)")
    if opts.diffusion and not caps.get("diffusion"):
        raise BadRequest(f"index version {served.version} has no k-NN graph, so diffusion cannot run "
                         "(rebuild the index with --graph-k)")
    like = [_find(served, x, "like") for x in req.like]
    unlike = [_find(served, x, "unlike") for x in req.unlike]
    exclude, local, embed_ms = None, None, None
    if req.image_id is not None:
        gid = _find(served, req.image_id, "image_id")
        vector = s.vectors_of(np.asarray([gid]))[0]
        exclude = None if req.include_self else gid
        query: dict[str, Any] = {"image_id": req.image_id}
    elif req.vector is not None:
        vector = np.asarray(req.vector, np.float32)
        if vector.shape != (s.dim,):
            raise BadRequest(f"vector has {len(vector)} numbers; this index's vectors have {s.dim}")
        if not np.isfinite(vector).all() or not np.any(vector):
            raise BadRequest("vector must be finite and not all zeros")
        query = {"vector": int(s.dim)}
    else:
        if served.embedder is None:
            raise Unavailable("this service was started without image search (--no-images): search by id or vector")
        vectors, _, failures = served.embedder.embed_bytes([req.image])
        if failures:
            raise BadRequest(f"the upload is not a usable image: {failures[0].error}: {failures[0].message}")
        vector = vectors[0]
        embed_ms = (time.perf_counter() - started) * 1e3
        if opts.verify:
            local = s.query_local_features(req.image)
        query = {"upload": req.filename or "image", "bytes": len(req.image)}
    searched = time.perf_counter()
    try:
        hits = s.search(vector, opts, exclude=exclude, like=like, unlike=unlike, local=local)
    except ValueError as exc:  # asked for what this version cannot do (verification without local features, …)
        raise BadRequest(str(exc)) from None
    done = time.perf_counter()
    results = []
    for rank, hit in enumerate(hits, 1):
        row = s.describe(hit, rank)
        row.pop("uri", None)  # where the bytes live is item metadata (/api/item), not part of every answer
        inliers = getattr(hit, "inliers", None)
        if inliers is not None:
            row["inliers"] = int(inliers)
        results.append(row)
    options = {k: v for k, v in opts.to_dict().items() if k in ("k", "method", "rerank", "qe", "qe_alpha",
                                                                "diffusion", "verify")}
    timings = {"search": round((done - searched) * 1e3, 3), "total": round((done - started) * 1e3, 3)}
    if embed_ms is not None:
        timings["embed"] = round(embed_ms, 3)
    return {"version": served.version, "query": query, "options": options,
            "feedback": {"like": list(req.like), "unlike": list(req.unlike)}, "results": results,
            "timings_ms": timings}


def run_item(served: ServedVersion, image_id: str) -> dict[str, Any]:
    s = served.searcher
    gid = _find(served, image_id, "id")
    shard, item = s.locate(gid)
    return {"version": served.version, "image_id": image_id, "label": s.labels[gid], "uri": s.uris[gid],
            "sha256": s.sha256[gid], "shard": shard, "id": item}


def run_thumbnail(served: ServedVersion, cache: ThumbnailCache, image_id: str, side: int) -> bytes:
    s = served.searcher
    gid = _find(served, image_id, "id")
    return cache.get(s.uris[gid], s.sha256[gid], side)


def run_explain(served: ServedVersion, explain: Any, query: bytes | None, query_id: str | None,
                result_id: str, method: str) -> bytes:
    s = served.searcher
    if served.embedder is None:
        raise Unavailable("this service was started without image search (--no-images): no explanation maps")
    result = _find(served, result_id, "result_id")
    if query is None:
        gid = _find(served, query_id, "query_id")
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


# -- routes -----------------------------------------------------------------------------------------


async def _read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise BadRequest(f"send the search as application/json (or multipart/form-data with an image), "
                         f"not {request.content_type or 'no content type'}")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


async def _read_upload(request: web.Request) -> tuple[Any, bytes, str | None]:
    """(options, image bytes, file name) of a multipart search: an ``image`` file and an ``options`` JSON field."""
    try:
        form = await request.post()
    except ValueError as exc:
        raise BadRequest(f"the multipart body could not be read: {exc}") from None
    upload = form.get("image")
    if upload is None or not hasattr(upload, "file"):
        raise BadRequest("a multipart search needs an 'image' file field")
    data = upload.file.read()
    if not data:
        raise BadRequest("the uploaded image is empty")
    raw = form.get("options", "{}")
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        raise BadRequest("the 'options' field must be JSON text")
    try:
        options = json.loads(raw or "{}")
    except ValueError as exc:
        raise BadRequest(f"the 'options' field is not valid JSON: {exc}") from None
    return options, data, getattr(upload, "filename", None)


def _check_length(request: web.Request) -> None:
    limit = request.app[STATE].config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)


async def search_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _check_length(request)
    if request.content_type == "multipart/form-data":
        body, image, name = await _read_upload(request)
        req = parse_search(body, state.config, image=image, filename=name)
    else:
        req = parse_search(await _read_json(request), state.config)
    answer = await state.run(run_search, req)
    state.answered += 1
    return web.json_response(answer, headers={"X-Index-Version": answer["version"]})


def _query_id(request: web.Request) -> str:
    image_id = request.query.get("id", "")
    if not image_id:
        raise BadRequest("give the item as ?id=IMAGE_ID")
    return image_id


async def item_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    image_id = _query_id(request)
    try:
        answer = await state.run(run_item, image_id)
    except BadRequest as exc:
        return _error(404, str(exc))
    return web.json_response(answer)


async def thumb_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    image_id = _query_id(request)
    try:
        side = int(request.query.get("size", DEFAULT_SIDE))
    except ValueError:
        raise BadRequest(f"size must be an integer, not {request.query.get('size')!r}") from None
    try:
        data = await state.run(run_thumbnail, state.thumbnails, image_id, side)
    except ThumbnailUnavailable as exc:
        return _error(404, f"no thumbnail for {image_id!r}: {exc}")
    except ValueError as exc:
        if isinstance(exc, BadRequest) and "no item" in str(exc):
            return _error(404, str(exc))
        raise BadRequest(str(exc)) from None
    return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def explain_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _check_length(request)
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


async def info_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    with state.follower.lease() as served:
        s = served.searcher
        caps = served.capabilities
        body = {
            "version": served.version, "items": s.size, "shards": len(s.shards), "dimension": s.dim,
            "model": s.manifest.preset, "created_utc": s.manifest.created_utc,
            "labels": bool(caps.get("labels")),
            "methods": ["auto", *s.available_methods], "capabilities": caps,
            "images": served.embedder is not None, "explain": state.explain is not None,
            "limits": {"max_k": state.config.max_k, "max_upload_bytes": state.config.max_upload_bytes,
                       "max_feedback": state.config.max_feedback, "timeout_seconds": state.config.timeout_seconds},
        }
    return web.json_response(body)


async def healthz_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = state.follower.status()
    body.update(in_flight=state.in_flight, capacity=state.capacity, answered=state.answered, rejected=state.rejected)
    return web.json_response(body, status=503 if body["status"] == "down" else 200)


def _static(name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        data, kind = request.app[STATE].static[name]
        return web.Response(body=data, content_type=kind, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    return handler


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
    app.on_response_prepare.append(_security_headers)
    app.cleanup_ctx.append(_follow)
    app.router.add_get("/", _static("index.html"))
    app.router.add_get("/static/app.js", _static("app.js"))
    app.router.add_get("/static/app.css", _static("app.css"))
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/api/info", info_handler)
    app.router.add_post("/api/search", search_handler)
    app.router.add_get("/api/item", item_handler)
    app.router.add_get("/api/thumb", thumb_handler)
    if state.explain is not None:
        app.router.add_post("/api/explain", explain_handler)
    return app
