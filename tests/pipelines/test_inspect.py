"""Looking inside: projector export and first-layer filter grids."""

from __future__ import annotations

import numpy as np
from PIL import Image

from models.backbone.network import Backbone, ModelSpec
from models.inside.filters import filter_grid, first_conv_kernels
from pipelines.cli import main


def test_projector_export_matches_the_index(flowers_index, tmp_path):
    out = tmp_path / "projector"
    assert main(["projector", "--index", str(flowers_index[0]), "--output", str(out), "--limit", "50"]) == 0
    vectors = np.loadtxt(out / "vectors.tsv", delimiter="\t")
    assert vectors.shape == (50, flowers_index[1].dimension.output)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    lines = (out / "metadata.tsv").read_text().splitlines()
    assert lines[0] == "image_id\tlabel\turi" and len(lines) == 51
    sprite = Image.open(out / "sprite.png")
    assert sprite.size == (8 * 48, 8 * 48)
    assert 'image_path: "sprite.png"' in (out / "projector_config.pbtxt").read_text()


def test_filter_grid_shows_trained_kernels(mobilenet_spec, tmp_path):
    name, kernels = first_conv_kernels(Backbone(mobilenet_spec).keras_model)
    assert kernels.shape == (3, 3, 3, 8)
    grid = filter_grid(kernels, tile=16, pad=2)
    assert grid.size == (3 * 18 + 2, 3 * 18 + 2)
    _, random = first_conv_kernels(Backbone(ModelSpec("mobilenet_v1_025", weights="random")).keras_model)
    assert not np.allclose(kernels, random)
    out = tmp_path / "f.png"
    assert main(["filters", "--model", "mobilenet_v1_025", "--output", str(out)]) == 0
    assert Image.open(out).size[0] > 0
