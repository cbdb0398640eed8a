"""Reading requests: a search body checked field by field, multipart uploads, the body limit, ``?id=``.

Every refusal is a ``BadRequest`` that names the field and what it must be, so a caller can fix the
request from the message alone; nothing here touches the index (that happens in the pool).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from aiohttp import web

from search.rerank import FeedbackWeights
from serving.config import ServiceConfig
from serving.errors import BadRequest
from serving.state import STATE

# the request fields of a search, with what each must be
SEARCH_FIELDS = ("image_id", "vector", "k", "method", "rerank", "qe", "qe_alpha", "diffusion", "verify", "like",
                 "unlike", "include_self", "search_k", "ef_search", "candidates", "feedback_weights")


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


async def read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise BadRequest(f"send the search as application/json (or multipart/form-data with an image), "
                         f"not {request.content_type or 'no content type'}")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


async def read_upload(request: web.Request) -> tuple[Any, bytes, str | None]:
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


def check_length(request: web.Request) -> None:
    limit = request.app[STATE].config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)


def requested_id(request: web.Request) -> str:
    image_id = request.query.get("id", "")
    if not image_id:
        raise BadRequest("give the item as ?id=IMAGE_ID")
    return image_id
