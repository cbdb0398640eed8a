"""cbir export-model: SavedModel layout, signatures, and the same numbers as the batch pipeline.

Tolerances (README, "Serving with TensorFlow Serving"):
* ``pixels`` signature vs ``Backbone.predict``: max |diff| ≤ 1e-4 — the same Keras graph
  and preprocessing on the same float pixels (measured: 0).
* ``serving_default`` (bytes) vs the pipeline (Pillow decode + Backbone.predict): cosine ≥ 0.999
  per photo. JPEG decoding is bit-identical (accurate DCT at Pillow's draft scale); the resize
  differs by at most one grey level (TF antialiased bilinear vs Pillow's fixed-point bilinear),
  which kept the cosine at or above 0.99970 on every flowers17-dev photo (reduced-scale decode),
  on the same photos re-encoded at 400×300, 300×400 and 260×230 (full-scale decode), and at 1.0
  on imagenette-dev (224×224 already: no resize).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from models.backbone import export
from models.backbone import graph_decode as in_graph
from models.backbone.imaging import decode_and_resize
from models.backbone.network import Backbone, ModelSpec
from pipelines import cli
from pipelines.export_model import index_transform, parse_version

PIXEL_ATOL = 1e-4
MIN_COSINE = 0.999


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _sample(folder, n: int) -> list[str]:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    return files[:: max(1, len(files) // n)][:n]


@pytest.fixture(scope="module")
def backbone(mobilenet_spec):
    return Backbone(mobilenet_spec)


# Session-level folder of this export: tests/search/test_tf_serving.py serves the very same export
# (same model, version 1, this session's flowers_index transform) from here instead of exporting again.
# Nothing writes into it after the export.
SHARED_EXPORT_DIR = "flowers_savedmodel"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mobilenet_spec, flowers_index):
    base = tmp_path_factory.getbasetemp() / SHARED_EXPORT_DIR / "cbir"
    transform = index_transform(str(flowers_index[0]))
    result = export.export_savedmodel(mobilenet_spec, str(base), version=1, index=transform)
    return base, result, tf.saved_model.load(result.path)


@pytest.fixture(scope="module")
def photos(flowers, imagenette) -> list[str]:
    """Flowers are ≥ 2× the input size (reduced-scale JPEG decode); imagenette-dev photos are 224×224."""
    return _sample(flowers, 12) + _sample(imagenette, 12)


def _read(paths: list[str]) -> list[bytes]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(f.read())
    return out


# -- layout and signatures -------------------------------------------------------------------------


def test_layout_is_what_tensorflow_model_server_serves(exported, mobilenet_spec, flowers_index):
    base, result, _ = exported
    assert sorted(os.listdir(base)) == ["1"]  # the staging folder was renamed, nothing left beside it
    v1 = base / "1"
    assert (v1 / "saved_model.pb").is_file()
    assert (v1 / "variables" / "variables.index").is_file()
    assert any(n.startswith("variables.data-") for n in os.listdir(v1 / "variables"))
    info = json.loads((v1 / "assets.extra" / export.EXPORT_INFO_FILE).read_text())
    assert info == export.read_export_info(str(v1)).to_dict() == result.info.to_dict()
    assert info["model_fingerprint"] == mobilenet_spec.fingerprint()
    assert info["model"] == mobilenet_spec.describe()
    assert (info["input_size"], info["dimension"], info["preprocessing"]) == (224, 256, "tf")
    assert info["decode"]["reduced_jpeg_decode"] is True and info["decode"]["max_pixels"] > 0
    manifest = flowers_index[1]
    assert info["index"]["version"] == manifest.version
    assert info["index"]["dimension"] == manifest.dimension.output


def test_signatures_dtypes_and_shapes(exported, flowers_index):
    _, result, loaded = exported
    dim_out = flowers_index[1].dimension.output
    expected = {
        export.BYTES_SIGNATURE: ({"images": (tf.string, [None])},
                                 {"features": (tf.float32, [None, 256]), "model_fingerprint": (tf.string, [None])}),
        export.PIXELS_SIGNATURE: ({"pixels": (tf.float32, [None, 224, 224, 3])},
                                  {"features": (tf.float32, [None, 256])}),
        export.TRANSFORMED_SIGNATURE: (
            {"images": (tf.string, [None])},
            {"features": (tf.float32, [None, dim_out]), "model_fingerprint": (tf.string, [None]),
             "index_version": (tf.string, [None]), "transform_fingerprint": (tf.string, [None])},
        ),
    }
    assert set(loaded.signatures) == set(expected)
    for name, (inputs, outputs) in expected.items():
        fn = loaded.signatures[name]
        _, kwargs = fn.structured_input_signature
        assert {k: (v.dtype, v.shape.as_list()) for k, v in kwargs.items()} == inputs, name
        assert {k: (v.dtype, v.shape.as_list()) for k, v in fn.structured_outputs.items()} == outputs, name
        recorded = result.info.signatures[name]
        assert {k: v["shape"] for k, v in recorded["inputs"].items()} == {k: s for k, (_, s) in inputs.items()}


def test_warmup_record_is_a_valid_request(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    _, result, loaded = exported
    records = list(tf.data.TFRecordDataset(os.path.join(result.path, "assets.extra", export.WARMUP_FILE)))
    assert len(records) == 1
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    request = log.predict_log.request
    images = tf.make_ndarray(request.inputs["images"])
    out = loaded.signatures[request.model_spec.signature_name](images=tf.constant(images))
    assert out["features"].shape == (1, 256) and np.all(np.isfinite(out["features"].numpy()))


# -- numeric parity ----------------------------------------------------------------------------------


def test_pixels_signature_equals_backbone_predict(exported, backbone, photos):
    _, _, loaded = exported
    pixels = np.stack([decode_and_resize(b, 224).pixels for b in _read(photos)]).astype(np.float32)
    served = loaded.signatures["pixels"](pixels=tf.constant(pixels))["features"].numpy()
    np.testing.assert_allclose(served, backbone.predict(pixels), rtol=0, atol=PIXEL_ATOL)


def _reencoded(paths: list[str], size: tuple[int, int]) -> list[bytes]:
    """Real photos below twice the input size: full-scale decode, then a downscale."""
    out = []
    for p in paths:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def test_bytes_signature_matches_the_pipeline(exported, backbone, photos, mobilenet_spec):
    _, _, loaded = exported
    blobs = _read(photos) + _reencoded(photos[:6], (400, 300))
    pipeline = backbone.predict(np.stack([decode_and_resize(b, 224).pixels for b in blobs]))
    out = loaded.signatures["serving_default"](images=tf.constant(blobs))
    served = out["features"].numpy()
    cos = _cosine(served, pipeline)
    assert cos.min() >= MIN_COSINE, cos.round(5)
    assert set(out["model_fingerprint"].numpy()) == {mobilenet_spec.fingerprint().encode()}
    # not vacuous: an unrelated photo is far below the bar
    assert _cosine(served[:1], pipeline[-1:])[0] < 0.95


def test_bytes_signature_matches_the_written_feature_rows(exported, flowers_features, flowers):
    """Against the Parquet rows cbir extract wrote for the same files."""
    _, _, loaded = exported
    out_dir, manifest = flowers_features
    from transforms.feature_sets import feature_files

    table = pq.read_table(feature_files(str(out_dir), manifest)[0], columns=["uri", "feature"])
    uris = table.column("uri").to_pylist()[:10]
    rows = np.asarray(table.column("feature").to_pylist()[:10], dtype=np.float32)
    blobs = [tf.io.gfile.GFile(u, "rb").read() for u in uris]
    served = loaded.signatures["serving_default"](images=tf.constant(blobs))["features"].numpy()
    assert _cosine(served, rows).min() >= MIN_COSINE


def test_transformed_signature_is_the_query_path(exported, flowers_index, weights_dir, photos):
    from artefacts.vector_space import transform_fingerprint
    from search.embedder import open_embedder

    _, _, loaded = exported
    manifest = flowers_index[1]
    embedder = open_embedder(os.path.join(str(flowers_index[0]), manifest.version), manifest, weights_dir)
    blobs = _read(photos)
    local, ok, failures = embedder.embed_bytes(blobs)
    assert not failures and len(ok) == len(blobs)
    out = loaded.signatures["transformed"](images=tf.constant(blobs))
    served = out["features"].numpy()
    assert served.shape == local.shape == (len(blobs), manifest.dimension.output)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert _cosine(served, local).min() >= MIN_COSINE
    assert set(out["index_version"].numpy()) == {manifest.version.encode()}
    assert set(out["transform_fingerprint"].numpy()) == {transform_fingerprint(manifest).encode()}


def test_extract_through_the_exported_pixels_signature(exported, flowers, flowers_features, tmp_path):
    """cbir extract --model savedmodel:DIR/1 --signature pixels gives the preset's features."""
    from pipelines import extract
    from transforms.feature_sets import feature_files

    _, result, _ = exported
    spec = ModelSpec("savedmodel:" + result.path, signature="pixels", input_size=224)
    out = tmp_path / "via_savedmodel"
    pattern = flowers / "3" / "image_024*.jpg"
    manifest = extract.run(extract.ExtractConfig(input=str(pattern), output=str(out), model=spec))
    assert manifest.counts.failed == 0 and manifest.counts.ok == len(list(flowers.glob("3/image_024*.jpg")))
    assert manifest.model["preset"] == "savedmodel" and manifest.dimension == 256

    def by_uri(out_dir, m):
        t = pq.read_table(feature_files(str(out_dir), m), columns=["uri", "feature"])
        return dict(zip(t.column("uri").to_pylist(), np.asarray(t.column("feature").to_pylist()), strict=True))

    ours = by_uri(out, manifest)
    preset = by_uri(*flowers_features)
    assert set(ours) <= set(preset)
    for uri, vec in ours.items():
        np.testing.assert_allclose(vec, preset[uri], rtol=0, atol=PIXEL_ATOL)

    # an index built from these features accepts vectors served by the same export
    from types import SimpleNamespace

    from search.compatibility import accepted_served_fingerprints
    from search.tf_serving.embedder import _export_card

    index_like = SimpleNamespace(model=manifest.model, model_fingerprint=manifest.model_fingerprint)
    accepted = accepted_served_fingerprints(index_like, _export_card(index_like))
    assert accepted == {manifest.model_fingerprint, result.info.model_fingerprint}


# -- the in-graph decoder against Pillow's ----------------------------------------------------------


@pytest.fixture(scope="module")
def graph_decode():
    return tf.function(lambda data: in_graph.decode_image(data, 224),
                       input_signature=[tf.TensorSpec([], tf.string)], autograph=False)


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _little_endian_exif(orientation: int) -> bytes:
    """An APP1 payload in Intel byte order (Pillow itself writes Motorola order)."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + tiff


def _synthetic_cases(flowers) -> dict[str, bytes]:
    photo = Image.open(sorted(flowers.glob("0/*.jpg"))[0]).convert("RGB")  # 689x500: reduced-scale decode
    small = photo.resize((300, 200))  # not square: orientations 5-8 swap the axes
    cases = {}
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        cases[f"jpeg-exif-{o}"] = _encode(photo, "JPEG", exif=exif.tobytes(), quality=92)
        cases[f"png-exif-{o}"] = _encode(small, "PNG", exif=exif.tobytes())
    for o in (3, 6, 8):
        cases[f"jpeg-exif-intel-{o}"] = _encode(small, "JPEG", exif=_little_endian_exif(o), quality=92)
    rgba = np.asarray(small.convert("RGBA")).copy()
    rgba[:, :100, 3] = 0
    rgba[:, 100:200, 3] = 128
    rgba_im = Image.fromarray(rgba, "RGBA")
    cases.update({
        "png-rgba": _encode(rgba_im, "PNG"),
        "png-la": _encode(rgba_im.convert("LA"), "PNG"),
        "png-l": _encode(small.convert("L"), "PNG"),
        "png-palette": _encode(small.convert("P"), "PNG"),
        "gif": _encode(small, "GIF"),
        "bmp": _encode(small, "BMP"),
        "webp": _encode(small, "WEBP", lossless=True),
        "jpeg-grey": _encode(small.convert("L"), "JPEG"),
        "jpeg-cmyk": _encode(small.convert("CMYK"), "JPEG"),
        "jpeg-224": _encode(photo.resize((224, 224)), "JPEG"),
    })
    return cases


def test_in_graph_decode_matches_pillow_within_one_grey_level(graph_decode, flowers):
    worst = {}
    for name, data in _synthetic_cases(flowers).items():
        ours = graph_decode(tf.constant(data)).numpy()
        pillow = decode_and_resize(data, 224).pixels.astype(np.float32)
        worst[name] = float(np.abs(ours - pillow).max())
    assert max(worst.values()) <= 1.0, {k: v for k, v in worst.items() if v > 1}
    # orientation is applied: ignoring it would be far off for a rotated photo
    rotated = _synthetic_cases(flowers)["jpeg-exif-6"]
    upright = decode_and_resize(_encode(Image.open(io.BytesIO(rotated)), "PNG"), 224).pixels.astype(np.float32)
    assert np.abs(graph_decode(tf.constant(rotated)).numpy() - upright).mean() > 10


def test_exif_orientation_reader_survives_garbage():
    readings = [
        in_graph.exif_orientation(tf.constant(data)).numpy()
        for data in (b"", b"\xff\xd8", b"\xff\xd8\xff\xe1\x00\x08Exif\x00\x00", b"\xff\xd8" + b"\xff\xe1\xff\xff" * 50,
                     b"\x89PNG\r\n\x1a\neXIfMM\x00*\xff\xff\xff\xff", os.urandom(4096))
    ]
    assert readings == [1] * len(readings)


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\x00" * 64)


def test_bad_bytes_fail_with_a_reason(graph_decode, flowers):
    photo = (flowers / "0" / "image_0001.jpg").read_bytes()
    cases = {
        b"": "empty file",
        b"not an image at all" * 4: "Unknown image file format",
        photo[: len(photo) // 2]: "JPEG",
        _png_header(20000, 20000): "ImageTooLargeError",
    }
    for data, reason in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=reason):
            graph_decode(tf.constant(data))
    # the JPEG limit is checked on the header, before decoding
    with pytest.raises(tf.errors.InvalidArgumentError, match="ImageTooLargeError"):
        in_graph.decode_image(tf.constant(photo), 224, max_pixels=1000)


def test_one_bad_image_fails_the_request(exported, photos):
    _, _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        loaded.signatures["serving_default"](images=tf.constant(_read(photos[:2]) + [b"garbage" * 10]))
    empty = loaded.signatures["serving_default"](images=tf.constant([], tf.string))
    assert empty["features"].shape == (0, 256)


# -- the command and its refusals ---------------------------------------------------------------------


def test_cli_refuses_an_existing_version_and_replaces_it_with_force(tmp_path, weights_dir, capsys):
    base = tmp_path / "models"
    (base / "1").mkdir(parents=True)
    (base / "1" / "previous.txt").write_text("a version TF Serving may be serving")
    args = ["export-model", "--model", "mobilenet_v1_025", "--output", str(base), "--weights-dir", weights_dir,
            "--no-warmup"]
    assert cli.main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(os.listdir(base)) == ["1"] and (base / "1" / "previous.txt").exists()

    assert cli.main(args + ["--force"]) == 0
    out = capsys.readouterr().out
    assert "signature serving_default: images string[None]" in out and str(base / "1") in out
    assert sorted(os.listdir(base)) == ["1"]  # no staging or replaced folder left behind
    assert not (base / "1" / "previous.txt").exists()
    assert (base / "1" / "saved_model.pb").is_file()
    assert not (base / "1" / "assets.extra" / export.WARMUP_FILE).exists()
    assert parse_version("next", str(base)) == 2


def test_version_argument(tmp_path):
    assert parse_version("next", str(tmp_path / "missing")) == 1
    for name in ("3", "12", "_staging-4-abc", "notes"):
        (tmp_path / name).mkdir()
    assert parse_version("next", str(tmp_path)) == 13
    assert parse_version("7", str(tmp_path)) == 7
    for bad in ("0", "-1", "latest"):
        with pytest.raises(export.ExportError):
            parse_version(bad, str(tmp_path))


def test_refuses_a_transform_of_another_model(tmp_path, mobilenet_spec, flowers_index):
    import dataclasses

    transform = dataclasses.replace(index_transform(str(flowers_index[0])), model_fingerprint="0123456789abcdef")
    with pytest.raises(export.ExportError, match="0123456789abcdef"):
        export.export_savedmodel(mobilenet_spec, str(tmp_path / "m"), index=transform)
    assert not (tmp_path / "m").exists()
    with pytest.raises(export.ExportError, match="preset"):
        export.export_savedmodel(ModelSpec("savedmodel:/nowhere"), str(tmp_path / "m"))
