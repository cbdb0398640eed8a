"""Contact sheets: each query next to its neighbours, with labels and scores."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from models.backbone.imaging import decode_and_resize

CELL = 160
CAPTION = 34


LETTERBOX = (245, 245, 245)  # the bars around a thumbnail that is not square


def fitted(data: bytes, box: int) -> Image.Image:
    """The image decoded as the product decodes it, scaled to fit ``box`` × ``box`` with its aspect ratio kept.

    The decoder squashes the whole frame to a square; the original width and height it reports
    undo that, so the thumbnail shows the photo's real proportions. Raises on undecodable bytes.
    """
    decoded = decode_and_resize(data, box)
    scale = box / max(decoded.width, decoded.height)
    size = (max(1, round(decoded.width * scale)), max(1, round(decoded.height * scale)))
    return Image.fromarray(decoded.pixels).resize(size, Image.Resampling.BILINEAR)


def letterbox(image: Image.Image, box: int, fill: tuple[int, int, int] = LETTERBOX) -> Image.Image:
    """``image`` (at most ``box`` a side) centred on a ``box`` × ``box`` square of ``fill``."""
    out = Image.new("RGB", (box, box), fill)
    out.paste(image, ((box - image.width) // 2, (box - image.height) // 2))
    return out


def _thumb(data: bytes | None, box: int = CELL) -> Image.Image:
    """A letterboxed thumbnail (aspect ratio kept); grey when missing, pink when undecodable."""
    if data is None:
        return Image.new("RGB", (box, box), (200, 200, 200))
    try:
        return letterbox(fitted(data, box), box)
    except Exception:
        return Image.new("RGB", (box, box), (230, 180, 180))


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
        cells = [(row["query"], "query", None, (40, 90, 200), None)]
        cells += [(h["uri"], h.get("label") or "", h["score"], (0, 0, 0), h.get("inliers")) for h in row["results"]]
        for c, (uri, label, score, colour, inliers) in enumerate(cells):
            x = c * CELL
            thumb = ImageOps.expand(_thumb(read_bytes(uri), CELL - 8), border=4,
                                    fill=colour if c == 0 else "white")
            sheet.paste(thumb, (x, y))
            text = str(label)[:22] if score is None else f"{str(label)[:14]} {score:.3f}"
            draw.text((x + 4, y + CELL + 2), text, fill=colour, font=font)
            name = str(uri).rsplit("/", 1)[-1][:24]
            if inliers is not None:  # geometric verification (--verify): matches one homography explains
                name = f"{inliers} inliers  {name}"[:26]
            draw.text((x + 4, y + CELL + 16), name, fill=(0, 120, 60) if inliers else (110, 110, 110), font=font)
    return sheet


def save_png(image: Image.Image, path: str, write_bytes) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
