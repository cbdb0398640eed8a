"""cbir index --gate: a version that fails its conditions is built but never becomes LATEST."""

from __future__ import annotations

import json

import pytest

from artefacts import layout
from evaluation import gate
from pipelines import cli
from pipelines.index import GATE_SUFFIX


def _argv(features, out, *extra):
    return ["index", "--features", str(features), "--output", str(out), "--dims", "16", "--trees", "5",
            "--index-types", "hnsw", *extra]


def test_conditions_parse_and_refuse_nonsense():
    cs = gate.parse_conditions("map>=0.5, recall@10>0.9,p@1<=1")
    assert [str(c) for c in cs] == ["map>=0.5", "recall@10>0.9", "p@1<=1"]
    assert cs[0].holds(0.5) and not cs[0].holds(0.49) and not cs[0].holds(None)
    for bad in ("", "map=0.5", "map>=high", "0.5<=map"):
        with pytest.raises(ValueError, match="gate"):
            gate.parse_conditions(bad)


def test_a_failing_gate_leaves_latest_untouched_and_says_which_condition(flowers_features, tmp_path, capsys):
    features = flowers_features[0]
    out = tmp_path / "index"
    assert cli.main(_argv(features, out, "--gate", "map>=0.2,recall@10>=0.8", "--gate-sample", "200")) == 0
    first = json.loads((out / layout.POINTER).read_text())["version"]
    report = json.loads((out / (first + GATE_SUFFIX)).read_text())
    assert report["passed"] and {r["condition"] for r in report["conditions"]} == {"map>=0.2", "recall@10>=0.8"}
    assert "gate passed" in capsys.readouterr().out

    code = cli.main(_argv(features, out, "--gate", "map>=0.99,recall@10>=0.8", "--gate-sample", "200"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_GATE
    assert "map>=0.99 (measured 0." in err and "recall@10" not in err.split("failed for")[1].split(".")[0]
    assert json.loads((out / layout.POINTER).read_text())["version"] == first  # LATEST untouched
    versions = sorted(p.name for p in out.iterdir() if layout.is_version(p.name))
    second = [v for v in versions if v != first]
    assert len(second) == 1 and (out / second[0] / layout.MANIFEST).exists()  # built, not published
    failed = json.loads((out / (second[0] + GATE_SUFFIX)).read_text())
    assert not failed["passed"] and [r["passed"] for r in failed["conditions"]] == [False, True]


def test_expected_results_and_uncomputable_metrics(flowers_features, flowers_index, tmp_path, capsys):
    from search.searcher import Searcher

    with Searcher(str(flowers_index[0])) as s:
        q = s.image_ids[0]
        top = [h for h in s.search(s.vector(0, 0), k=5, method="exact", exclude=0)]
        expected = [s.describe(h, 0)["image_id"] for h in top[:2]]
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"image_id": q, "expected": expected}) + "\n"
                       + json.dumps({"image_id": "no/such.jpg", "expected": ["x"]}) + "\n")
    with Searcher(str(flowers_index[0])) as s:
        measured = gate.measure(s, gate.parse_conditions("expected@10>=0.5,queries_found>=0.5"),
                                queries=gate.read_gate_queries(queries.read_bytes()))
        assert measured["queries_found"] == 0.5 and measured["expected@10"] >= 0.5
        ok, rows = gate.check(gate.parse_conditions("expected@10>=0.5"), gate.measure(
            s, gate.parse_conditions("expected@10>=0.5")))  # no query file: not computable, so it fails
        assert not ok and "not computable" in rows[0]["why"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"image_id\": 1}\n")
    code = cli.main(_argv(flowers_features[0], tmp_path / "never", "--gate", "expected@10>=0.5",
                          "--gate-queries", str(bad)))
    assert code == cli.EXIT_USAGE and "line 1" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # refused before any work
