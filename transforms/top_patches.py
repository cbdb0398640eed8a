"""Top-activating corpus patches: for chosen channels of a conv layer, where in the corpus they fire most.

Building blocks of ``cbir top-patches`` (``pipelines/top_patches.py``):

* :func:`receptive_field`: the exact input region one cell of a layer's feature map
  depends on, walked through the Keras graph (convolutions, pooling, padding, merges);
* :class:`ChannelMaximaFn`: decoded images in batches → per image and channel the peak
  activation and its cell (the accounting row), and candidate patches (the crop of the
  model's input under that cell's receptive field);
* :class:`TopN`: a bounded combiner, at most ``n`` candidates per channel in any
  accumulator, so memory does not grow with the corpus;
* :func:`patch_grid`: one captioned grid per channel.

Each image contributes at most one candidate per channel (its peak cell), so a channel's
grid shows N different images rather than N neighbouring cells of one. Crops are of the
pixels the model saw (the decoded, square-resized input), so a crop pasted back at its box
reproduces the recorded activation exactly (tests/pipelines/test_top_patches.py).
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import logging
import math
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from PIL import Image

from models.backbone.network import Backbone, ModelSpec
from models.inside import tiles
from models.inside.layers import LayerModel, resolve_layer
from transforms.decode import count_failure
from transforms.records import FAILURES_TAG, ImageMeta, failure

log = logging.getLogger(__name__)

NAMESPACE = "cbir_top_patches"
CANDIDATES_TAG = "candidates"

ACTIVATION_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    pa.field("label", pa.string(), nullable=True),
    ("sha256", pa.string()),
    ("channels", pa.list_(pa.int32())),
    ("peak", pa.list_(pa.float32())),  # per channel: the largest activation over the feature map
    ("row", pa.list_(pa.int32())),  # its cell in the feature map
    ("col", pa.list_(pa.int32())),
])


# -- receptive fields ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Axis:
    """Along one axis, cell i covers input pixels [start + i·jump, start + i·jump + size) (None: the whole input)."""

    size: int | None
    jump: int
    start: int


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    rows: Axis
    cols: Axis
    input_size: tuple[int, int]  # (height, width) of the model input

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of cell (row, col) in input pixels, clipped to the image (x1, y1 exclusive)."""
        h, w = self.input_size

        def span(a: Axis, i: int, limit: int) -> tuple[int, int]:
            if a.size is None:
                return 0, limit
            lo = a.start + i * a.jump
            return max(0, lo), min(limit, lo + a.size)

        y0, y1 = span(self.rows, row, h)
        x0, x1 = span(self.cols, col, w)
        return x0, y0, x1, y1

    def describe(self) -> dict[str, Any]:
        return {"size": [self.rows.size, self.cols.size], "jump": [self.rows.jump, self.cols.jump],
                "start": [self.rows.start, self.cols.start]}


_ELEMENTWISE = {"BatchNormalization", "ReLU", "Activation", "Dropout", "Rescaling", "Normalization", "LeakyReLU",
                "ELU", "Softmax", "SpatialDropout2D", "GaussianNoise", "Identity", "Lambda"}
_MERGES = {"Add", "Concatenate", "Multiply", "Subtract", "Average", "Maximum", "Minimum"}
_GLOBAL = {"GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Dense", "Reshape"}


def _same_pad(in_len: int, k: int, s: int) -> int:
    """The left (top) padding TensorFlow's "same" adds: half the total, rounded down."""
    out = math.ceil(in_len / s)
    return max((out - 1) * s + k - in_len, 0) // 2


def _through(layer: Any, a: Axis, axis: int, in_len: int) -> Axis:
    """The field after ``layer`` along ``axis`` (0 rows, 1 columns), ``in_len`` its input length there."""
    kind = type(layer).__name__
    cfg = layer.get_config()
    if a.size is None or kind in _ELEMENTWISE:
        return a
    if kind in _GLOBAL:
        return Axis(None, a.jump, 0)
    if kind == "ZeroPadding2D":
        (top, _), (left, _) = cfg["padding"]
        return Axis(a.size, a.jump, a.start - (top, left)[axis] * a.jump)
    if kind == "Cropping2D":
        (top, _), (left, _) = cfg["cropping"]
        return Axis(a.size, a.jump, a.start + (top, left)[axis] * a.jump)
    if "kernel_size" in cfg or "pool_size" in cfg:
        k = int((cfg.get("kernel_size") or cfg.get("pool_size"))[axis])
        s = int((cfg.get("strides") or (1, 1))[axis])
        d = int((cfg.get("dilation_rate") or (1, 1))[axis])
        k_eff = (k - 1) * d + 1
        pad = _same_pad(in_len, k_eff, s) if cfg.get("padding") == "same" else 0
        return Axis(a.size + (k_eff - 1) * a.jump, a.jump * s, a.start - pad * a.jump)
    raise ValueError(f"cannot follow the receptive field through layer {layer.name} ({kind})")


def _union(fields: list[Axis]) -> Axis:
    if any(f.size is None for f in fields):
        return Axis(None, fields[0].jump, 0)
    if len({f.jump for f in fields}) > 1:
        raise ValueError("merged feature maps of different strides: no single receptive field")
    start = min(f.start for f in fields)
    end = max(f.start + f.size for f in fields)
    return Axis(end - start, fields[0].jump, start)


def receptive_field(keras_model: Any, layer_name: str) -> ReceptiveField:
    """The receptive field of one cell of ``layer_name``'s feature map, in the model's input pixels."""
    target = resolve_layer(keras_model, layer_name)
    memo: dict[int, tuple[Axis, Axis]] = {}
    height, width = keras_model.input_shape[1:3]

    def field(layer: Any) -> tuple[Axis, Axis]:
        key = id(layer)
        if key in memo:
            return memo[key]
        if type(layer).__name__ == "InputLayer":
            out = (Axis(1, 1, 0), Axis(1, 1, 0))
        else:
            node = layer._inbound_nodes[0]
            parents = [t._keras_history.operation for t in node.input_tensors]
            ins = [field(p) for p in parents]
            rows, cols = _union([i[0] for i in ins]), _union([i[1] for i in ins])
            if type(layer).__name__ not in _MERGES:
                shape = node.input_tensors[0].shape
                rows = _through(layer, rows, 0, int(shape[1]) if len(shape) == 4 else 1)
                cols = _through(layer, cols, 1, int(shape[2]) if len(shape) == 4 else 1)
            out = (rows, cols)
        memo[key] = out
        return out

    rows, cols = field(target)
    return ReceptiveField(rows, cols, (int(height), int(width)))


# -- the job's DoFns and combiner -----------------------------------------------------------------------


class Candidate(NamedTuple):
    """One image's peak for one channel, with the crop under that cell's receptive field."""

    value: float
    image_id: str
    uri: str
    label: str | None
    row: int
    col: int
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in the model's input pixels
    crop: np.ndarray  # uint8 (y1 - y0, x1 - x0, 3)

    def sort_key(self) -> tuple:
        """Best first: higher activation, then image id (deterministic ties)."""
        return (-self.value, self.image_id, self.row, self.col)

    def describe(self) -> dict[str, Any]:
        return {"value": round(float(self.value), 6), "image_id": self.image_id, "uri": self.uri, "label": self.label,
                "cell": [self.row, self.col], "box": list(self.box)}


def peaks(acts: np.ndarray, channels: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For activations (n, h, w, C): per image and chosen channel the peak value and its (row, col); first cell
    in row-major order on ties."""
    n, h, w, _ = acts.shape
    sel = acts[..., channels].reshape(n, h * w, len(channels))
    flat = sel.argmax(axis=1)  # (n, c)
    values = np.take_along_axis(sel, flat[:, None, :], axis=1)[:, 0, :]
    return values.astype(np.float32), (flat // w).astype(np.int32), (flat % w).astype(np.int32)


class ChannelMaximaFn(beam.DoFn):
    """Batches of ``(ImageMeta, pixels)`` → activation rows (main), candidates (tagged), failures (tagged).

    The model is loaded once per worker (``setup``). Within a bundle a bounded heap per channel
    keeps the best ``n`` seen so far, and a candidate (with its crop) is emitted only when it
    enters that heap: whatever belongs to the global top ``n`` is in its bundle's top ``n``, so
    nothing the combiner needs is dropped, and most crops are never made.
    """

    def __init__(self, spec: ModelSpec, layer: str, channels: list[int], n: int):
        self._spec = spec
        self._layer = layer
        self._channels = list(channels)
        self._n = n
        self._scored = Metrics.counter(NAMESPACE, "scored")
        self._emitted = Metrics.counter(NAMESPACE, "candidates")

    def setup(self) -> None:
        backbone = Backbone(self._spec)
        self._model = LayerModel(backbone, self._layer)
        self._field = receptive_field(self._model.keras_model, self._layer)
        total = self._model.channels[0]
        bad = [c for c in self._channels if not 0 <= c < total]
        if bad:
            raise ValueError(f"{self._layer} has channels 0..{total - 1}, not {bad}")

    def start_bundle(self) -> None:
        self._heaps: dict[int, list[tuple]] = {c: [] for c in self._channels}

    def _enters(self, channel: int, key: tuple) -> bool:
        heap = self._heaps[channel]
        # heap of the n best, worst on top; an entry is (-sort_key…) negated so larger = better
        item = (-key[0], _Desc(key[1:]))
        if len(heap) < self._n:
            heapq.heappush(heap, item)
            return True
        if item > heap[0]:
            heapq.heapreplace(heap, item)
            return True
        return False

    def process(self, batch: list[tuple[ImageMeta, np.ndarray]]):
        metas = [m for m, _ in batch]
        pixels = np.stack([p for _, p in batch])
        try:
            acts = np.asarray(self._model(pixels.astype(np.float32)))
        except Exception as exc:  # a batch the model cannot run: every image in it is a failure row
            count_failure("inference", type(exc).__name__, len(batch))
            for m in metas:
                yield beam.pvalue.TaggedOutput(FAILURES_TAG, failure(m.image_id, m.uri, "inference", exc))
            return
        values, rows, cols = peaks(acts, self._channels)
        for i, meta in enumerate(metas):
            if not np.isfinite(values[i]).all():
                count_failure("inference", "NonFiniteActivation")
                yield beam.pvalue.TaggedOutput(FAILURES_TAG, failure(meta.image_id, meta.uri, "inference",
                                                                     "NonFiniteActivation", "NaN or inf"))
                continue
            self._scored.inc()
            yield {"image_id": meta.image_id, "uri": meta.uri, "label": meta.label, "sha256": meta.sha256,
                   "channels": self._channels, "peak": values[i].tolist(), "row": rows[i].tolist(),
                   "col": cols[i].tolist()}
            for j, c in enumerate(self._channels):
                v, r, q = float(values[i, j]), int(rows[i, j]), int(cols[i, j])
                if not self._enters(c, (-v, meta.image_id, r, q)):
                    continue
                x0, y0, x1, y1 = self._field.box(r, q)
                crop = np.ascontiguousarray(pixels[i, y0:y1, x0:x1])
                self._emitted.inc()
                yield beam.pvalue.TaggedOutput(CANDIDATES_TAG, (c, Candidate(v, meta.image_id, meta.uri, meta.label,
                                                                             r, q, (x0, y0, x1, y1), crop)))


class _Desc:
    """Wraps a tuple so that it compares in reverse: in a heap of "larger is better", a smaller id wins ties."""

    __slots__ = ("key",)

    def __init__(self, key: tuple):
        self.key = key

    def __lt__(self, other: _Desc) -> bool:
        return self.key > other.key

    def __gt__(self, other: _Desc) -> bool:
        return self.key < other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key


class TopN(beam.CombineFn):
    """The ``n`` best :class:`Candidate` s (highest activation; ties by image id), never more in any accumulator."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError("n must be at least 1")
        self._n = n

    def create_accumulator(self) -> list[Candidate]:
        return []

    def _trim(self, items: list[Candidate]) -> list[Candidate]:
        return sorted(items, key=Candidate.sort_key)[: self._n]

    def add_input(self, acc: list[Candidate], item: Candidate) -> list[Candidate]:
        acc.append(item)
        return self._trim(acc) if len(acc) > 2 * self._n else acc

    def merge_accumulators(self, accs) -> list[Candidate]:
        merged: list[Candidate] = []
        for a in accs:
            merged.extend(a)
            if len(merged) > 2 * self._n:
                merged = self._trim(merged)
        return self._trim(merged)

    def compact(self, acc: list[Candidate]) -> list[Candidate]:
        return self._trim(acc)

    def extract_output(self, acc: list[Candidate]) -> list[Candidate]:
        return self._trim(acc)


def activation_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ACTIVATION_SCHEMA)


def patch_grid(layer: str, channel: int, candidates: list[Candidate], field: dict[str, Any], tile: int = 96
               ) -> Image.Image:
    """One channel's top patches as a captioned grid (rank, activation, label), best first."""
    images = [Image.fromarray(c.crop) for c in candidates]
    captions = [f"{i + 1}. {c.value:.2f} {c.label or ''}" for i, c in enumerate(candidates)]
    size = field.get("size")
    rf = f"{size[0]}x{size[1]} px" if size and size[0] else "the whole image"
    title = f"{layer} channel {channel}: top {len(candidates)} (receptive field {rf})"
    return tiles.grid(images, captions, tile=tile, cols=min(8, max(1, len(images))), title=title)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class RenderChannelFn(beam.DoFn):
    """``(channel, [Candidate])`` → the channel's grid PNG under ``folder`` and its figures (a dict).

    The file name depends on the channel only, so a retried bundle overwrites its own
    attempt (atomically) instead of adding a second file.
    """

    def __init__(self, folder: str, layer: str, field: dict[str, Any], tile: int = 96):
        self._folder = folder
        self._layer = layer
        self._field = field
        self._tile = tile

    def process(self, element: tuple[int, list[Candidate]]):
        from plumbing import fsutil

        channel, best = element
        name = grid_name(channel)
        fsutil.write_bytes_atomic(fsutil.join(self._folder, name),
                                  png_bytes(patch_grid(self._layer, channel, best, self._field, self._tile)))
        yield {"channel": int(channel), "grid": name, "patches": [c.describe() for c in best]}


def grid_name(channel: int) -> str:
    return f"channel-{int(channel):04d}.png"
