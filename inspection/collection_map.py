"""A 2-D map of an index: its stored vectors projected by PCA or t-SNE, thumbnails where they land.

The map answers "what does the collection look like to the model": clusters of
thumbnails that belong together, labels (colours) that mix or separate. PCA is linear and
fast and keeps global distances; t-SNE (scikit-learn, cosine metric, PCA initialisation)
keeps neighbourhoods and separates clusters better, at a cost that grows quickly with the
number of points. So an index above ``sample`` items (:data:`SAMPLE_THRESHOLD`, 2,000, by
default) is sampled, uniformly at random with a seed, down to ``sample`` items; below it
every item is drawn. The Embedding Projector export (``cbir projector``) stays for
interactive 3-D exploration.

Thumbnails keep their aspect ratio, framed in their label's colour; a legend lists the
most frequent labels (others share one grey).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from inspection.sheet import fitted
from models.inside import tiles

SAMPLE_THRESHOLD = 2000
METHODS = ("pca", "tsne")
# Distinct colours (Tableau 20 order, darker first) for the most frequent labels.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
    (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229),
    (57, 59, 121),
]
OTHER = (190, 190, 190)


@dataclasses.dataclass
class MapResult:
    image: Image.Image
    method: str
    items: int  # in the index
    gids: np.ndarray  # the items drawn
    coords: np.ndarray  # (n, 2) in [0, 1]
    labels: list[str | None]
    placements: list[tuple[int, int, int, int]]  # each thumbnail's box on the canvas (x0, y0, x1, y1)
    colours: dict[str, tuple[int, int, int]]
    unreadable: int  # thumbnails drawn as a coloured square because the file could not be read
    explained_variance: list[float] | None = None

    def figures(self, image_ids: list[str]) -> dict[str, Any]:
        return {
            "method": self.method, "items": self.items, "drawn": len(self.gids),
            "sample_threshold": SAMPLE_THRESHOLD, "sampled": len(self.gids) < self.items,
            "unreadable_thumbnails": self.unreadable, "explained_variance_ratio": self.explained_variance,
            "colours": {k: list(v) for k, v in self.colours.items()},
            "points": [{"gid": int(g), "image_id": image_ids[int(g)], "label": lab, "x": round(float(x), 5),
                        "y": round(float(y), 5), "box": list(box)}
                       for g, (x, y), lab, box in zip(self.gids, self.coords, self.labels, self.placements,
                                                      strict=True)],
        }


def pick(items: int, sample: int, seed: int) -> np.ndarray:
    """Every global id up to ``sample`` items; above it a seeded uniform sample of ``sample`` ids, sorted."""
    if sample <= 0 or items <= sample:
        return np.arange(items, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(items, size=sample, replace=False)).astype(np.int64)


def project(vectors: np.ndarray, method: str, seed: int = 0, perplexity: float = 30.0
            ) -> tuple[np.ndarray, list[float] | None]:
    """(n, 2) coordinates scaled to [0, 1] on both axes (aspect kept), and PCA's explained variance ratios."""
    x = np.asarray(vectors, np.float32)
    n = len(x)
    if n < 3:
        raise ValueError(f"a map needs at least 3 items, the index has {n}")
    variance = None
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        xy = pca.fit_transform(x)
        variance = [round(float(v), 5) for v in pca.explained_variance_ratio_]
    elif method == "tsne":
        from sklearn.manifold import TSNE

        # perplexity must stay below the number of points
        xy = TSNE(n_components=2, perplexity=min(perplexity, max(2.0, (n - 1) / 3)), metric="cosine", init="pca",
                  random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    xy = xy - xy.min(axis=0)
    span = float(xy.max()) or 1.0
    xy = xy / span
    xy = xy + (1.0 - xy.max(axis=0)) / 2  # centre the shorter axis
    return xy.astype(np.float32), variance


def label_colours(labels: list[str | None], limit: int = len(PALETTE)) -> dict[str, tuple[int, int, int]]:
    """The ``limit`` most frequent labels → distinct colours (ties by name); the rest are drawn in grey."""
    counts = Counter(str(lab) for lab in labels if lab is not None)
    ordered = sorted(counts, key=lambda k: (-counts[k], k))[:limit]
    return {lab: PALETTE[i] for i, lab in enumerate(ordered)}


def _thumb(data: bytes | None, size: int) -> Image.Image | None:
    if not data:
        return None
    try:
        return fitted(data, size)
    except Exception:
        return None


def collection_map(searcher: Any, method: str = "pca", sample: int = SAMPLE_THRESHOLD, seed: int = 0,
                   read_bytes: Callable[[str], bytes | None] | None = None, thumb: int = 40, canvas: int = 0
                   ) -> MapResult:
    """The map of ``searcher``'s index (see the module docstring); ``read_bytes(uri)`` gives thumbnails' bytes.

    ``canvas`` 0 sizes the map to the number of items (600 to 1,400 px a side).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    gids = pick(searcher.size, sample, seed)
    canvas = canvas or int(min(1400, max(600, 2.2 * thumb * np.sqrt(len(gids)))))
    vectors = searcher.vectors_of(gids)
    coords, variance = project(vectors, method, seed)
    labels = [searcher.labels[int(g)] for g in gids]
    colours = label_colours(labels)
    legend_w = 200
    margin = thumb
    img = Image.new("RGB", (canvas + legend_w, canvas), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    inner = canvas - 2 * margin
    placements = []
    unreadable = 0
    for g, (x, y), lab in zip(gids, coords, labels, strict=True):
        colour = colours.get(str(lab), OTHER) if lab is not None else OTHER
        cx, cy = margin + int(x * inner), margin + int(y * inner)
        box = (cx - thumb // 2, cy - thumb // 2, cx - thumb // 2 + thumb, cy - thumb // 2 + thumb)
        im = _thumb(read_bytes(searcher.uris[int(g)]) if read_bytes else None, thumb - 4)
        if im is None:
            unreadable += 1 if read_bytes else 0
            im = Image.new("RGB", (thumb - 4, thumb - 4), colour)
        framed = tiles.fit(im, thumb - 4, background=(255, 255, 255))
        draw.rectangle(box, fill=colour)
        img.paste(framed, (box[0] + 2, box[1] + 2))
        placements.append(box)
    lx = canvas + 10
    title = f"{method.upper()} of {len(gids)} of {searcher.size} items"
    draw.text((lx, 10), title, fill=(0, 0, 0), font=font)
    if len(gids) < searcher.size:
        draw.text((lx, 24), f"(sampled: above {sample})", fill=(90, 90, 90), font=font)
    counts = Counter(str(lab) for lab in labels)
    for i, (lab, colour) in enumerate(colours.items()):
        y = 46 + 16 * i
        draw.rectangle((lx, y, lx + 11, y + 11), fill=colour)
        draw.text((lx + 16, y), f"{lab[:22]} ({counts[lab]})", fill=(0, 0, 0), font=font)
    if any((str(lab) not in colours) for lab in labels):
        y = 46 + 16 * len(colours)
        draw.rectangle((lx, y, lx + 11, y + 11), fill=OTHER)
        draw.text((lx + 16, y), "other / no label", fill=(0, 0, 0), font=font)
    return MapResult(img, method, searcher.size, gids, coords, labels, placements, colours, unreadable, variance)
