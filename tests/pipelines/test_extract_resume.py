"""Extract that skips what it knows (listing metadata) and resumes where it stopped (committed chunks)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import extract
from pipelines import extract_reuse as reuse
from plumbing.lease import Lease, LeaseHeldError
from transforms.readers.tfrecord import encode_example, write_tfrecord

REPO = Path(__file__).resolve().parents[2]


def _corpus(root: Path, flowers: Path, per_class: dict[str, int]) -> list[Path]:
    made = []
    for label, n in per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for p in sorted((flowers / label).glob("*.jpg"))[:n]:
            shutil.copy2(p, root / label / p.name)
            made.append(root / label / p.name)
    return made


def _rows(out: Path) -> dict[str, np.ndarray]:
    """image_id -> feature of a published output (only the parts its manifest lists)."""
    manifest = extract.read_features_manifest(str(out))
    out_rows: dict[str, np.ndarray] = {}
    for part in manifest.parts("features"):
        t = pq.read_table(out / part.path)
        feats = np.asarray(t.column("feature").to_pylist(), np.float32)
        out_rows.update(zip(t.column("image_id").to_pylist(), feats, strict=True))
    return out_rows


def _cfg(corpus: Path, out: Path, spec, **kw) -> extract.ExtractConfig:
    return extract.ExtractConfig(input=str(corpus), output=str(out), model=spec, **kw)


@pytest.fixture(scope="module")
def night(tmp_path_factory, flowers, mobilenet_spec):
    """A corpus of 24 photos and its first extract (which records the listing metadata)."""
    root = tmp_path_factory.mktemp("night")
    corpus = root / "corpus"
    _corpus(corpus, flowers, {"1": 12, "2": 12})
    first = extract.run(_cfg(corpus, root / "first", mobilenet_spec))
    return corpus, root / "first", first


def test_an_unchanged_input_is_carried_without_reading_it(night, tmp_path, mobilenet_spec):
    corpus, first_out, first = night
    assert first.parts(reuse.INPUTS) and first.metrics.get("reused_by_metadata") == 0
    work = tmp_path / "corpus"
    shutil.copytree(corpus, work, copy_function=shutil.copy2)  # same sizes and times
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    # swap one photo's bytes for another photo of the same size, keeping its time: only a read could notice
    victim = sorted((work / "1").iterdir())[0]
    stamp = victim.stat()
    other = sorted((work / "2").iterdir())[0].read_bytes()
    victim.write_bytes((other + b"\0" * stamp.st_size)[:stamp.st_size])
    os.utime(victim, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    (work / "2" / sorted(os.listdir(work / "2"))[-1]).unlink()  # and one removed

    m = extract.run(_cfg(work, out, mobilenet_spec, previous=str(out)))
    assert m.metrics["reused_by_metadata"] == 23 and m.metrics.get("read", 0) == 0  # nothing was read at all
    assert (m.counts.inputs, m.counts.ok, m.counts.failed) == (23, 23, 0)
    before, after = _rows(first_out), _rows(out)
    image_id = f"1/{victim.name}"
    np.testing.assert_array_equal(after[image_id], before[image_id])  # the old row: the bytes were never read

    checked = extract.run(_cfg(work, tmp_path / "verified", mobilenet_spec, previous=str(out), verify_digests=True))
    assert checked.metrics.get("reused_by_metadata") == 0 and checked.metrics["read"] == 23
    assert checked.metrics["to_extract"] == 1 and checked.metrics["reused"] == 22  # the swapped photo is caught
    assert not np.allclose(_rows(tmp_path / "verified")[image_id], before[image_id])


def test_a_changed_file_is_read_and_a_failure_worth_retrying_is_read_again(night, tmp_path, mobilenet_spec, flowers):
    corpus, first_out, _ = night
    work = tmp_path / "corpus"
    shutil.copytree(corpus, work, copy_function=shutil.copy2)
    (work / "3").mkdir()
    (work / "3" / "broken.jpg").write_bytes(b"not an image")  # decode failure: deterministic, carried next time
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    m1 = extract.run(_cfg(work, out, mobilenet_spec, previous=str(out)))
    assert (m1.metrics["reused_by_metadata"], m1.metrics["read"], m1.counts.failed) == (24, 1, 1)
    touched = sorted((work / "1").iterdir())[1]
    os.utime(touched, (time.time(), time.time() + 5))  # touched: read again, its digest is known
    m2 = extract.run(_cfg(work, out, mobilenet_spec, previous=str(out)))
    assert (m2.metrics["reused_by_metadata"], m2.metrics["read"], m2.metrics["reused"]) == (24, 1, 1)
    assert (m2.counts.inputs, m2.counts.ok, m2.counts.failed) == (25, 24, 1)


def test_shards_are_carried_whole(tmp_path, flowers, mobilenet_spec):
    photos = sorted((flowers / "5").glob("*.jpg"))[:12]
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        with open(shards / f"data-{s}.tfrecord", "wb") as f:
            for p in photos[s * 4:(s + 1) * 4]:
                write_tfrecord(f, encode_example(p.read_bytes(), f"5/{p.name}", "5"))
    out = tmp_path / "out"
    spec = f"tfrecord:{shards}/*.tfrecord"
    first = extract.run(_cfg(spec, out, mobilenet_spec))
    assert first.counts.ok == 12
    with open(shards / "data-2.tfrecord", "ab") as f:  # a shard that grew: read whole again
        write_tfrecord(f, encode_example(photos[0].read_bytes(), "5/again.jpg", "5"))
    m = extract.run(_cfg(spec, out, mobilenet_spec, previous=str(out)))
    assert m.metrics["reused_by_metadata"] == 2 and m.metrics["reused_by_metadata_rows"] == 8
    assert m.metrics["read"] == 5 and (m.counts.inputs, m.counts.ok) == (13, 13)
    assert m.accounting.source == "tallies" and m.accounting.units == 3


def test_two_runs_into_one_output_are_refused(night, tmp_path, mobilenet_spec):
    corpus, _, _ = night
    out = tmp_path / "out"
    with Lease(str(out), "other-run", 3600, what="extract"):
        with pytest.raises(LeaseHeldError, match="another extract"):
            extract.run(_cfg(corpus, out, mobilenet_spec))
    assert not (out / "MANIFEST.json").exists()


def _cli(corpus: Path, out: Path, weights: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "extract", "--input", str(corpus), "--output", str(out),
            "--model", "mobilenet_v1_025", "--weights-dir", weights, "--runtime", "keras", *extra]


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_committed_chunks(night, tmp_path, mobilenet_spec, weights_dir):
    corpus, first_out, _ = night
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli(corpus, out, weights_dir, "--commit-every", "6"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("_resume/chunks/*/DONE.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the launcher and its workers, mid-run
    proc.wait()
    committed = len(list(out.glob("_resume/chunks/*/DONE.json")))
    assert 1 <= committed < 4 and not (out / "MANIFEST.json").exists()

    m = extract.run(_cfg(corpus, out, mobilenet_spec, commit_every=6))  # the same command again
    assert m.metrics["carried_from_resume"] == 6 * committed and m.metrics["read"] == 24 - 6 * committed
    assert (m.counts.inputs, m.counts.ok, m.counts.failed) == (24, 24, 0)
    assert not (out / reuse.RESUME).exists() and not (out / "_LEASE.json").exists()
    resumed, whole = _rows(out), _rows(first_out)
    assert resumed.keys() == whole.keys()
    for image_id, vec in whole.items():  # the killed chunks ran on Keras, the rest on the graph runtime
        np.testing.assert_allclose(resumed[image_id], vec, rtol=1e-4, atol=1e-5)


def test_chunks_made_with_other_settings_are_not_resumed(night, tmp_path, mobilenet_spec):
    corpus, _, _ = night
    out = tmp_path / "out"
    (out / reuse.RESUME).mkdir(parents=True)
    (out / reuse.RESUME / "CONFIG.json").write_text('{"key": "someone-else"}')
    m = extract.run(_cfg(corpus, out, mobilenet_spec, commit_every=10))
    assert m.metrics["read"] == 24 and m.metrics.get("carried_from_resume") is None
    assert not (out / reuse.RESUME).exists()


@pytest.mark.parametrize("where", ["second chunk", "publish", "after the commit"])
def test_a_failure_anywhere_resumes_to_the_same_rows(where, night, tmp_path, monkeypatch, mobilenet_spec):
    """A run that dies in its second chunk, while publishing, or just after its commit: the same command
    again gives the rows of an uninterrupted run, reading only what no committed chunk holds."""
    corpus, first_out, _ = night
    out = tmp_path / "out"
    real_chunk, real_commit, real_delete = extract._run_chunk, extract.publish.commit, extract.fsutil.delete_tree
    calls = []

    def chunk(*args, **kw):
        calls.append(1)
        if where == "second chunk" and len(calls) == 2:
            raise MemoryError("the worker ran out of memory")
        return real_chunk(*args, **kw)

    def commit(*args, **kw):
        if where == "publish":
            raise OSError("the disk went away")
        return real_commit(*args, **kw)

    def delete_tree(root):
        if where == "after the commit" and root.endswith(reuse.RESUME):
            raise KeyboardInterrupt  # killed between the commit and its clean-up
        return real_delete(root)

    monkeypatch.setattr(extract, "_run_chunk", chunk)
    monkeypatch.setattr(extract.publish, "commit", commit)
    monkeypatch.setattr(extract.fsutil, "delete_tree", delete_tree)
    with pytest.raises((MemoryError, OSError, KeyboardInterrupt)):
        extract.run(_cfg(corpus, out, mobilenet_spec, commit_every=10))
    monkeypatch.undo()

    m = extract.run(_cfg(corpus, out, mobilenet_spec, commit_every=10))
    # publish fails before its moves: every chunk is still committed; after the commit they were moved into place
    expected_read = {"second chunk": 14, "publish": 0, "after the commit": 24}[where]
    assert m.metrics["read"] == expected_read and (m.counts.inputs, m.counts.ok) == (24, 24)
    assert not (out / reuse.RESUME).exists() and not (out / "_staging").exists()
    resumed, whole = _rows(out), _rows(first_out)
    assert resumed.keys() == whole.keys()
    for image_id, vec in whole.items():
        np.testing.assert_allclose(resumed[image_id], vec, rtol=1e-4, atol=1e-5)
