"""cbir top-patches: the crops really reach the recorded activation, the top N is the corpus's, counts add up."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from models.backbone.imaging import decode_and_resize
from models.backbone.network import Backbone
from models.inside.layers import LayerModel
from pipelines import top_patches
from pipelines.cli import main
from plumbing import fsutil
from transforms.top_patches import Candidate, TopN, peaks, receptive_field

LAYER = "conv_pw_6_relu"
CHANNELS = (5, 77)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, flowers):
    """Ten photos of two classes and one broken file (a failure row)."""
    root = tmp_path_factory.mktemp("patches_corpus")
    for label in ("1", "4"):
        (root / label).mkdir()
        for p in sorted((flowers / label).glob("*.jpg"))[:5]:
            shutil.copy(p, root / label / p.name)
    (root / "4" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def published(corpus, tmp_path_factory, mobilenet_spec):
    out = tmp_path_factory.mktemp("patches_out")
    cfg = top_patches.TopPatchesConfig(input=str(corpus), output=str(out), model=mobilenet_spec, layer=LAYER,
                                       channels=CHANNELS, n=3, batch_size=4, tile=48)
    return out, top_patches.run(cfg)


def test_receptive_field_of_mobilenet_layers(mobilenet_spec):
    model = Backbone(mobilenet_spec).keras_model
    assert receptive_field(model, "conv1_relu").describe() == {"size": [3, 3], "jump": [2, 2], "start": [0, 0]}
    field = receptive_field(model, LAYER)
    assert field.describe() == {"size": [59, 59], "jump": [16, 16], "start": [-14, -14]}
    assert field.box(0, 0) == (0, 0, 45, 45) and field.box(13, 13) == (194, 194, 224, 224)
    cfg = top_patches.TopPatchesConfig(input="unused", output="unused", model=mobilenet_spec, layer=LAYER,
                                       channels=(1, 128))
    with pytest.raises(ValueError, match=r"has channels 0\.\.127, not \[128\]"):
        top_patches.check_layer(cfg)


def test_topn_is_bounded_and_exact():
    rng = np.random.default_rng(0)
    items = [Candidate(float(v), f"img{i:03d}", "", None, 0, 0, (0, 0, 1, 1), np.zeros((1, 1, 3), np.uint8))
             for i, v in enumerate(rng.integers(0, 20, 200))]  # many ties
    fn = TopN(5)
    accs = []
    for part in np.array_split(np.arange(200), 7):
        acc = fn.create_accumulator()
        for i in part:
            acc = fn.add_input(acc, items[i])
            assert len(acc) <= 10
        accs.append(fn.compact(acc))
    best = fn.extract_output(fn.merge_accumulators(accs))
    assert [c.image_id for c in best] == [c.image_id for c in sorted(items, key=Candidate.sort_key)[:5]]


def test_crops_reach_the_recorded_activation_and_the_top_is_the_corpus_top(published, corpus, mobilenet_spec):
    out, manifest = published
    assert manifest.counts == {"inputs": 11, "scored": 10, "failed": 1}
    assert manifest.accounting.checked == {"inputs": 11, "read (counter)": 11, "rows written": 11}
    model = LayerModel(Backbone(mobilenet_spec), LAYER)
    field = receptive_field(model.keras_model, LAYER)
    photos = sorted(p for p in corpus.rglob("image_*.jpg"))
    pixels = np.stack([decode_and_resize(p.read_bytes(), 224).pixels for p in photos])
    values, _, _ = peaks(np.asarray(model(pixels.astype(np.float32))), list(CHANNELS))
    rng = np.random.default_rng(0)
    for j, channel in enumerate(CHANNELS):
        patches = manifest.patches[str(channel)]
        assert len(patches) == 3
        # the corpus's own top 3 for this channel, one per image, best first
        expected = sorted(zip(-values[:, j], [str(p.relative_to(corpus)) for p in photos], strict=True))[:3]
        assert [p["image_id"] for p in patches] == [e[1] for e in expected]
        np.testing.assert_allclose([p["value"] for p in patches], [-e[0] for e in expected], rtol=1e-4)
        for p in patches:
            x0, y0, x1, y1 = p["box"]
            assert (x0, y0, x1, y1) == field.box(*p["cell"])
            source = pixels[[str(q.relative_to(corpus)) for q in photos].index(p["image_id"])]
            canvas = rng.uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)  # everything else replaced
            canvas[0, y0:y1, x0:x1] = source[y0:y1, x0:x1]
            got = float(np.asarray(model(canvas))[0, p["cell"][0], p["cell"][1], channel])
            assert got == pytest.approx(p["value"], rel=1e-4, abs=1e-4)
        grid = Image.open(out / manifest.grids[str(channel)])
        assert grid.size[0] >= 3 * 48
    assert sorted(path.name for path in (out / "channels").iterdir()) == sorted(
        v.rsplit("/", 1)[-1] for v in manifest.grids.values())
    assert not (out / "_staging").exists()
    assert top_patches.read_manifest(str(out)).run_id == manifest.run_id
    table = fsutil.match(str(out / "activations" / "part-*.parquet"))
    assert len(table) == 1


def test_cli_refuses_an_unknown_layer_before_any_work(corpus, tmp_path, weights_dir, capsys):
    assert main(["top-patches", "--input", str(corpus), "--model", "mobilenet_v1_025", "--output",
                 str(tmp_path / "o"), "--layer", "conv_pw_66_relu", "--channels", "1"]) == 2
    err = capsys.readouterr().err
    assert "no feature-map layer 'conv_pw_66_relu'" in err and "conv_pw_13_relu" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
