"""``cbir reindex``: a night of real jobs on real photos, resumed after a failure in each step.

A first night (full index build) is run once into a template root over 24 flowers photos; each
test works on its own copy of the root and the photos. The failures are real where the product
can fail for real (a broken image over --max-failure-fraction, a gate the version cannot meet, a
lease another run holds); the neighbours step is made to fail once by making its publish raise,
as a full disk would. After each, the same command resumes at the failed step: the steps before it
are not run again (their outputs' run ids and versions unchanged) and the night completes.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.reindex import night as nights
from plumbing.lease import Lease

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "docs" / "examples" / "airflow_reindex_dag.py"
CLASSES, PER_CLASS = ("0", "1", "2"), 8


def _argv(corpus: Path, root: Path, *extra: str) -> list[str]:
    """--dims 0 keeps the features' dimension (L2 only), so a night of new photos never fails the fit check."""
    return ["reindex", "--input", str(corpus), "--root", str(root), "--model", "mobilenet_v1_025", "--runtime",
            "graph", "--dims", "0", "-k", "5", "--gate", "map>=0.1", *extra]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _state(root: Path) -> dict:
    return _json(root / nights.BOOKKEEPING / nights.STATE_FILE)


def _report(root: Path, night: str) -> dict:
    return _json(root / "reports" / f"{night}.json")


def _published(root: Path) -> dict[str, str | None]:
    """What each step's output publishes now: features run, LATEST, neighbour table run."""
    return {step: nights.published(nights.Paths(str(root)), step) for step in nights.STEPS}


@pytest.fixture(scope="module")
def first_night(tmp_path_factory, flowers, weights_dir):
    """(corpus, root, report): 24 photos of three classes, reindexed once (the index built in full)."""
    base = tmp_path_factory.mktemp("reindex")
    corpus, root = base / "corpus", base / "root"
    for label in CLASSES:
        (corpus / label).mkdir(parents=True)
        for photo in sorted((flowers / label).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy2(photo, corpus / label / photo.name)
    assert cli.main(_argv(corpus, root)) == 0
    return corpus, root, _report(root, _state(root)["night"])


@pytest.fixture
def night_two(first_night, tmp_path, flowers):
    """A copy of the first night's corpus and root, with 2 photos added, 1 replaced by another, 1 removed."""
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    shutil.copytree(first_night[0], corpus)
    shutil.copytree(first_night[1], root)
    for photo in sorted((flowers / "0").glob("*.jpg"))[PER_CLASS:PER_CLASS + 2]:
        shutil.copy2(photo, corpus / "0" / photo.name)
    replaced = sorted((corpus / "1").iterdir())[0]
    replaced.write_bytes(sorted((flowers / "1").glob("*.jpg"))[PER_CLASS].read_bytes())
    sorted((corpus / "2").iterdir())[0].unlink()
    return corpus, root


def test_the_first_night_builds_in_full_and_reports_it(first_night):
    _, root, report = first_night
    steps = report["steps"]
    assert report["status"] == "done" and report["failed_step"] is None and report["previous_version"] is None
    assert steps["extract"]["counts"] == {"inputs": 24, "read": 24, "ok": 24, "failed": 0}
    assert (steps["index"]["decision"], steps["index"]["reason"]) == ("full", "no version was published yet")
    assert steps["index"]["items"] == 24 and steps["index"]["gate"]["passed"]
    assert steps["neighbors"]["rows"] == 24 and steps["neighbors"]["decision"] == "full"
    assert all(steps[s]["seconds"] > 0 and steps[s]["attempts"] == 1 for s in nights.STEPS)
    assert report["compare"] is None and "first night" in report["compare_note"]
    md = (root / "reports" / f"{report['night']}.md").read_text()
    assert "| index | done |" in md and "Full: no version was published yet." in md and "map>=0.1" in md


def test_a_second_night_updates_in_place_and_counts_the_changes(night_two, first_night, capsys):
    corpus, root = night_two
    before = _published(root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a reindex that died on this host left its lease behind: it must not block the night
    lease = Lease(str(root / nights.BOOKKEEPING), "cbir reindex", 3600)
    lease.record["pid"] = dead.pid
    (root / nights.BOOKKEEPING / "_LEASE.json").write_text(json.dumps(lease.record))

    assert cli.main(_argv(corpus, root)) == 0
    state = _state(root)
    report = _report(root, state["night"])
    assert state["night"] != first_night[2]["night"] and state["status"] == "done"  # a new night
    steps = report["steps"]
    assert steps["extract"]["counts"] == {"inputs": 25, "read": 25, "ok": 25, "failed": 0}
    reuse = steps["extract"]["reuse"]
    assert reuse["to_extract"] == 3  # the two new photos and the replaced one
    assert reuse.get("reused", 0) + reuse.get("reused_by_metadata", 0) == 22
    index = steps["index"]
    assert index["decision"] == "incremental" and index["incremental"]["base"] == before["index"]
    assert index["changes"] == {"new": 2, "changed": 1, "removed": 1} and index["items"] == 25
    assert report["previous_version"] == before["index"] != index["version"] == _published(root)["index"]
    neighbors = steps["neighbors"]
    assert neighbors["decision"] == "incremental" and neighbors["index_version"] == index["version"]
    assert neighbors["rows"] == 25 == neighbors["rows_computed"] + neighbors["rows_copied"]
    assert neighbors["rows_copied"] > 0
    items = report["compare"]["items"]
    assert (items["old"], items["new"], items["added"], items["removed"]) == (24, 25, 2, 1)
    md = (root / "reports" / f"{state['night']}.md").read_text()
    assert "(2 new, 1 changed, 1 removed)" in md and "## cbir compare:" in md
    assert f"reindex: night {state['night']} done" in capsys.readouterr().out
    assert not (root / nights.BOOKKEEPING / "_LEASE.json").exists()  # given back


def test_extract_failing_is_resumed_there(night_two):
    corpus, root = night_two
    before = _published(root)
    (corpus / "2" / "broken.jpg").write_bytes(b"not a JPEG")
    assert cli.main(_argv(corpus, root, "--max-failure-fraction", "0")) == cli.EXIT_TOO_MANY_FAILURES
    state = _state(root)
    assert state["status"] == "failed" and state["steps"]["extract"]["status"] == "failed"
    assert state["steps"]["extract"]["error"] == "TooManyFailuresError"
    assert [state["steps"][s]["status"] for s in ("index", "neighbors")] == ["pending", "pending"]
    partial = _report(root, state["night"])
    assert partial["status"] == "failed" and partial["failed_step"] == "extract"
    assert partial["steps"]["extract"]["counts"]["failed"] == 1  # the run that failed its fraction, as published
    latest = _published(root)["index"]
    assert latest == before["index"]

    (corpus / "2" / "broken.jpg").unlink()
    assert cli.main(_argv(corpus, root, "--max-failure-fraction", "0")) == 0
    again = _state(root)
    assert again["night"] == state["night"] and again["status"] == "done"
    assert [again["steps"][s]["attempts"] for s in nights.STEPS] == [2, 1, 1]
    assert [r["from"] for r in again["runs"]] == ["extract", "extract"]
    assert _published(root)["index"] != latest


def test_a_failed_gate_stops_before_the_neighbours_and_is_resumed_at_the_index(night_two, capsys):
    corpus, root = night_two
    before = _published(root)
    assert cli.main(_argv(corpus, root, "--gate", "map>=0.999")) == cli.EXIT_GATE
    out = capsys.readouterr()
    state = _state(root)
    assert "stopped at index" in out.out and "map>=0.999" in out.err
    after_failure = _published(root)
    assert after_failure["index"] == before["index"]  # LATEST did not move
    assert after_failure["neighbors"] == before["neighbors"]  # the table was not refreshed
    assert state["steps"]["neighbors"]["status"] == "pending" and state["steps"]["neighbors"]["attempts"] == 0
    refused = state["steps"]["index"]["version"]
    report = _report(root, state["night"])
    gate = report["steps"]["index"]["gate"]
    assert report["failed_step"] == "index" and not gate["passed"] and gate["conditions"][0]["measured"] < 0.999
    assert report["steps"]["index"]["version"] == refused != before["index"]

    assert cli.main(_argv(corpus, root)) == 0  # the conditions fixed: the same night goes on at the index
    again = _state(root)
    done = _published(root)
    assert again["night"] == state["night"] and done["extract"] == after_failure["extract"]  # extract not re-run
    assert [again["steps"][s]["attempts"] for s in nights.STEPS] == [1, 2, 1]
    assert done["index"] not in (before["index"], refused) and done["neighbors"] != before["neighbors"]
    assert _report(root, again["night"])["steps"]["index"]["gate"]["passed"]


def test_the_neighbours_failing_is_resumed_there(night_two, monkeypatch):
    import pipelines.neighbors as job

    corpus, root = night_two
    before = _published(root)
    real_publish = job.publish

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "publish", disk_full)
    assert cli.main(_argv(corpus, root)) == cli.EXIT_UNEXPECTED
    failed = _published(root)
    state = _state(root)
    assert state["steps"]["neighbors"]["status"] == "failed" and "No space" in state["steps"]["neighbors"]["message"]
    assert failed["index"] != before["index"] and failed["neighbors"] == before["neighbors"]
    assert not list((root / "neighbors").glob("_staging/*"))  # the failed run's parts were discarded

    monkeypatch.setattr(job, "publish", real_publish)
    assert cli.main(_argv(corpus, root)) == 0
    again = _state(root)
    done = _published(root)
    assert again["night"] == state["night"] and [again["steps"][s]["attempts"] for s in nights.STEPS] == [1, 1, 2]
    assert (done["extract"], done["index"]) == (failed["extract"], failed["index"])  # not run again
    report = _report(root, again["night"])
    assert report["steps"]["neighbors"]["decision"] == "incremental" and report["steps"]["neighbors"]["rows"] == 25
    assert [r["from"] for r in report["runs"]] == ["extract", "neighbors"]


def test_a_second_reindex_into_one_root_is_refused(first_night, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(first_night[1], root)
    state = (root / nights.BOOKKEEPING / nights.STATE_FILE).read_bytes()
    with Lease(str(root / nights.BOOKKEEPING), "cbir reindex", 3600):  # this process is alive: the lease holds
        assert cli.main(_argv(first_night[0], root)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "another cbir reindex" in err and f"pid {os.getpid()}" in err
    assert (root / nights.BOOKKEEPING / nights.STATE_FILE).read_bytes() == state  # nothing touched


def test_a_failed_night_too_old_to_resume_gives_way_to_a_new_one(tmp_path):
    paths = nights.Paths(str(tmp_path))
    old = nights.Night("20260101T020000-aaaaaa", 1_000.0, "2026-01-01T02:00:00Z", None, status="failed")
    old.steps["extract"].update(status="done", output="run-1")
    old.steps["index"].update(status="failed")
    nights.save(paths, old)
    resumed, start = nights.begin(paths, resume_within=3600, now=1_000.0 + 60)
    assert (resumed.night, start) == (old.night, "extract")  # its features are not published any more
    fresh, start = nights.begin(paths, resume_within=3600, now=1_000.0 + 7200)
    assert fresh.night != old.night and fresh.abandoned == old.night and start == "extract"


def test_the_airflow_example_runs_a_command_cbir_accepts():
    """Without Airflow: the file parses and its command is one ``cbir reindex`` takes, option for option."""
    tree = ast.parse(DAG_FILE.read_text())
    assert "BashOperator" in DAG_FILE.read_text()
    command = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "COMMAND")
    words = shlex.split(ast.literal_eval(_with_placeholders(command)))
    assert words[:2] == ["cbir", "reindex"]
    parser = cli.build_parser(only="reindex")
    args, beam = parser.parse_known_args(words[1:])
    assert args.gate == "map>=0.50,recall@10>=0.95,expected@10>=0.9" and args.k == 20
    from pipelines.runner import check_beam_args

    assert check_beam_args(beam, args.subcommands["reindex"]) is None


def _with_placeholders(node: ast.expr) -> ast.expr:
    """The COMMAND expression with its f-string fields (paths) replaced by a fixed word."""
    class Fill(ast.NodeTransformer):
        def visit_FormattedValue(self, _node):
            return ast.Constant("gs://bucket/x")

        def visit_JoinedStr(self, node):
            return ast.Constant("".join(v.value for v in map(self.visit, node.values)))

    return ast.fix_missing_locations(Fill().visit(node))


def test_the_airflow_example_is_a_dag_airflow_loads(tmp_path, monkeypatch):
    """With Airflow installed (it is not in requirements.lock): the scheduler's own loader finds the DAG."""
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    pytest.importorskip("airflow", reason="Airflow is not installed in this environment")
    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3
        bag = DagBag(dag_folder=str(DAG_FILE.parent))
    except ImportError:
        from airflow.models.dagbag import DagBag  # Airflow 2
        bag = DagBag(dag_folder=str(DAG_FILE.parent), include_examples=False)
    assert bag.import_errors == {}
    task = bag.dags["cbir_reindex"].get_task("reindex")
    assert task.retries == 2 and task.bash_command.startswith("cbir reindex --input ")
