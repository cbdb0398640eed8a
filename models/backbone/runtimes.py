"""Ways to run a backbone: Keras, a traced TensorFlow graph, XLA, or LiteRT with XNNPACK.

All four compute the same function (the backbone's own preprocessing inside) from float32
pixels in [0, 255]; they differ in speed. Measured on the project's 2-core CPU machines
(benchmarks/bench_runtimes.py), LiteRT's XNNPACK kernels are the fastest for the presets,
a traced graph next, Keras ``predict_on_batch`` the slowest. ``auto`` picks, per worker:

* on a GPU: the TensorFlow graph (XLA with ``--jit``), where the precision options apply;
* on a CPU: LiteRT when the package loads, the model converts and its features match the
  Keras model's within :data:`PARITY_TOLERANCE` (max |Δ|) on a probe batch; else the graph,
  saying why in the log.

An explicitly named runtime that cannot run (package missing, an op LiteRT cannot convert)
raises :class:`RuntimeUnavailableError` naming the fix, and the extract job checks this on
the launcher before any work: it never falls back silently.

LiteRT conversion happens once per model and machine: the flatbuffer is cached under
``$CBIR_CACHE_DIR/litert`` (default ``~/.cache/cbir``) by the model fingerprint, the input
size and the TensorFlow version. Interpreters are per thread (they are not thread-safe) and
per batch-size bucket (a batch is padded to the next power of two, so a job allocates a
handful of interpreters, not one per batch shape).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RUNTIMES = ("keras", "graph", "xla", "litert")
CHOICES = ("auto", *RUNTIMES)
PARITY_TOLERANCE = 1e-4
LITERT_PIN = "ai-edge-litert==2.3.0"

conversions = 0  # LiteRT conversions this process ran (the cache makes the second one a read)


class RuntimeUnavailableError(ValueError):
    """The runtime asked for cannot run this model here; the message says what to do instead."""


def interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"--runtime litert needs the ai-edge-litert package ({exc}): install the pinned tree "
            f"(pip install -r requirements.lock, or pip install {LITERT_PIN}), or choose --runtime graph"
        ) from None
    return Interpreter


def cache_dir() -> str:
    return os.path.join(os.environ.get("CBIR_CACHE_DIR") or os.path.expanduser("~/.cache/cbir"), "litert")


def _cache_path(fingerprint: str, size: int) -> str:
    import tensorflow as tf

    return os.path.join(cache_dir(), f"{fingerprint[:24]}-{size}px-tf{tf.__version__}.tflite")


def _parity_path(fingerprint: str, size: int) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        litert = version("ai-edge-litert")
    except PackageNotFoundError:
        litert = "unknown"
    return f"{_cache_path(fingerprint, size)}.litert{litert}.parity.json"


def cached_parity(fingerprint: str, size: int) -> float | None:
    """The largest LiteRT-vs-reference difference an earlier probe measured on this machine, or None.

    ``--runtime auto`` probes once per model, TensorFlow and LiteRT version, not once per worker and
    pipeline: the probe builds the Keras model (about a second), which an extract in chunks and a
    query would otherwise pay each time.
    """
    try:
        with open(_parity_path(fingerprint, size)) as f:
            return float(json.load(f)["max_difference"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_parity(fingerprint: str, size: int, difference: float) -> None:
    path = _parity_path(fingerprint, size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"max_difference": difference}, f)
    os.replace(tmp, path)


def litert_flatbuffer(graph_fn: Any, fingerprint: str, size: int, what: str, cache: bool = True) -> bytes:
    """The model as a LiteRT flatbuffer: from the cache, or converted from the traced graph once.

    ``cache=False`` for models the fingerprint does not determine (random weights: each process
    draws its own), whose conversion must never be served to another instance.
    """
    global conversions
    import tensorflow as tf

    path = _cache_path(fingerprint, size)
    try:
        with open(path, "rb") as f:
            data = f.read() if cache else b""
        if data:
            log.info("LiteRT model for %s from the cache (%s)", what, path)
            return data
    except OSError:
        pass
    started = time.perf_counter()
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([graph_fn.get_concrete_function()], graph_fn)
        data = converter.convert()
    except Exception as exc:  # the converter raises ConverterError and friends with the failing op inside
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeUnavailableError(f"LiteRT cannot convert {what}: {first[:300]}; use --runtime graph "
                                      "(or xla) for this model") from None
    conversions += 1
    if not cache:
        return data
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a concurrent process reads a whole file or none
    log.info("converted %s to LiteRT in %.1fs (%d KB, cached at %s)", what, time.perf_counter() - started,
             len(data) // 1024, path)
    return data


LITERT_CHUNK = 16  # images per interpreter call


class LiteRTRunner:
    """Runs a LiteRT flatbuffer on float32 pixel batches with XNNPACK, one interpreter per thread and bucket.

    A large batch is run as chunks of :data:`LITERT_CHUNK`: measured on MobileNet v1 0.25
    (bench_runtimes), XNNPACK does 881 img/s at batch 16 but 699 at batch 64, whose 38 MB of
    float32 input no longer stays in cache between layers.
    """

    def __init__(self, flatbuffer: bytes, size: int, threads: int | None = None, chunk: int = LITERT_CHUNK):
        self._model = flatbuffer
        self._size = size
        self._chunk = chunk
        self._threads = threads or max(1, os.cpu_count() or 1)
        self._local = threading.local()
        interpreter_class()  # fail here, not on the first batch

    def _interpreter(self, batch: int) -> tuple[Any, int, int]:
        cache = getattr(self._local, "interpreters", None)
        if cache is None:
            cache = self._local.interpreters = {}
        found = cache.get(batch)
        if found is None:
            it = interpreter_class()(model_content=self._model, num_threads=self._threads)
            inp, out = it.get_input_details()[0], it.get_output_details()[0]
            it.resize_tensor_input(inp["index"], [batch, self._size, self._size, 3], strict=False)
            it.allocate_tensors()
            found = cache[batch] = (it, inp["index"], out["index"])
        return found

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) > self._chunk:
            return np.concatenate([self._run(pixels[i:i + self._chunk]) for i in range(0, len(pixels), self._chunk)])
        return self._run(pixels)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        n = len(x)
        bucket = 1 << max(0, (n - 1).bit_length())
        if bucket != n:
            x = np.concatenate([x, np.zeros((bucket - n, *x.shape[1:]), np.float32)])
        it, inp, out = self._interpreter(bucket)
        it.set_tensor(inp, x)
        it.invoke()
        return np.array(it.get_tensor(out)[:n], dtype=np.float32)


def probe_pixels(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """A deterministic batch for parity checks: smooth gradients with texture, across the full 0–255 range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * 255
        noise = rng.normal(0, 40, (size, size, 3))
        out[i] = np.clip(np.roll(base, 17 * i, axis=i % 2) + noise, 0, 255)
    return out


def max_difference(a: Callable[[np.ndarray], np.ndarray], b: Callable[[np.ndarray], np.ndarray],
                   pixels: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a(pixels), np.float64) - np.asarray(b(pixels), np.float64))))
