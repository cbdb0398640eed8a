"""The adversarial report: eps 0 is the clean ranking, the budget holds on the saved pixels, JPEG is measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from inspection.adversarial_report import AdversarialConfig, run_report
from models.inside.adversarial import AttackOptions
from pipelines.cli import main
from plumbing import fsutil
from search.searcher import Searcher


def _read(uri):
    try:
        return fsutil.read_input(uri)
    except Exception:
        return None


@pytest.fixture(scope="module")
def report(flowers_index, weights_dir):
    searcher = Searcher(str(flowers_index[0]))
    embedder = searcher.open_embedder(weights_dir=weights_dir)
    cfg = AdversarialConfig(attacks=("pgd",), eps=(0, 3), sample=2, attack=AttackOptions(steps=2),
                            jpeg_qualities=(75,), pictures=1)
    return searcher, embedder, run_report(searcher, embedder, cfg, _read)


def test_eps_0_is_the_clean_ranking(report):
    searcher, embedder, out = report
    uris = [searcher.uris[int(g)] for g in out.sample_gids]
    vectors, ok, _ = embedder.embed_files(uris)  # the product's query path on the original files
    clean, _ = searcher.search_arrays(vectors, searcher.options(k=100, method="exact"))
    for goal in ("untargeted", "targeted"):
        assert np.array_equal(out.rankings[("pgd", goal, 0, "direct")], clean)
        assert np.array_equal(out.adversarial[("pgd", goal, 0)], out.clean_pixels)
    rows = {(r["goal"], r["eps"]): r for r in out.report["results"]}
    assert rows[("untargeted", 0)]["channels"]["direct"]["self_hit@1"] == 1.0


def test_budget_holds_on_the_saved_pixels_and_jpeg_is_measured(report):
    _, _, out = report
    for goal in ("untargeted", "targeted"):
        adv = out.adversarial[("pgd", goal, 3)]
        assert np.abs(adv.astype(np.int16) - out.clean_pixels.astype(np.int16)).max() == 3
    rows = {(r["goal"], r["eps"]): r for r in out.report["results"]}
    attacked = rows[("untargeted", 3)]
    assert attacked["max_abs_delta"] == 3 and set(attacked["channels"]) == {"direct", "jpeg75"}
    assert attacked["channels"]["direct"]["cosine_to_clean"] < 0.95
    targeted = rows[("targeted", 3)]["channels"]["direct"]
    baseline = rows[("targeted", 0)]["channels"]["direct"]
    assert targeted["cosine_to_target"] > baseline["cosine_to_target"]
    assert len(targeted["target_ranks"]) == 2 and "survival" in rows[("targeted", 3)]
    assert set(out.pictures) == {"pgd-untargeted-eps3", "pgd-targeted-eps3"}
    with pytest.raises(ValueError, match="--attack: choose from fgsm, pgd"):
        AdversarialConfig(attacks=("cw",))
    with pytest.raises(ValueError, match="--eps"):
        AdversarialConfig(eps=(1.5,))


def test_cli_adversarial(flowers_index, tmp_path):
    out = tmp_path / "adv"
    assert main(["adversarial", "--index", str(flowers_index[0]), "--attack", "fgsm", "--eps", "0,2",
                 "--sample", "2", "--target", "none", "--jpeg", "90", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["eps"] for r in report["results"]] == [0, 2] and report["target"] is None
    assert "| fgsm | untargeted | 2 | 2 |" in (out / "report.md").read_text()
    assert Image.open(out / "fgsm-untargeted-eps2.png").size[0] > 600
