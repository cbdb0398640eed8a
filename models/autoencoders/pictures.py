"""The two pictures ``cbir train-autoencoder`` writes: the loss curve and the reconstruction sheet (PNG bytes).

Both are meant to be read by a person deciding whether training worked: the loss curve
shows training and held-out loss per epoch and, for a denoiser, the held-out loss of doing
nothing (the noisy input itself), which the reconstruction has to beat; the sheet shows the
same fixed held-out images as input, noisy input and reconstruction, enlarged without
smoothing so that blur in the reconstruction is the network's and not the picture's.
"""

from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def loss_curve_png(history: dict[str, list[float]], title: str, do_nothing: float | None = None) -> bytes:
    """Training and validation MSE per epoch (log scale), with the noisy input's MSE as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    ax.plot(epochs, history.get("loss", []), "o-", label="training")
    if history.get("val_loss"):
        ax.plot(epochs, history["val_loss"], "s-", label="held-out")
    if do_nothing is not None:
        ax.axhline(do_nothing, color="grey", linestyle="--", label="held-out, noisy input as is")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean squared error (pixels in [0, 1])")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))  # readable at 3 epochs and at 300
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def reconstruction_sheet_png(rows: list[tuple[str, np.ndarray]], title: str, cell: int = 112) -> bytes:
    """``rows`` = [(name, (n, h, w, 3) images in [0, 1] or uint8)] → one labelled grid, a row per name."""
    label_w, gap, top = 130, 4, 30
    n = max(len(images) for _, images in rows)
    font = _font(14)
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 12  # never cut the title
    sheet = Image.new("RGB", (max(label_w + n * (cell + gap), title_w), top + len(rows) * (cell + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), title, fill=(0, 0, 0), font=font)
    for r, (name, images) in enumerate(rows):
        y = top + r * (cell + gap)
        draw.text((6, y + cell // 2 - 8), name, fill=(0, 0, 0), font=_font(14))
        for c, image in enumerate(images):
            arr = np.asarray(image)
            if arr.dtype != np.uint8:
                arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
            tile = Image.fromarray(arr).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_w + c * (cell + gap), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
