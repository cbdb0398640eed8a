"""DeepDream: the output keeps the input's size, differs from it, and stays finite."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import skimage
from PIL import Image

from models.backbone.network import Backbone
from models.inside.dream import Dreamer, DreamOptions, decode_photo, octave_shapes
from models.inside.layers import LayerModel
from pipelines.cli import main


@pytest.fixture(scope="module")
def model(mobilenet_spec):
    return LayerModel(Backbone(mobilenet_spec), "conv_pw_6_relu", flexible=True)


def _photo(size: tuple[int, int]) -> np.ndarray:
    im = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", "coffee.png")).convert("RGB")
    return np.asarray(im.resize(size, Image.Resampling.BILINEAR))


def test_dream_keeps_size_changes_the_image_and_stays_finite(model):
    image = _photo((150, 101))  # odd sizes: tiles and octaves do not divide them
    opts = DreamOptions(octaves=2, steps=4, step=3.0, tile=64, max_side=0)
    result = Dreamer(model, opts).dream(image)
    assert result.image.shape == image.shape and result.image.dtype == np.uint8
    change = np.abs(result.image.astype(np.float32) - image).mean()
    assert change > 1.0
    assert result.octave_sizes == [(72, 107), (101, 150)]
    assert np.isfinite(np.asarray(result.losses)).all()

    def activation(x):
        return float(np.mean(model(x[None].astype(np.float32))))

    assert activation(result.image) > activation(image) + 0.03  # what the layer sees was amplified


def test_a_dream_run_smaller_is_saved_at_the_input_size(model):
    image = _photo((200, 130))
    result = Dreamer(model, DreamOptions(octaves=1, steps=2, tile=256, max_side=96)).dream(image)
    assert result.image.shape == image.shape
    assert result.octave_sizes == [(62, 96)]
    assert octave_shapes(100, 100, DreamOptions(octaves=6, min_side=64)) == [(71, 71), (100, 100)]
    with pytest.raises(ValueError, match="too small"):
        Dreamer(model, DreamOptions()).dream(np.zeros((20, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="octave scale > 1"):
        DreamOptions(octave_scale=1.0)


def test_cli_dream_and_orientation(weights_dir, tmp_path):
    src = tmp_path / "rotated.jpg"
    im = Image.fromarray(_photo((120, 80)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: the output must be 80 wide, 120 tall
    im.save(src, exif=exif.tobytes())
    assert decode_photo(src.read_bytes()).shape == (120, 80, 3)
    out = tmp_path / "dream.png"
    assert main(["dream", "--model", "mobilenet_v1_025", "--layer", "conv_pw_5_relu", "--octaves", "2",
                 "--steps", "2", "--tile", "64", str(src), "--output", str(out)]) == 0
    assert Image.open(io.BytesIO(out.read_bytes())).size == (80, 120)
    assert (tmp_path / "dream.json").exists()
