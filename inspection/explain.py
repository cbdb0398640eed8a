"""Why did this result match this query? Saliency maps of the product's own similarity, side by side.

The similarity explained is the one the searcher ranks by: the query's pixels through the
backbone and the index's transform (:mod:`inspection.embedding_graph`), dotted with the
result's *stored* vector. Each side gets its own map:

* on the query, how the similarity to the result's stored vector depends on the query's
  pixels;
* on the result, how the similarity to the query's embedding depends on the result's
  pixels (the result is re-embedded from its file, as at build time).

Methods (:mod:`models.inside.saliency`): ``occlusion`` (default: the drop in similarity where a
grey patch hides the content; one forward pass per placement, about 170 for a 224 px
model), ``gradient`` (|∂similarity/∂pixel|) and ``guided`` (guided backpropagation).
Maps are computed on the model's square input, which is the whole frame resized, so
they map back onto the photo at its own aspect ratio. Gradient maps are smoothed (a
Gaussian of 3 pixels of a 224 px input) so that they show regions rather than speckle.

:func:`explain_match` is the contract a web front end calls; :func:`explain` returns the
numbers behind the picture as well.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from inspection.embedding_graph import embedding_graph
from models.backbone.imaging import decode_and_resize
from models.inside import tiles
from models.inside.saliency import gradient_map, occlusion_map
from plumbing import fsutil

METHODS = ("occlusion", "gradient", "guided")
PANEL = 300  # longest side of each picture in the rendering
COARSE = 14  # the map in the figures: this many cells a side
SMOOTH_SIGMA = 3.0  # gradient maps are smoothed by a Gaussian of this many pixels (of a 224 px input)


@dataclasses.dataclass
class Side:
    role: str  # "query" or "result"
    display: Image.Image | None  # the photo at its aspect ratio, longest side PANEL (None: unreadable)
    heat: np.ndarray | None  # the map on the model input (size, size); larger = the match relies on it more
    score: float | None  # the similarity this side's map explains, as the graph computes it
    note: str = ""

    def figures(self) -> dict[str, Any]:
        if self.heat is None:
            return {"role": self.role, "map": None, "note": self.note}
        h, w = self.heat.shape
        y, x = np.unravel_index(int(np.argmax(self.heat)), self.heat.shape)
        cells = COARSE
        coarse = self.heat[: h - h % cells, : w - w % cells].reshape(cells, h // cells, cells, w // cells).mean((1, 3))
        return {
            "role": self.role, "score": None if self.score is None else round(self.score, 6),
            "peak": {"x": round((x + 0.5) / w, 4), "y": round((y + 0.5) / h, 4)},  # fractions of width and height
            "max": round(float(self.heat.max()), 6), "mean": round(float(self.heat.mean()), 6),
            "coarse": [[round(float(v), 5) for v in row] for row in coarse], "note": self.note,
        }


@dataclasses.dataclass
class Explanation:
    method: str
    score: float  # the product's similarity (numpy query path · stored vector)
    result: dict[str, Any]  # gid, image_id, label, uri
    query: Side
    other: Side

    def figures(self) -> dict[str, Any]:
        return {"method": self.method, "similarity": round(self.score, 6), "result": self.result,
                "query": self.query.figures(), "result_map": self.other.figures()}


def _display(data: bytes, max_pixels: int, reduced: bool) -> Image.Image:
    """The photo through the product's decoder, shown at its own aspect ratio."""
    decoded = decode_and_resize(data, PANEL, max_pixels, reduced)
    scale = PANEL / max(decoded.width, decoded.height)
    size = (max(1, round(decoded.width * scale)), max(1, round(decoded.height * scale)))
    return Image.fromarray(decoded.pixels).resize(size, Image.Resampling.BILINEAR)


def _map(graph: Any, pixels: np.ndarray, target: np.ndarray, method: str, patch: int, stride: int
         ) -> tuple[np.ndarray, float]:
    if method == "occlusion":
        return occlusion_map(lambda x: graph.similarity(x, target).numpy(), pixels, patch=patch, stride=stride)
    from scipy.ndimage import gaussian_filter

    heat, score = gradient_map(lambda x: graph.similarity(x, target), pixels)
    # single-pixel gradients are speckle to the eye: show regions
    return gaussian_filter(heat, SMOOTH_SIGMA * heat.shape[0] / 224.0).astype(np.float32), score


def explain(searcher: Any, embedder: Any, query_bytes: bytes, result_gid: int, method: str = "occlusion",
            patch: int = 32, stride: int = 16, result_map: bool = True) -> Explanation:
    """The maps and figures of "why ``result_gid`` matched this query" (see the module docstring).

    ``result_map=False`` maps the query side only (half the cost; the result is still shown).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    searcher.check_embedder(embedder)
    try:
        shard, item = searcher.locate(int(result_gid))
    except IndexError as exc:
        raise ValueError(str(exc)) from None
    stored = searcher.vector(shard, item)
    graph = embedding_graph(embedder, guided=(method == "guided"))
    vectors, ok, failures = embedder.embed_bytes([query_bytes])
    if not ok:
        raise ValueError(f"the query cannot be decoded: {failures[0].error}: {failures[0].message}")
    q_pixels = embedder.decode(query_bytes)
    product_score = float(np.dot(vectors[0], stored))
    q_heat, q_score = _map(graph, q_pixels, stored, method, patch, stride)
    query = Side("query", _display(query_bytes, embedder.max_pixels, embedder.reduced_decode), q_heat, q_score)
    result = {"gid": int(result_gid), "image_id": searcher.image_ids[result_gid], "label": searcher.labels[result_gid],
              "uri": searcher.uris[result_gid]}
    try:
        r_bytes = fsutil.read_input(result["uri"])
        r_pixels = embedder.decode(r_bytes)
    except Exception as exc:  # the result's file moved or is not a readable image: explain the query side only
        other = Side("result", None, None, None, f"{type(exc).__name__}: {exc}")
    else:
        r_display = _display(r_bytes, embedder.max_pixels, embedder.reduced_decode)
        if result_map:
            q_vector = graph.embed(q_pixels[None].astype(np.float32)).numpy()[0]
            r_heat, r_score = _map(graph, r_pixels, q_vector, method, patch, stride)
            other = Side("result", r_display, r_heat, r_score)
        else:
            other = Side("result", r_display, None, None, "not mapped")
    return Explanation(method, product_score, result, query, other)


_LEGEND = {
    "occlusion": "red: the similarity drops most where this is hidden",
    "gradient": "red: the similarity is most sensitive to these pixels",
    "guided": "red: guided backpropagation of the similarity",
}


def render(e: Explanation) -> Image.Image:
    """Query and result side by side: the photos on top, the maps overlaid below (one colour scale for both)."""
    pad, head, cap = 8, 34, 16
    sides = (e.query, e.other)
    row = max((s.display.height for s in sides if s.display is not None), default=PANEL)
    sheet = Image.new("RGB", (2 * PANEL + 3 * pad, head + 2 * (row + cap) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    r = e.result
    draw.text((pad, 4), f"why it matched ({e.method}): similarity {e.score:.3f}", fill=(0, 0, 0), font=font)
    draw.text((pad, 18), f"result {r['image_id']} ({r['label'] or 'no label'}); {_LEGEND[e.method]}",
              fill=(80, 80, 80), font=font)
    top = max(float(np.percentile(s.heat, 99.5)) for s in sides if s.heat is not None)
    for col, side in enumerate(sides):
        x = pad + col * (PANEL + pad)
        if side.display is None:
            sheet.paste(Image.new("RGB", (PANEL, row), (220, 220, 220)), (x, head))
            draw.text((x + 4, head + row // 2), "result image unreadable", fill=(120, 0, 0), font=font)
            continue
        dx = x + (PANEL - side.display.width) // 2
        sheet.paste(side.display, (dx, head))
        draw.text((x + 2, head + row + 2), side.role, fill=(40, 90, 200) if col == 0 else (0, 0, 0), font=font)
        y = head + row + cap
        if side.heat is None:
            draw.text((x + 4, y + row // 2), f"{side.role}: {side.note}", fill=(120, 120, 120), font=font)
            continue
        heat = np.clip(np.maximum(side.heat, 0) / top, 0, 1) if top > 0 else np.zeros_like(side.heat)
        sheet.paste(tiles.overlay(side.display, heat), (dx, y))
        draw.text((x + 2, y + row + 2), f"{side.role} map, peak {side.heat.max():.3g}", fill=(40, 40, 40),
                  font=font)
    return sheet


def explain_match(searcher: Any, embedder: Any, query_bytes: bytes, result_gid: int,
                  method: str = "occlusion") -> Image.Image:
    """The side-by-side picture of why ``result_gid`` (a global id of ``searcher``) matched the query.

    ``searcher`` is a :class:`search.searcher.Searcher`, ``embedder`` comes from
    ``searcher.open_embedder(...)``; ``method`` is ``occlusion``, ``gradient`` or ``guided``.
    """
    return render(explain(searcher, embedder, query_bytes, result_gid, method))
