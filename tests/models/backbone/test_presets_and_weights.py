"""Presets build, weights resolve offline, and a missing file is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from models.backbone.network import Backbone, ModelSpec
from models.backbone.presets import PRESETS, get_preset
from models.backbone.weights import WeightsNotFoundError, resolve_weights


def test_mobilenet_weights_resolve_from_weights_dir(weights_dir):
    path = resolve_weights(get_preset("mobilenet_v1_025"), weights_dir, allow_download=False)
    assert path.endswith("mobilenet_2_5_224_tf_no_top.h5")


def test_missing_weights_error_names_file_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(get_preset("inception_v3"), str(tmp_path), allow_download=False)
    msg = str(err.value)
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert "--weights-dir" in msg and "CBIR_WEIGHTS_DIR" in msg


def test_cli_extract_without_weights_fails_before_any_work(tmp_path, monkeypatch, flowers, capsys):
    from pipelines.cli import main

    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("CBIR_OFFLINE", "1")
    assert main(["extract", "--input", str(flowers / "0"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in err and "--weights-dir" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # stopped before any work: not even a staging folder


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_its_declared_dimension(name):
    spec = ModelSpec(name, weights="random")
    backbone = Backbone(spec)
    assert backbone.dim == PRESETS[name].dim
    assert backbone.size == PRESETS[name].input_size


def test_pretrained_mobilenet_differs_from_random(mobilenet_spec):
    pixels = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3)).astype(np.uint8)
    trained = Backbone(mobilenet_spec).predict(pixels)
    random = Backbone(ModelSpec("mobilenet_v1_025", weights="random")).predict(pixels)
    assert trained.shape == (2, 256)
    assert not np.allclose(trained, random)
    assert mobilenet_spec.describe()["weights_sha256"] == (
        "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf"
    )
