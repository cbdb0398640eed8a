"""Filter visualisation by gradient ascent: the chosen filter's activation rises; dead filters are skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from models.backbone.network import Backbone
from models.inside.ascent import AscentOptions, ascend_filters, ascent_grid
from models.inside.layers import LayerModel
from pipelines.cli import main

LAYER = "conv_pw_6_relu"
SMALL = AscentOptions(size=64, steps=12, batch=4)


@pytest.fixture(scope="module")
def model(mobilenet_spec):
    return LayerModel(Backbone(mobilenet_spec), LAYER, flexible=True, pre_activation=True)


def test_ascent_raises_the_chosen_filters_activation(model):
    result = ascend_filters(model, [3, 7, 40, 50], opts=SMALL)
    assert result.channels == [3, 7, 40, 50] and result.skipped == []
    h = result.history
    assert h.shape == (4, SMALL.steps + 1)
    assert (h[:, -1] > h[:, 0] + 0.5).all(), h[:, [0, -1]]
    # rises across the steps, not only at the end: each third beats the one before
    thirds = [h[:, i * 4:(i + 1) * 4].mean(axis=1) for i in range(3)]
    assert (thirds[1] > thirds[0]).all() and (thirds[2] > thirds[1] - 0.05).all()
    assert result.images.dtype == np.uint8 and result.images.shape[1:] == (64 - 2 * SMALL.jitter,) * 2 + (3,)
    grid = ascent_grid(result, LAYER, tile=48)
    assert grid.size[0] > 3 * 48
    with pytest.raises(ValueError, match=r"channels 0\.\.127, not \[128\]"):
        ascend_filters(model, [2, 128], opts=SMALL)


def test_dead_filters_are_skipped_and_the_next_channel_takes_their_place(model):
    bn = model.keras_model.get_layer("conv_pw_6_bn")
    saved = bn.get_weights()
    gamma, beta, mean, var = saved
    beta = beta.copy()
    beta[1] = -1e4  # channel 1 can never open its ReLU: it is dead
    bn.set_weights([gamma, beta, mean, var])
    try:
        # the same options as above: the graph traced there is reused, and sees the new weights
        result = ascend_filters(model, None, count=3, opts=SMALL)
    finally:
        bn.set_weights(saved)  # the module's model is shared
    assert result.skipped == [1]
    assert result.channels == [0, 2, 3]
    assert (result.history.max(axis=1) > 0).all()


def test_cli_writes_the_grid_and_its_figures(weights_dir, tmp_path):
    out = tmp_path / "ascent.png"
    assert main(["filters", "--model", "mobilenet_v1_025", "--mode", "ascent", "--layer", "conv_pw_5_relu",
                 "--channels", "3,9", "--size", "64", "--steps", "2", "--output", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    figures = json.loads((tmp_path / "ascent.json").read_text())
    assert figures["layer"] == "conv_pw_5_relu" and figures["channels"] == [3, 9]
    assert len(figures["history"][0]) == 3
