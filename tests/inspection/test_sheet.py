"""Contact sheets keep aspect ratios: thumbnails are letterboxed, not squashed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from inspection.sheet import CELL, LETTERBOX, contact_sheet, fitted


def _jpeg(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_thumbnails_keep_the_aspect_ratio():
    assert fitted(_jpeg(400, 200), 100).size == (100, 50)
    assert fitted(_jpeg(120, 360), 90).size == (30, 90)
    blobs = {"wide.jpg": _jpeg(400, 200), "tall.jpg": _jpeg(100, 300, (30, 30, 200))}
    sheet = contact_sheet([{"query": "wide.jpg", "results": [{"uri": "tall.jpg", "label": "x", "score": 0.5}]}],
                          blobs.get)
    px = np.asarray(sheet)
    inner = CELL - 8
    wide = px[4:4 + inner, 4:4 + inner]  # inside the query's 4-px frame
    red = (wide[..., 0] > 150) & (wide[..., 2] < 80)
    rows, cols = np.flatnonzero(red.any(axis=1)), np.flatnonzero(red.any(axis=0))
    assert len(cols) == inner and abs(len(rows) - inner / 2) <= 2  # 2:1 kept
    assert tuple(wide[2, inner // 2]) == LETTERBOX  # bars above, not stretched pixels
    tall = px[4:4 + inner, CELL + 4:CELL + 4 + inner]
    blue = (tall[..., 2] > 150) & (tall[..., 0] < 80)
    assert abs(len(np.flatnonzero(blue.any(axis=0))) - inner / 3) <= 2
