"""Runtimes of the backbone: each matches Keras within 1e-4, conversion once, refusals before any work."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from models.backbone import imaging, runtimes
from models.backbone.network import Backbone, ModelSpec


@pytest.fixture(scope="module")
def photos(flowers) -> np.ndarray:
    paths = sorted(Path(flowers).rglob("*.jpg"))[:6]
    return np.stack([imaging.decode_and_resize(p.read_bytes(), 224).pixels for p in paths]).astype(np.float32)


@pytest.fixture(scope="module")
def keras_features(mobilenet_spec, photos) -> np.ndarray:
    return Backbone(dataclasses.replace(mobilenet_spec, runtime="keras")).predict(photos)


@pytest.mark.parametrize("runtime", ["graph", "xla", "litert"])
def test_every_runtime_matches_keras_on_photos(mobilenet_spec, photos, keras_features, runtime):
    backbone = Backbone(dataclasses.replace(mobilenet_spec, runtime=runtime))
    got = backbone.predict(photos)
    assert backbone.runtime == runtime
    assert got.dtype == np.float32 and got.shape == keras_features.shape
    assert float(np.max(np.abs(got - keras_features))) <= runtimes.PARITY_TOLERANCE
    # odd batch sizes are padded to a bucket and cut back: the same rows come out
    np.testing.assert_allclose(backbone.predict(photos[:3]), got[:3], atol=1e-5)


def test_auto_picks_litert_on_this_cpu_and_the_fingerprint_ignores_the_runtime(mobilenet_spec, photos,
                                                                               keras_features):
    spec = dataclasses.replace(mobilenet_spec, runtime="auto")
    backbone = Backbone(spec)
    assert backbone.resolve_runtime() == "litert"  # no GPU here, and the package is pinned
    assert float(np.max(np.abs(backbone.predict(photos) - keras_features))) <= runtimes.PARITY_TOLERANCE
    assert spec.fingerprint() == dataclasses.replace(spec, runtime="keras").fingerprint()


def test_conversion_happens_once_per_model_not_per_backbone(mobilenet_spec, photos):
    spec = dataclasses.replace(mobilenet_spec, runtime="litert")
    Backbone(spec).predict(photos[:1])
    before = runtimes.conversions
    Backbone(spec).predict(photos[:1])  # another worker process on this machine: reads the cache
    assert runtimes.conversions == before
    assert list(Path(runtimes.cache_dir()).glob("*.tflite"))


def test_interpreters_are_per_thread(mobilenet_spec, photos):
    import threading

    backbone = Backbone(dataclasses.replace(mobilenet_spec, runtime="litert"))
    ref = backbone.predict(photos)
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = backbone.predict(photos)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got in results.values():
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_a_missing_package_is_refused_explicitly_and_auto_falls_back(monkeypatch, mobilenet_spec, photos, caplog):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(runtimes.RuntimeUnavailableError, match="ai-edge-litert"):
        Backbone(dataclasses.replace(mobilenet_spec, runtime="litert")).resolve_runtime()
    with caplog.at_level(logging.WARNING, logger="models.backbone.network"):
        assert Backbone(dataclasses.replace(mobilenet_spec, runtime="auto")).resolve_runtime() == "graph"
    assert "not LiteRT" in caplog.text and "ai-edge-litert" in caplog.text


@pytest.fixture(scope="module")
def svd_savedmodel(tmp_path_factory) -> str:
    """A SavedModel with an op LiteRT has no kernel for (Svd)."""
    import tensorflow as tf

    class Model(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def serve(self, pixels):
            return {"features": tf.linalg.svd(tf.reshape(pixels, (-1, 32 * 32, 3)), compute_uv=False)}

    path = str(tmp_path_factory.mktemp("svd") / "model")
    model = Model()
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})
    return path


def test_an_op_litert_cannot_convert_is_refused_with_the_op_and_auto_uses_the_graph(svd_savedmodel):
    spec = ModelSpec(f"savedmodel:{svd_savedmodel}", input_size=32, runtime="litert")
    with pytest.raises(runtimes.RuntimeUnavailableError, match="Svd.*--runtime graph"):
        Backbone(spec).resolve_runtime()
    auto = Backbone(dataclasses.replace(spec, runtime="auto"))
    assert auto.resolve_runtime() == "graph"
    assert auto.predict(np.full((2, 32, 32, 3), 7.0, np.float32)).shape == (2, 3)


def test_keras_runtime_needs_a_keras_model_and_jit_contradictions_are_refused(svd_savedmodel, mobilenet_spec):
    with pytest.raises(runtimes.RuntimeUnavailableError, match="SavedModel"):
        Backbone(ModelSpec(f"savedmodel:{svd_savedmodel}", input_size=32, runtime="keras")).resolve_runtime()
    assert dataclasses.replace(mobilenet_spec, jit=True, runtime="auto").requested_runtime() == "xla"
    with pytest.raises(ValueError, match="--jit"):
        dataclasses.replace(mobilenet_spec, jit=True, runtime="litert").requested_runtime()
    with pytest.raises(ValueError, match="runtime must be one of"):
        Backbone(dataclasses.replace(mobilenet_spec, runtime="tflite"))


def _small_folder(flowers: Path, dest: Path, n: int) -> Path:
    dest.mkdir()
    for p in sorted(Path(flowers).rglob("*.jpg"))[:n]:
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_extract_on_litert_converts_once_per_job_and_records_the_runtime(tmp_path, monkeypatch, flowers,
                                                                          mobilenet_spec):
    from pipelines import extract
    from transforms.inference import BatchingOptions

    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))  # nothing converted yet
    folder = _small_folder(flowers, tmp_path / "in", 8)
    before = runtimes.conversions
    manifest = extract.run(extract.ExtractConfig(
        input=str(folder), output=str(tmp_path / "out"), model=dataclasses.replace(mobilenet_spec, runtime="litert"),
        batching=BatchingOptions(min_batch_size=2, max_batch_size=2)))
    assert manifest.counts.ok == 8 and manifest.runtime == "litert"
    assert manifest.metrics["batches_runtime_litert"] >= 4  # four bundles or more ...
    assert runtimes.conversions == before + 1  # ... one conversion, on the launcher


def test_cli_refuses_an_unavailable_runtime_before_any_work(tmp_path, monkeypatch, flowers, weights_dir, capsys):
    from pipelines import cli

    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    folder = _small_folder(flowers, tmp_path / "in", 2)
    code = cli.main(["extract", "--input", str(folder), "--output", str(tmp_path / "out"), "--model",
                     "mobilenet_v1_025", "--weights-dir", weights_dir, "--runtime", "litert"])
    assert code == 2
    assert "ai-edge-litert" in capsys.readouterr().err
    assert not (tmp_path / "out" / "MANIFEST.json").exists()


def test_random_weights_are_never_served_from_the_cache(mobilenet_spec, photos):
    """Each process draws its own random weights: a cached conversion would be another network."""
    spec = ModelSpec("mobilenet_v1_025", weights="random", runtime="litert")
    first = Backbone(spec)
    first.predict(photos[:1])
    before = runtimes.conversions
    second = Backbone(spec)
    got = second.predict(photos[:2])
    assert runtimes.conversions == before + 1  # converted again, from its own weights
    reference = second.runner("graph")(photos[:2])
    assert float(np.max(np.abs(got - reference))) <= runtimes.PARITY_TOLERANCE


def test_batches_larger_than_a_chunk_give_the_same_rows(mobilenet_spec, photos):
    backbone = Backbone(dataclasses.replace(mobilenet_spec, runtime="litert"))
    whole = backbone.predict(photos)
    flat = runtimes.litert_flatbuffer(backbone.graph, mobilenet_spec.fingerprint(), backbone.size, "test")
    chunked = runtimes.LiteRTRunner(flat, backbone.size, chunk=4)(photos)  # 6 photos: a chunk of 4, then 2
    assert chunked.shape == whole.shape
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_auto_probes_parity_once_per_model_and_machine(tmp_path, monkeypatch, mobilenet_spec, photos):
    """The second auto choice reads the probe's verdict instead of running both networks again."""
    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))
    spec = dataclasses.replace(mobilenet_spec, runtime="auto")
    first = Backbone(spec)
    assert first.resolve_runtime() == "litert"
    assert runtimes.cached_parity(spec.fingerprint(), first.size) <= runtimes.PARITY_TOLERANCE

    def no_probe(*args):
        raise AssertionError("probed again")

    monkeypatch.setattr(runtimes, "max_difference", no_probe)
    second = Backbone(spec)
    assert second.resolve_runtime() == "litert"
    np.testing.assert_array_equal(second.predict(photos[:2]), first.predict(photos[:2]))
    runtimes.store_parity(spec.fingerprint(), first.size, 1.0)  # a verdict that LiteRT is off is kept too
    assert Backbone(spec).resolve_runtime() == "graph"
