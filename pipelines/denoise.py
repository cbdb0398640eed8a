"""``cbir denoise --model DIR IMAGE… --output OUT``: cleaned copies of images, each at its own size, as PNG.

``DIR`` is a ``cbir train-autoencoder --noise`` output; the network is rebuilt from its weights
data (``models.autoencoders.denoiser``), never loaded as code. Each image is read with the readers' limits
(regular files only, size checked before reading), decoded by the product's rules at full size,
cleaned tile by tile and written as ``OUT/<name>.png`` (lossless: a JPEG would add back the
artefacts just removed). Two inputs with the same name get ``-2``, ``-3``… suffixes, and an
output that would overwrite one of the inputs is refused before any work. An image that cannot
be read or decoded is reported and the others go on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import sys
import time
from typing import Any

from models.backbone.imaging import DEFAULT_MAX_PIXELS
from plumbing import fsutil

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DenoiseResult:
    written: list[tuple[str, str]]  # (input, output)
    failures: list[dict[str, str]]  # {"image", "error", "message"}
    seconds: float


def output_names(images: list[str]) -> list[str]:
    """``<stem>.png`` per input, unique: repeated stems get ``-2``, ``-3``… in input order."""
    seen: dict[str, int] = {}
    names = []
    for path in images:
        stem = posixpath.basename(path.rstrip("/")).rsplit(".", 1)[0] or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        names.append(f"{stem}.png" if n == 1 else f"{stem}-{n}.png")
    return names


def run(model: str, images: list[str], output: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> DenoiseResult:
    from models.autoencoders.denoiser import Denoiser, decode_rgb, encode_png

    targets = [fsutil.join(output, name) for name in output_names(images)]
    def same(path: str) -> str:
        return path if "://" in path else os.path.realpath(path)

    clash = sorted({same(t) for t in targets} & {same(i) for i in images})
    if clash:
        raise ValueError(f"--output {output} would overwrite the input {clash[0]}: write the cleaned images elsewhere")
    denoiser = Denoiser.load(model, read=fsutil.read_bytes)
    started = last = time.perf_counter()
    written, failures = [], []
    for i, (path, target) in enumerate(zip(images, targets, strict=True)):
        try:
            rgb = decode_rgb(fsutil.read_input(path), max_pixels)
        except Exception as exc:  # unreadable, not a regular file, too large, not an image: reported, not fatal
            failures.append({"image": path, "error": type(exc).__name__, "message": str(exc)})
            continue
        fsutil.write_bytes_atomic(target, encode_png(denoiser.clean(rgb)))
        written.append((path, target))
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            log.info("denoised %d of %d images (%.1f images/s)", i + 1, len(images), (i + 1) / (last - started))
    return DenoiseResult(written, failures, time.perf_counter() - started)


def register(subparsers: Any) -> None:
    from pipelines.options import positive_int

    p = subparsers.add_parser("denoise", help="clean images with a cbir train-autoencoder --noise model (PNG out)")
    p.add_argument("--model", required=True, help="a cbir train-autoencoder --noise output folder")
    p.add_argument("images", nargs="+")
    p.add_argument("--output", required=True, help="folder for the cleaned images (<name>.png, same size)")
    p.add_argument("--max-pixels", type=positive_int, default=None, help="refuse images above this many pixels")
    p.set_defaults(handler=main, beam=False)


def main(args: Any, beam_args: list[str]) -> int:
    result = run(args.model, args.images, args.output, args.max_pixels or DEFAULT_MAX_PIXELS)
    for src, dst in result.written:
        print(f"{src} -> {dst}")
    print(f"denoise: {len(result.written)} cleaned, {len(result.failures)} failed in {result.seconds:.1f}s")
    for f in result.failures:
        print(f"could not read {f['image']}: {f['error']}: {f['message']}", file=sys.stderr)
    return 1 if result.failures and not result.written else 0
