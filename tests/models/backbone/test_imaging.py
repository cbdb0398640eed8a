"""Decoding: every format and mode a corpus holds becomes 8-bit RGB; broken and oversized files are refused.

The awkward files are built here from real flowers17 photos in tmp folders; none is committed.
The last tests run ``cbir extract`` over a folder of them: nothing is lost, the manifest
accounts for every input, and ``--max-failure-fraction`` makes the command exit 3 after
writing its outputs.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from models.backbone.imaging import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_and_resize,
    open_image,
)

SIZE = 96


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims ``width`` x ``height`` RGB pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def png_rgb16(rgb16: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one): the 16-bit case cameras and scanners produce."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photo_path(flowers) -> Path:
    return flowers / "3" / "image_0241.jpg"


@pytest.fixture(scope="module")
def photo(photo_path) -> Image.Image:
    with Image.open(photo_path) as im:
        return im.convert("RGB")


def reference(im: Image.Image) -> np.ndarray:
    """What the pipeline should produce for a picture already in RGB: a plain bilinear squash."""
    return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt, kw, tolerance", [
    ("PNG", {}, 0.0),
    ("BMP", {}, 0.0),
    ("TIFF", {}, 0.0),
    ("TIFF", {"compression": "tiff_lzw"}, 0.0),
    ("WEBP", {"lossless": True}, 0.0),
    ("WEBP", {"quality": 90}, 4.0),
    ("JPEG", {"quality": 95}, 3.0),
    ("GIF", {}, 12.0),  # 256-colour palette
])
def test_each_format_decodes_to_the_picture(photo, fmt, kw, tolerance):
    img = decode_and_resize(encode(photo, fmt, **kw), SIZE)
    assert img.pixels.shape == (SIZE, SIZE, 3) and img.pixels.dtype == np.uint8
    assert (img.width, img.height) == photo.size
    assert img.format == fmt
    assert diff(img.pixels, reference(photo)) <= tolerance


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_animations_and_multipage_give_the_first_frame(photo, fmt):
    inverted = ImageOps.invert(photo)
    data = encode(photo, fmt, save_all=True, append_images=[inverted], **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(io.BytesIO(data)) as im:
        assert getattr(im, "n_frames", 1) == 2
    got = decode_and_resize(data, SIZE).pixels
    assert diff(got, reference(photo)) < 12 < diff(got, reference(inverted))


# ---------------------------------------------------------------- modes


def test_grayscale_becomes_equal_channels(photo):
    gray = photo.convert("L")
    got = decode_and_resize(encode(gray, "PNG"), SIZE).pixels
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 1], got[..., 2])
    assert np.array_equal(got[..., 0], np.asarray(gray.resize((SIZE, SIZE), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("fmt, tolerance", [("TIFF", 0.0), ("JPEG", 4.0)])
def test_cmyk_becomes_rgb(photo, fmt, tolerance):
    cmyk = photo.convert("CMYK")
    data = encode(cmyk, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
    assert diff(decode_and_resize(data, SIZE).pixels, reference(photo)) <= tolerance


def test_palette_and_transparency_composite_on_white(photo):
    rgba = photo.convert("RGBA")
    alpha = np.full((photo.height, photo.width), 255, np.uint8)
    alpha[:, : photo.width // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    for fmt in ("PNG", "WEBP"):
        got = decode_and_resize(encode(rgba, fmt, **({"lossless": True} if fmt == "WEBP" else {})), SIZE).pixels
        assert got[:, : SIZE // 2 - 2].min() == 255, fmt
        assert diff(got[:, SIZE // 2 + 2:], reference(photo)[:, SIZE // 2 + 2:]) < 1.0, fmt
    la = photo.convert("LA")
    la.putalpha(Image.fromarray(alpha))
    assert decode_and_resize(encode(la, "PNG"), SIZE).pixels[:, : SIZE // 2 - 2].min() == 255
    # A palette image whose index 0 is transparent.
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    idx = np.asarray(pal).copy()
    idx[: photo.height // 2] = 0
    pal_t = Image.fromarray(idx, mode="P")
    pal_t.putpalette(pal.getpalette())
    got = decode_and_resize(encode(pal_t, "PNG", transparency=0), SIZE).pixels
    assert got[: SIZE // 2 - 2].min() == 255
    plain = decode_and_resize(encode(pal, "PNG"), SIZE).pixels
    assert diff(plain, reference(pal.convert("RGB"))) == 0.0


def test_sixteen_bit_becomes_eight_bit(photo):
    rgb = np.asarray(photo)
    # 16-bit grayscale (mode I;16) from a PNG and a TIFF: v * 257 maps back to v.
    gray = np.asarray(photo.convert("L"))
    gray16 = Image.fromarray(gray.astype(np.uint16) * 257)
    assert gray16.mode == "I;16"
    want = np.asarray(Image.fromarray(gray).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    for fmt in ("PNG", "TIFF"):
        got = decode_and_resize(encode(gray16, fmt), SIZE).pixels
        assert diff(got[..., 0], want) <= 1.0, fmt
        assert np.array_equal(got[..., 0], got[..., 2])
    # 48-bit RGB PNG.
    got = decode_and_resize(png_rgb16(rgb.astype(np.uint16) * 257), SIZE).pixels
    assert diff(got, reference(photo)) == 0.0
    # 32-bit float TIFF in [0, 1].
    f = Image.fromarray(gray.astype(np.float32) / 255.0, mode="F")
    got = decode_and_resize(encode(f, "TIFF"), SIZE).pixels
    assert diff(got[..., 0], want) <= 1.0


def test_bilevel_image(photo):
    bw = photo.convert("1")
    got = decode_and_resize(encode(bw, "PNG"), SIZE).pixels
    assert got.shape == (SIZE, SIZE, 3) and set(np.unique(got[..., 0])) - set(range(256)) == set()
    assert diff(got, reference(bw.convert("RGB"))) == 0.0


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt in ("PNG", "JPEG"):
        data = encode(photo, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
        img = decode_and_resize(data, SIZE, reduced_decode=False)
        with Image.open(io.BytesIO(data)) as im:
            upright = ImageOps.exif_transpose(im.convert("RGB") if fmt == "PNG" else im).convert("RGB")
        assert (img.width, img.height) == upright.size, (fmt, orientation)
        if orientation in (5, 6, 7, 8):
            assert (img.width, img.height) == (photo.height, photo.width)
        assert diff(img.pixels, reference(upright)) <= (0.0 if fmt == "PNG" else 1.0), (fmt, orientation)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_does_not_lose_the_image(photo):
    data = bytearray(encode(photo, "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff garbage"))
    img = decode_and_resize(bytes(data), SIZE)
    assert (img.width, img.height) == photo.size


# ---------------------------------------------------------------- pixel limit


def test_billion_pixel_claim_is_refused_from_the_header():
    data = png_claiming(100_000, 100_000)
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="10000000000"):
        decode_and_resize(data, SIZE)
    assert time.perf_counter() - started < 0.5  # nothing was decoded or allocated


@pytest.mark.parametrize("width, height", [(12_000, 12_000), (20_000, 20_000)])
def test_limit_holds_on_both_sides_of_pillows_own(width, height):
    """144 MP only makes Pillow warn; 400 MP makes it raise its own error: both are ours to refuse."""
    with pytest.raises(ImageTooLargeError):
        open_image(png_claiming(width, height))
    assert width * height > DEFAULT_MAX_PIXELS


def test_configured_limit_refuses_a_real_photo(photo_path, photo):
    data = photo_path.read_bytes()
    limit = photo.width * photo.height - 1
    with pytest.raises(ImageTooLargeError, match=str(limit)):
        decode_and_resize(data, SIZE, max_pixels=limit)
    assert decode_and_resize(data, SIZE, max_pixels=limit + 1).width == photo.width


# ---------------------------------------------------------------- broken input


def _broken(photo_path: Path) -> dict[str, tuple[bytes, type[BaseException]]]:
    good = photo_path.read_bytes()
    png = encode(Image.open(photo_path), "PNG")
    idat = png.index(b"IDAT")
    corrupt_png = png[: idat + 200] + bytes(b ^ 0x5A for b in png[idat + 200: idat + 400]) + png[idat + 400:]
    return {
        "empty": (b"", ImageDecodeError),
        "truncated_jpeg": (good[: len(good) // 2], OSError),
        "truncated_png": (png[: len(png) // 2], OSError),
        "header_only_jpeg": (good[:600], OSError),
        "random_bytes": (np.random.default_rng(7).bytes(20_000), UnidentifiedImageError),
        "text": (b"this is not an image, it is a README\n" * 20, UnidentifiedImageError),
        "html": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", UnidentifiedImageError),
        "corrupt_png_data": (corrupt_png, Exception),
        "ppm_not_supported": (encode(Image.open(photo_path), "PPM"), UnidentifiedImageError),
        "ico_not_supported": (encode(Image.open(photo_path).resize((64, 64)), "ICO"), UnidentifiedImageError),
    }


def test_broken_and_unsupported_inputs_raise(photo_path):
    for name, (data, expected) in _broken(photo_path).items():
        with pytest.raises(expected):
            decode_and_resize(data, SIZE)
            pytest.fail(f"{name} decoded")


# ---------------------------------------------------------------- reduced-scale JPEG


@pytest.fixture(scope="module")
def photo_12mp(photo) -> bytes:
    return encode(photo.resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=92)


def test_reduced_scale_jpeg_decode(photo_12mp):
    full = decode_and_resize(photo_12mp, 224, reduced_decode=False)
    fast = decode_and_resize(photo_12mp, 224)
    assert full.reduced_scale == 1 and fast.reduced_scale == 8  # 4000/8 = 500 ≥ 224; /16 does not exist
    assert (fast.width, fast.height) == (full.width, full.height) == (4000, 3000)
    assert diff(fast.pixels, full.pixels) < 2.0
    # Never below the target: 299 px needs the 1/4 scale on a 3000-px short side (750), 1/8 gives 375 ≥ 299.
    assert decode_and_resize(photo_12mp, 299).reduced_scale == 8
    assert decode_and_resize(photo_12mp, 400).reduced_scale == 4


def test_draft_side_bounds_the_reduction(photo_12mp):
    """draft_side keeps more resolution for the final resize: 1/4 scale (750 px) instead of 1/8 (375 px)."""
    full = decode_and_resize(photo_12mp, 224, reduced_decode=False)
    finer = decode_and_resize(photo_12mp, 224, draft_side=448)
    coarse = decode_and_resize(photo_12mp, 224)
    assert finer.reduced_scale == 4 and coarse.reduced_scale == 8
    assert diff(finer.pixels, full.pixels) < diff(coarse.pixels, full.pixels)
    assert decode_and_resize(photo_12mp, 224, draft_side=2000).reduced_scale == 1  # 3000 < 2 × 2000


def test_reduced_scale_keeps_exif_orientation(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo.resize((4000, 3000)), "JPEG", quality=90, exif=exif)
    fast = decode_and_resize(data, 224)
    full = decode_and_resize(data, 224, reduced_decode=False)
    assert fast.reduced_scale == 8 and (fast.width, fast.height) == (full.width, full.height) == (3000, 4000)
    assert diff(fast.pixels, full.pixels) < 2.0


def test_small_photos_are_decoded_in_full(photo_path):
    assert decode_and_resize(photo_path.read_bytes(), 299).reduced_scale == 1


# ---------------------------------------------------------------- the extract job: nothing lost


@pytest.fixture(scope="module")
def awkward_folder(tmp_path_factory, flowers, photo_path) -> tuple[Path, dict[str, int]]:
    """Six real photos per label in two labels, every format/mode variant, and the broken kinds."""
    root = tmp_path_factory.mktemp("awkward")
    for label in ("0", "4"):
        (root / label).mkdir()
        for src in sorted((flowers / label).glob("*.jpg"))[:6]:
            (root / label / src.name).write_bytes(src.read_bytes())
    photo = Image.open(photo_path).convert("RGB")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = root / "variants"
    variants.mkdir()
    good = {
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
        "gray.png": encode(photo.convert("L"), "PNG"),
        "sixteen.png": png_rgb16(np.asarray(photo).astype(np.uint16) * 257),
        "palette.gif": encode(photo, "GIF", save_all=True, append_images=[ImageOps.invert(photo)]),
        "alpha.webp": encode(rgba, "WEBP"),
        "plain.bmp": encode(photo, "BMP"),
        "plain.tif": encode(photo, "TIFF"),
        "rotated.jpg": encode(photo, "JPEG", exif=exif),
        "big.jpg": encode(photo.resize((2400, 1800)), "JPEG", quality=85),
    }
    for name, data in good.items():
        (variants / name).write_bytes(data)
    broken = root / "broken"
    broken.mkdir()
    bad = {name: data for name, (data, _) in _broken(photo_path).items()
           if name in ("empty", "truncated_jpeg", "random_bytes", "text")}
    bad["bomb"] = png_claiming(100_000, 100_000)
    for name, data in bad.items():
        (broken / f"{name}.{'png' if name == 'bomb' else 'jpg'}").write_bytes(data)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: never an input
    return root, {"photos": 12, "variants": len(good), "broken": len(bad)}


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from pipelines.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_awkward_folder_loses_nothing(awkward_folder, tmp_path, weights_dir, capsys):
    root, n = awkward_folder
    out = tmp_path / "out"
    code, stdout, _ = _run_cli(["extract", "--input", str(root), "--output", str(out), "--model", "mobilenet_v1_025",
                                "--weights-dir", weights_dir, "--max-failure-fraction", "0.5"], capsys)
    assert code == 0
    manifest = json.loads((out / "MANIFEST.json").read_text())
    total = n["photos"] + n["variants"] + n["broken"]
    assert manifest["counts"] == {"inputs": total, "read": total, "ok": n["photos"] + n["variants"],
                                  "failed": n["broken"]}
    assert f"read {total}, ok {total - n['broken']}, failed {n['broken']}" in stdout
    features = pa.concat_tables([pq.read_table(p) for p in (out / "features").glob("*.parquet")])
    failures = pa.concat_tables([pq.read_table(p) for p in (out / "failures").glob("*.parquet")])
    ids = set(features.column("image_id").to_pylist()) | set(failures.column("image_id").to_pylist())
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert ids == on_disk and features.num_rows + failures.num_rows == len(on_disk)  # exactly one row each
    rows = {r["image_id"]: r for r in failures.to_pylist()}
    assert all(r["stage"] == "decode" and r["error"] and r["message"] for r in rows.values())
    assert rows["broken/bomb.png"]["error"] == "ImageTooLargeError"
    assert rows["broken/empty.jpg"]["error"] == "ImageDecodeError"
    assert rows["broken/random_bytes.jpg"]["error"] == "UnidentifiedImageError"
    assert rows["broken/text.jpg"]["error"] == "UnidentifiedImageError"
    assert rows["broken/truncated_jpeg.jpg"]["error"] == "OSError"
    assert manifest["failures_by_reason"]["decode:UnidentifiedImageError"] == 2
    rotated = features.filter(pa.compute.equal(features.column("image_id"), "variants/rotated.jpg")).to_pylist()[0]
    photo = Image.open(root / "variants" / "plain.bmp")
    assert (rotated["width"], rotated["height"]) == (photo.height, photo.width)
    # Beam counters agree with the rows.
    metrics = manifest["metrics"]
    assert metrics["read"] == total
    assert metrics["decoded"] == total - n["broken"]
    assert metrics["failed_decode"] == n["broken"]
    assert metrics["failed_decode_UnidentifiedImageError"] == 2
    assert metrics["decoded_reduced_scale"] >= 1  # big.jpg


@pytest.mark.slow
def test_failure_threshold_exits_3_after_writing_outputs(awkward_folder, tmp_path, weights_dir, capsys):
    root, n = awkward_folder
    out = tmp_path / "out"
    code, _, stderr = _run_cli(["extract", "--input", str(root), "--output", str(out), "--model",
                                "mobilenet_v1_025", "--weights-dir", weights_dir, "--max-failure-fraction", "0.1"],
                               capsys)
    assert code == 3
    assert "max-failure-fraction" in stderr
    manifest = json.loads((out / "MANIFEST.json").read_text())  # written, and committed, before the exit
    assert manifest["counts"]["failed"] == n["broken"]
    assert sum(f["rows"] for f in manifest["files"]["features"]) == n["photos"] + n["variants"]
    assert all((out / f["path"]).exists() for kind in manifest["files"].values() for f in kind)


# -- memory: a budget per image, counted on the header --------------------------------------------------


def _peak_rss_mb_of_decoding(data: bytes) -> float:
    """Peak resident memory a fresh process adds while decoding ``data`` once (MB)."""
    import subprocess
    import sys

    # VmHWM (peak RSS of this process image), not ru_maxrss: the latter survives exec and would carry the
    # forked test runner's own size.
    code = (
        "import sys; from models.backbone.imaging import decode_and_resize\n"
        "def kb(key): return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
        "data = sys.stdin.buffer.read(); base = kb('VmRSS:')\n"
        "decode_and_resize(data, 299, reduced_decode=False)\n"
        "print((kb('VmHWM:') - base) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True, timeout=120)
    return float(out.stdout.decode().split()[-1])


@pytest.mark.parametrize("kind", ["rgba_png", "gray16_png", "float_tiff", "rgba_webp"])
def test_measured_decode_peaks_stay_under_the_estimate(kind):
    """The budget is only as good as its estimate: measured on 16 MP images, the estimate is an upper bound."""
    from models.backbone.imaging import decode_cost

    side = 4000
    if kind == "rgba_png":
        data, mode, fmt = encode(Image.new("RGBA", (side, side), (10, 200, 30, 128)), "PNG"), "RGBA", "PNG"
    elif kind == "gray16_png":
        data, mode, fmt = encode(Image.new("I;16", (side, side), 30000), "PNG"), "I;16", "PNG"
    elif kind == "float_tiff":
        data = encode(Image.fromarray(np.full((side, side), 0.25, np.float32), mode="F"), "TIFF",
                      compression="tiff_deflate")
        mode, fmt = "F", "TIFF"
    else:
        data, mode, fmt = encode(Image.new("RGBA", (side, side), (10, 200, 30, 128)), "WEBP", lossless=True), \
            "RGBA", "WEBP"
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith(mode[:3]) and im.format == fmt
        mode = im.mode
    estimate_mb = decode_cost(mode, fmt, side * side, False) / 1e6
    measured = _peak_rss_mb_of_decoding(data)
    print(f"{kind}: measured {measured:.0f} MB, estimated {estimate_mb:.0f} MB")
    assert 0.1 * estimate_mb < measured <= estimate_mb, f"{kind}: {measured:.0f} MB, estimated {estimate_mb:.0f} MB"


def test_decode_bombs_under_the_pixel_limit_are_refused_on_the_header():
    """Within 100 MP, yet gigabytes to decode: refused before any pixel, with the product's own numbers."""
    from models.backbone.imaging import DecodeBudgetError

    bombs = {
        "webp": encode(Image.new("RGBA", (7000, 7000), (0, 0, 0, 0)), "WEBP", lossless=True),
        "float tiff": encode(Image.fromarray(np.zeros((9000, 9000), np.float32), mode="F"), "TIFF",
                             compression="tiff_deflate"),
    }
    for name, data in bombs.items():
        assert len(data) < 1_000_000, name  # tiny files
        started = time.perf_counter()
        with pytest.raises(DecodeBudgetError, match="more than the budget of 1,000 MB"):
            decode_and_resize(data, SIZE)
        assert time.perf_counter() - started < 2, name
    with pytest.raises(DecodeBudgetError, match="budget of 50 MB"):
        decode_and_resize(encode(Image.new("RGB", (3000, 3000)), "PNG"), SIZE, max_decode_bytes=50_000_000)


def test_a_jpeg_with_far_too_little_data_for_its_header_is_refused(photo):
    from models.backbone.imaging import TruncatedImageError

    big = encode(photo.resize((10_000, 10_000)), "JPEG", quality=85)
    with pytest.raises(TruncatedImageError, match="truncated"):
        decode_and_resize(big[:33_000], SIZE)
    flat = encode(Image.new("RGB", (10_000, 10_000)), "JPEG", quality=10)  # a real, tiny, flat JPEG decodes
    assert decode_and_resize(flat, SIZE).width == 10_000


def test_pixel_limit_refusal_quotes_the_products_limit():
    with pytest.raises(ImageTooLargeError, match=f"limit of {DEFAULT_MAX_PIXELS} .--max-pixels."):
        open_image(png_claiming(30_000, 30_000))  # 900 MP: Pillow's own check would say 178956970
