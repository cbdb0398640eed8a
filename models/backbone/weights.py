"""Finding pretrained weights without ever falling back to random ones.

Order (ARCHITECTURE.md): an explicit weights directory (``--weights-dir`` or
``$CBIR_WEIGHTS_DIR``), the Keras cache, then a Keras download. Offline machines
get an error that names the file and where to put it, never a network of random
weights that would silently produce useless features.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from models.backbone.presets import Preset

log = logging.getLogger(__name__)

RANDOM = "random"  # explicit opt-in to untrained weights (timing benchmarks only)


class WeightsNotFoundError(FileNotFoundError):
    """Raised when no weights file can be found or downloaded for a preset."""


def keras_cache_dir() -> Path:
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(base) / "models"


def resolve_weights(
    preset: Preset,
    weights_dir: str | None = None,
    allow_download: bool | None = None,
) -> str:
    """Returns a local path to the preset's weights file.

    ``allow_download`` defaults to true unless ``$CBIR_OFFLINE`` is set; a failed
    download is reported together with the places that were searched.
    """
    if allow_download is None:
        allow_download = os.environ.get("CBIR_OFFLINE", "") in ("", "0", "false")
    searched: list[str] = []
    for folder in (weights_dir, os.environ.get("CBIR_WEIGHTS_DIR"), str(keras_cache_dir())):
        if not folder:
            continue
        candidate = Path(folder) / preset.weights_file
        searched.append(str(candidate))
        if candidate.is_file():
            return str(candidate)
    download_error = "downloads disabled ($CBIR_OFFLINE)"
    if allow_download:
        try:
            import keras

            log.info("downloading %s", preset.weights_origin)
            return keras.utils.get_file(preset.weights_file, preset.weights_origin, cache_subdir="models")
        except Exception as exc:  # network errors come in many classes
            download_error = f"download failed: {type(exc).__name__}: {exc}"
    raise WeightsNotFoundError(
        f"no weights file {preset.weights_file!r} for model {preset.name!r}.\n"
        f"  searched: {', '.join(searched) or '(no folder)'}\n"
        f"  {download_error}\n"
        f"  fix: copy {preset.weights_file} (from {preset.weights_origin}) into a folder and pass "
        f"--weights-dir FOLDER or set CBIR_WEIGHTS_DIR=FOLDER; pass --weights random only for timing runs."
    )


_DIGESTS: dict[tuple[str, float, int], str] = {}


def file_digest(path: str) -> str:
    """sha256 of a local file, memoised by path, mtime and size."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]
