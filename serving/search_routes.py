"""The search routes: ``/api/search``, ``/api/item`` and ``/api/info``, and the work they do in the pool.

The ``run_*`` functions run on a worker thread under a lease on one index version and return the answer
body, which names that version; the handlers only read the request and hand the work to the pool.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from aiohttp import web

from search.options import SearchOptions
from serving.errors import BadRequest, Unavailable, json_error
from serving.parsing import SearchRequest, check_length, parse_search, read_json, read_upload, requested_id
from serving.state import STATE
from serving.versions import ServedVersion


def find_item(served: ServedVersion, image_id: str, role: str) -> int:
    """The global id of ``image_id`` in the leased version; a 400 naming the field (``role``) when absent."""
    try:
        return served.find(image_id)
    except KeyError:
        raise BadRequest(f"{role}: no item {image_id!r} in index version {served.version}") from None


def _options(served: ServedVersion, fields: dict[str, Any]) -> SearchOptions:
    try:
        return served.searcher.options(SearchOptions.from_dict(fields))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def run_search(served: ServedVersion, req: SearchRequest) -> dict[str, Any]:
    """The search itself, on one leased version; returns the response body (which names that version)."""
    s = served.searcher
    started = time.perf_counter()
    opts = _options(served, req.options)
    caps = served.capabilities
    if opts.rerank.verify and not caps.get("verify"):
        raise BadRequest(f"index version {served.version} carries no local features, so verification cannot run "
                         "(extract with --local-features, then rebuild the index)")
    if opts.rerank.diffusion and not caps.get("diffusion"):
        raise BadRequest(f"index version {served.version} has no k-NN graph, so diffusion cannot run "
                         "(rebuild the index with --graph-k)")
    like = [find_item(served, x, "like") for x in req.like]
    unlike = [find_item(served, x, "unlike") for x in req.unlike]
    exclude, local, embed_ms = None, None, None
    if req.image_id is not None:
        gid = find_item(served, req.image_id, "image_id")
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
        if opts.rerank.verify:
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
    gid = find_item(served, image_id, "id")
    shard, item = s.locate(gid)
    return {"version": served.version, "image_id": image_id, "label": s.labels[gid], "uri": s.uris[gid],
            "sha256": s.sha256[gid], "shard": shard, "id": item}


async def search_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_length(request)
    if request.content_type == "multipart/form-data":
        body, image, name = await read_upload(request)
        req = parse_search(body, state.config, image=image, filename=name)
    else:
        req = parse_search(await read_json(request), state.config)
    answer = await state.run(run_search, req)
    state.answered += 1
    return web.json_response(answer, headers={"X-Index-Version": answer["version"]})


async def item_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    image_id = requested_id(request)
    try:
        answer = await state.run(run_item, image_id)
    except BadRequest as exc:
        return json_error(404, str(exc))
    return web.json_response(answer)


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
