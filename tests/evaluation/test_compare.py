"""``cbir compare``: a version against itself overlaps fully; two different builds differ in ways that make sense."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _service_fixtures import DROPPED_LABEL, two_versions
from PIL import Image

from evaluation.compare import CompareConfig, format_markdown
from pipelines import cli
from pipelines.compare import locate, run
from search.options import SearchOptions


@pytest.fixture(scope="module")
def built(tmp_path_factory, flowers_features, flowers_index):
    return two_versions(tmp_path_factory, flowers_features, flowers_index)


@pytest.fixture(scope="module")
def full_vs_subset(built, tmp_path_factory):
    plot = tmp_path_factory.mktemp("compare") / "overlap.png"
    cfg = CompareConfig(search=SearchOptions(k=10, method="annoy"), sample=0)
    return run(built["full"], built["subset"], str(built["index"]), cfg, plot=str(plot)), plot


def test_a_version_against_itself_overlaps_fully(built):
    cfg = CompareConfig(search=SearchOptions(k=10, method="annoy"), sample=200, seed=3)
    report = run(built["full"], built["full"], str(built["index"]), cfg)
    assert report["queries"] == 200 and report["sampled"]
    for key in ("overlap", "exact_overlap"):
        assert report[key]["mean"] == 1.0 and report[key]["full"] == 1.0 and report[key]["histogram"][-1] == 200
    assert report["items"]["added"] == report["items"]["removed"] == 0
    assert not any(c["changed"] for c in report["changes"])
    recall = report["recall_vs_old_exact"]
    assert recall["reachable"] == 1.0 and recall["mean"] == pytest.approx(recall["new_own_recall"])
    assert 0.8 < recall["mean"] <= 1.0  # Annoy's own recall@10 against exact search
    labels = report["labels"]
    assert labels["old"] == labels["new"]
    assert "Nothing: same model, transform, layout and items." in format_markdown(report)


def test_two_different_builds_differ_and_the_figures_make_sense(built, full_vs_subset):
    report, plot = full_vs_subset
    items = report["items"]
    assert (items["old"], items["new"], items["common"], items["added"], items["removed"]) == (720, 640, 640, 0, 80)
    assert all(x.startswith(f"{DROPPED_LABEL}/") for x in items["removed_examples"])
    changed = {c["what"] for c in report["changes"] if c["changed"]}
    assert {"transform fingerprint", "dimension", "shards", "items", "vector space"} <= changed
    assert "model fingerprint" not in changed  # the same network and weights
    overlap, exact = report["overlap"], report["exact_overlap"]
    assert report["queries"] == 640
    assert 0.2 < exact["mean"] < 1.0 and exact["full"] < 1.0  # a new transform moves neighbours, not all of them
    assert sum(overlap["histogram"]) == sum(exact["histogram"]) == 640
    recall = report["recall_vs_old_exact"]
    assert recall["reachable"] < 1.0  # some of the old neighbours were removed (label 8)
    assert recall["mean"] <= recall["reachable"] + 1e-9
    old, new = report["labels"]["old"], report["labels"]["new"]
    assert 0.2 < old["map"] < 1 and 0.2 < new["map"] < 1 and old["map"] != new["map"]
    assert old["classes"] == 9 and new["classes"] == 8
    worst = report["lowest_overlap"][0]
    assert worst["overlap"] == overlap["min"]
    text = format_markdown(report)
    assert "80 removed" in text and "| shards | 2 | 1 |" in text and "Label metrics" in text
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] >= 600


def test_reversed_the_dropped_class_comes_back_as_added(built):
    cfg = CompareConfig(search=SearchOptions(k=5, method="exact"), sample=100)
    report = run(built["subset"], built["full"], str(built["index"]), cfg)
    assert report["items"]["added"] == 80 and report["items"]["removed"] == 0
    assert report["recall_vs_old_exact"]["reachable"] == 1.0
    served_is_exact = np.isclose(report["overlap"]["mean"], report["exact_overlap"]["mean"])
    assert served_is_exact  # with exact search the served lists are the exact lists


def test_version_names_folders_and_the_command_line(built, tmp_path, capsys):
    index = str(built["index"])
    assert locate("LATEST", index) == (index, built["subset"])
    assert locate("PREVIOUS", index) == (index, built["full"])
    assert locate(index, None) == (index, built["subset"])
    assert locate(f"{index}/{built['full']}", None) == (index, built["full"])
    with pytest.raises(FileNotFoundError, match="neither an index folder"):
        locate(str(tmp_path), None)
    out = tmp_path / "report.json"
    code = cli.main(["compare", "--index", index, "PREVIOUS", "LATEST", "-k", "5", "--sample", "50", "--json",
                     "--output", str(out), "--method", "exact"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["old"]["version"] == built["full"] and printed["new"]["version"] == built["subset"]
    assert cli.main(["compare", "--index", index, built["full"], "v20990101T000000-aaaaaa"]) == 2
    assert "does not exist" in capsys.readouterr().err
