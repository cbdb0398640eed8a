"""Contact sheets: each query next to its neighbours, with labels and scores."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from models.imaging import decode_and_resize

CELL = 160
CAPTION = 34


def _thumb(data: bytes | None) -> Image.Image:
    if data is None:
        return Image.new("RGB", (CELL, CELL), (200, 200, 200))
    try:
        return Image.fromarray(decode_and_resize(data, CELL).pixels)
    except Exception:
        return Image.new("RGB", (CELL, CELL), (230, 180, 180))


def contact_sheet(rows: list[dict[str, Any]], read_bytes) -> Image.Image:
    """``rows``: [{"query": path, "results": [{"uri", "label", "score", ...}]}].

    ``read_bytes(uri)`` returns the image bytes or None, so the sheet works for
    indexes whose images live on any filesystem.
    """
    cols = 1 + max((len(r["results"]) for r in rows), default=0)
    sheet = Image.new("RGB", (cols * CELL, max(1, len(rows)) * (CELL + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        y = r * (CELL + CAPTION)
        cells = [(row["query"], "query", None, (40, 90, 200))]
        cells += [(h["uri"], h.get("label") or "", h["score"], (0, 0, 0)) for h in row["results"]]
        for c, (uri, label, score, colour) in enumerate(cells):
            x = c * CELL
            thumb = ImageOps.expand(_thumb(read_bytes(uri)).resize((CELL - 8, CELL - 8)), border=4,
                                    fill=colour if c == 0 else "white")
            sheet.paste(thumb, (x, y))
            text = str(label)[:22] if score is None else f"{str(label)[:14]} {score:.3f}"
            draw.text((x + 4, y + CELL + 2), text, fill=colour, font=font)
            name = str(uri).rsplit("/", 1)[-1][:24]
            draw.text((x + 4, y + CELL + 16), name, fill=(110, 110, 110), font=font)
    return sheet


def save_png(image: Image.Image, path: str, write_bytes) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
