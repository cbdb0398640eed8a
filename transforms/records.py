"""The element types that flow between the extract stages.

Plain NamedTuples: picklable, cheap, and explicit about what each stage adds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

FAILURES_TAG = "failures"
STAGES = ("read", "decode", "inference")


class ImageRecord(NamedTuple):
    """Encoded bytes plus where they came from (output of every reader)."""

    image_id: str
    uri: str
    label: str | None
    data: bytes
    unit: str = ""  # the listed input it came from (the file, or the shard file): what a re-run can skip


class ImageMeta(NamedTuple):
    """What the feature row keeps about an image; travels as the RunInference key."""

    image_id: str
    uri: str
    label: str | None
    sha256: str
    width: int
    height: int
    unit: str = ""


class FeatureRow(NamedTuple):
    meta: ImageMeta
    feature: np.ndarray  # float32 (D,)


def failure(image_id: str, uri: str, stage: str, exc: BaseException | str, message: str | None = None,
            unit: str = "") -> dict:
    """A failure row as ARCHITECTURE.md defines it: stage, exception class, message."""
    if isinstance(exc, BaseException):
        error, msg = type(exc).__name__, message or str(exc)
    else:
        error, msg = exc, message or ""
    return {"image_id": image_id, "uri": uri, "stage": stage, "error": error, "message": msg[:2000], "unit": unit}
