"""RunInference extraction: bounded batches, precision flags, SavedModels, incremental runs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.backbone.imaging import decode_and_resize
from models.backbone.network import Backbone, ModelSpec
from pipelines import extract
from transforms.inference import BatchingOptions

# Mixed precision computes in 16-bit floats and returns float32; these bounds were measured on
# flowers17-dev with MobileNet v1 0.25 (worst image: float16 0.9999, bfloat16 0.979).
MIN_COSINE = {"float16": 0.999, "bfloat16": 0.97}


pytestmark = pytest.mark.slow  # every test here runs cbir extract


def _table(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "features").glob("part-*.parquet"))])


def _by_id(table: pa.Table) -> dict[str, np.ndarray]:
    feats = np.asarray(table.column("feature").combine_chunks().values.to_numpy(zero_copy_only=False))
    feats = feats.reshape(table.num_rows, -1).astype(np.float32)
    return dict(zip(table.column("image_id").to_pylist(), feats, strict=True))


@pytest.fixture(scope="module")
def pixels(flowers):
    paths = sorted(flowers.glob("*/*.jpg"))[::45]
    return np.stack([decode_and_resize(p.read_bytes(), 224).pixels for p in paths])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_mixed_precision_stays_within_tolerance(mobilenet_spec, pixels, precision):
    ref = Backbone(mobilenet_spec).predict(pixels)
    spec = ModelSpec(mobilenet_spec.name, weights_dir=mobilenet_spec.weights_dir, precision=precision)
    got = Backbone(spec).predict(pixels)
    assert got.dtype == np.float32
    assert _cosine(ref, got).min() >= MIN_COSINE[precision]
    assert spec.fingerprint() == mobilenet_spec.fingerprint()  # same network: same index space


def test_xla_jit_matches_float32(mobilenet_spec, pixels):
    ref = Backbone(mobilenet_spec).predict(pixels)
    spec = ModelSpec(mobilenet_spec.name, weights_dir=mobilenet_spec.weights_dir, jit=True)
    assert np.max(np.abs(Backbone(spec).predict(pixels) - ref)) < 1e-4


def test_unknown_precision_is_refused(mobilenet_spec):
    with pytest.raises(ValueError, match="precision"):
        Backbone(ModelSpec(mobilenet_spec.name, weights_dir=mobilenet_spec.weights_dir, precision="int8"))


def test_batches_are_bounded_and_metrics_visible(tmp_path, flowers, mobilenet_spec):
    cfg = extract.ExtractConfig(
        input=str(flowers / "2"), output=str(tmp_path), model=mobilenet_spec,
        batching=BatchingOptions(min_batch_size=2, max_batch_size=5),
    )
    manifest = extract.run(cfg)
    sizes = manifest.metrics["inference_request_batch_size"]
    assert sizes["max"] <= 5 and sizes["count"] >= 80 / 5
    assert manifest.metrics["num_inferences"] == 80
    assert manifest.counts.ok == 80


def _corpus(root, flowers, classes: dict[str, int]) -> None:
    for label, n in classes.items():
        os.makedirs(root / label, exist_ok=True)
        for p in sorted((flowers / label).glob("*.jpg"))[:n]:
            shutil.copy(p, root / label / p.name)


def test_incremental_run_extracts_only_new_images(tmp_path, flowers, mobilenet_spec):
    corpus = tmp_path / "corpus"
    _corpus(corpus, flowers, {"3": 20, "4": 20})
    night1 = extract.run(extract.ExtractConfig(input=str(corpus), output=str(tmp_path / "n1"), model=mobilenet_spec))
    assert night1.counts.ok == 40
    _corpus(corpus, flowers, {"6": 2})  # 5% new images
    deleted = "3/" + sorted(os.listdir(corpus / "3"))[0]
    (corpus / deleted).unlink()  # and one deleted
    night2 = extract.run(extract.ExtractConfig(
        input=str(corpus), output=str(tmp_path / "n2"), model=mobilenet_spec, previous=str(tmp_path / "n1"),
    ))
    assert night2.metrics["reused_by_metadata"] == 39  # size and time unchanged: carried unread
    assert night2.metrics.get("reused", 0) == 0  # of the two read, none has a known digest
    assert night2.metrics["to_extract"] == 2
    assert night2.metrics["num_inferences"] == 2
    assert (night2.counts.inputs, night2.counts.read, night2.counts.ok, night2.counts.failed) == (41, 41, 41, 0)
    old, new = _by_id(_table(tmp_path / "n1")), _by_id(_table(tmp_path / "n2"))
    added = {f"6/{p.name}" for p in (corpus / "6").iterdir()}
    assert set(new) == (set(old) - {deleted}) | added
    for image_id, vec in new.items():
        if image_id in old:
            np.testing.assert_array_equal(vec, old[image_id])
    fresh = sorted(i for i in new if i.startswith("6/"))
    direct = Backbone(mobilenet_spec).predict(
        np.stack([decode_and_resize((corpus / i).read_bytes(), 224).pixels for i in fresh])
    )
    assert np.max(np.abs(np.stack([new[i] for i in fresh]) - direct)) < 1e-4
    rows = _table(tmp_path / "n2").to_pylist()
    assert all(r["width"] > 0 and r["height"] > 0 and r["label"] for r in rows)


def test_previous_run_with_another_model_is_not_reused(tmp_path, flowers, mobilenet_spec):
    first = tmp_path / "first"
    extract.run(extract.ExtractConfig(input=str(flowers / "5"), output=str(first), model=mobilenet_spec,
                                      feature_dtype="float16"))
    second = extract.run(extract.ExtractConfig(input=str(flowers / "5"), output=str(tmp_path / "second"),
                                               model=mobilenet_spec, previous=str(first)))
    assert "reused" not in second.metrics
    assert second.metrics["num_inferences"] == 80


def test_float16_storage_halves_the_vectors(tmp_path, flowers, mobilenet_spec, flowers_features):
    out = tmp_path / "f16"
    m = extract.run(extract.ExtractConfig(input=str(flowers / "7"), output=str(out), model=mobilenet_spec,
                                          feature_dtype="float16"))
    table = _table(out)
    assert table.schema.field("feature").type == pa.list_(pa.float16(), 256)
    assert m.feature_dtype == "float16"
    ref = _by_id(_table(flowers_features[0]))
    got = _by_id(table)
    diffs = [np.max(np.abs(got[i] - ref["7/" + i]) / (np.abs(ref["7/" + i]).max())) for i in got]
    assert max(diffs) < 2e-3


def test_savedmodel_extracts_like_the_preset(tmp_path, flowers, mobilenet_spec, flowers_features):
    import tensorflow as tf

    from models.backbone.network import preprocess

    keras_model = Backbone(mobilenet_spec).keras_model

    class Extractor(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = keras_model

        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32, name="pixels")])
        def features(self, pixels):
            return {"embedding": self.model(preprocess(pixels, "tf"), training=False)}

    module = Extractor()
    path = tmp_path / "sm"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.features})
    spec = ModelSpec(f"savedmodel:{path}", input_size=224)
    out = tmp_path / "out"
    manifest = extract.run(extract.ExtractConfig(input=str(flowers / "8"), output=str(out), model=spec))
    assert manifest.dimension == 256 and manifest.model["preset"] == "savedmodel"
    ref = _by_id(_table(flowers_features[0]))
    got = _by_id(_table(out))
    assert len(got) == 80
    assert max(np.max(np.abs(got[i] - ref["8/" + i])) for i in got) < 1e-4


def test_the_model_is_built_once_per_process_for_every_chunk_pipeline(mobilenet_spec):
    """Chunk pipelines in one process share the model they load; random weights never are shared."""
    from models.backbone.network import ModelSpec
    from transforms.inference import BackboneModelHandler

    a = BackboneModelHandler(mobilenet_spec, BatchingOptions()).load_model()
    b = BackboneModelHandler(mobilenet_spec, BatchingOptions(max_batch_size=8)).load_model()
    assert a is b
    random = ModelSpec("mobilenet_v1_025", weights="random")
    assert BackboneModelHandler(random, BatchingOptions()).load_model() is not (
        BackboneModelHandler(random, BatchingOptions()).load_model())
