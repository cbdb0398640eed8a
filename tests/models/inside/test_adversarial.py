"""FGSM / PGD: the L∞ budget holds exactly on the saved pixels; eps 0 is the identity; attacks move the embedding."""

from __future__ import annotations

import os

import numpy as np
import pytest
import skimage
from PIL import Image

from models.backbone.network import Backbone
from models.inside.adversarial import AttackOptions, attack, quantise
from models.inside.similarity import EmbeddingGraph


@pytest.fixture(scope="module")
def graph(mobilenet_spec):
    return EmbeddingGraph(Backbone(mobilenet_spec))


@pytest.fixture(scope="module")
def pixels():
    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    x = np.stack([np.asarray(Image.open(os.path.join(folder, name)).convert("RGB").resize((224, 224)))
                  for name in ("coffee.png", "chelsea.png")])
    x[:, :20] = 0  # saturated pixels: the budget must also respect [0, 255]
    x[:, 20:40] = 255
    return x


def test_quantise_rounds_then_clips_to_the_budget():
    x = np.array([[0, 10, 250, 128]], np.uint8)
    out = quantise(x, np.array([[-3.7, 12.6, 258.0, 129.49]], np.float32), 2)
    assert out.tolist() == [[0, 12, 252, 129]]


def test_budget_holds_exactly_on_saved_pixels(graph, pixels):
    for method in ("fgsm", "pgd"):
        adv = attack(graph, pixels, 2, method, opts=AttackOptions(steps=2))
        delta = np.abs(adv.astype(np.int16) - pixels.astype(np.int16))
        assert adv.dtype == np.uint8 and delta.max() == 2  # the whole budget used, never more
        assert np.array_equal(attack(graph, pixels, 0, method), pixels)


def test_attacks_move_the_embedding_the_way_they_are_asked(graph, pixels):
    clean = graph.embed_numpy(pixels)
    away = graph.embed_numpy(attack(graph, pixels[:1], 4, "pgd", anchors=clean[:1], opts=AttackOptions(steps=2)))
    assert float(away[0] @ clean[0]) < 0.9
    target = clean[1:]
    towards = graph.embed_numpy(attack(graph, pixels[:1], 4, "pgd", targets=target, opts=AttackOptions(steps=2)))
    assert float(towards[0] @ target[0]) > float(clean[0] @ target[0]) + 0.1
    with pytest.raises(ValueError, match="whole number"):
        attack(graph, pixels, 1.5, "pgd")
