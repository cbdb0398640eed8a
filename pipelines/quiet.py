"""Keeping TensorFlow's C++ start-up lines off the console unless asked for (``-v``)."""

from __future__ import annotations

import importlib
import logging
import os
import sys


def quiet_tensorflow(verbose: bool = False) -> None:
    """TensorFlow's C++ start-up lines (oneDNN, CUDA probing) are noise unless asked for.

    ``TF_CPP_MIN_LOG_LEVEL`` silences what TensorFlow logs once its logging is set up; the
    lines absl writes while the libraries load ("All log messages before
    absl::InitializeLog() ...", "Could not find cuda drivers") ignore it, so the first
    import runs with file descriptor 2 pointed at /dev/null. Python errors of that import
    are raised after stderr is restored, so nothing that matters is lost.
    """
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        importlib.import_module("tensorflow")
        importlib.import_module("apache_beam.ml.inference.tensorflow_inference")
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_BEAM_NOISE = (
    # RunInference cannot import its optional ModelManager here and then logs this for every batch.
    "Resource module is not available for current platform",
)


def quiet_known_noise() -> None:
    """Drops log lines that libraries repeat on every bundle and that say nothing to a user."""
    root = logging.getLogger()
    if not any(getattr(f, "cbir_noise", False) for f in root.filters):
        def keep(record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(_BEAM_NOISE)

        keep.cbir_noise = True
        root.addFilter(keep)
