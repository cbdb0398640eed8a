"""``<out>/MANIFEST.json`` of ``cbir top-patches``: the commit point, and the figures behind the grids.

Per requested channel: the grid's PNG and, best first, each patch's value, image, cell and
crop box, so a grid can be traced back to the images and the receptive field it shows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from artefacts.manifests.base import Accounting, Manifest, PartFile


@dataclasses.dataclass(kw_only=True)
class TopPatchesManifest(Manifest):
    """``<out>/MANIFEST.json`` of ``cbir top-patches``: the commit point, and the figures behind the grids."""

    KIND: ClassVar[str] = "top-patches"

    run_id: str
    created_utc: str
    model: dict[str, Any]
    model_fingerprint: str
    layer: str
    channels: list[int]
    n: int
    receptive_field: dict[str, Any]
    counts: dict[str, int]
    accounting: Accounting
    files: dict[str, list[PartFile]]
    grids: dict[str, str]  # channel → PNG path relative to the output
    patches: dict[str, list[dict[str, Any]]]  # channel → best first: value, image_id, uri, label, cell, box
    elapsed_seconds: float = 0.0
