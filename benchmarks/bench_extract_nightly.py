"""A night's extract at ≥ 100k real JPEGs: what listing metadata saves, and what a kill costs.

In one run, on a corpus of distinct small JPEGs cut from the dev photos (``benchmarks/scale_corpus.py``):

1. the fixed start-up: ``cbir extract`` of one photo (process, imports, model, one pipeline);
2. the first extract of the corpus (in chunks of ``--commit-every``);
3. the same extract killed (``kill -9`` of its process group) at about half the first run's time,
   then the same command again, which resumes from the committed chunks; its rows against the
   first run's (same ids, same digests, largest feature difference);
4. a night of 1 % churn on the corpus (0.5 % new photos, 0.25 % re-encoded, 0.25 % removed), then
   ``cbir extract --previous`` into the first run's output, in place, as ``cbir reindex`` runs it;
   the counts it reports (carried unread, read, reused by digest, extracted) against the churn.

Every job is a ``cbir`` process on the local runner, as a user runs it.

    .venv/bin/python -m benchmarks.bench_extract_nightly                    # 103,200 photos, RESULTS.md
    .venv/bin/python -m benchmarks.bench_extract_nightly --images 5000 --print-only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks._proc import REPO, run_cbir
from benchmarks._results import machine, md_table, update_section
from benchmarks.scale_corpus import make_corpus

MODEL = ["--model", "mobilenet_v1_025"]


def _extract(name: str, corpus: Path, out: Path, logs: Path, *extra: str) -> dict[str, Any]:
    r = run_cbir(name, ["extract", "--input", str(corpus), "--output", str(out), *MODEL, *extra], logs)
    if r["code"]:
        raise SystemExit(f"{name} failed: {r['tail']}")
    r["manifest"] = json.loads((out / "MANIFEST.json").read_text())
    return r


def _killed(corpus: Path, out: Path, logs: Path, after: float) -> dict[str, Any]:
    """The first extract again, killed with -9 (launcher and workers) ``after`` seconds in."""
    command = [sys.executable, "-m", "pipelines.cli", "extract", "--input", str(corpus), "--output", str(out), *MODEL]
    with (logs / "extract-killed.log").open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    chunks = list(out.glob("_resume/chunks/*/DONE.json"))
    committed = sum(json.loads(p.read_text())["inputs"] for p in chunks)
    print(f"  extract-killed: killed at {after:.0f}s, {len(chunks)} chunks ({committed:,} inputs) committed",
          flush=True)
    return {"after": after, "chunks": len(chunks), "committed": committed}


def _rows(out: Path) -> dict[str, tuple[str, np.ndarray]]:
    manifest = json.loads((out / "MANIFEST.json").read_text())
    rows: dict[str, tuple[str, np.ndarray]] = {}
    for part in manifest["files"]["features"]:
        t = pq.read_table(out / part["path"], columns=["image_id", "sha256", "feature"])
        dim = t.schema.field("feature").type.list_size
        feats = t.column("feature").combine_chunks().values.to_numpy().reshape(-1, dim)
        rows.update(zip(t.column("image_id").to_pylist(), zip(t.column("sha256").to_pylist(), feats, strict=True),
                        strict=True))
    return rows


def _compare(a: Path, b: Path) -> dict[str, Any]:
    ra, rb = _rows(a), _rows(b)
    same_ids = ra.keys() == rb.keys()
    same_sha = same_ids and all(ra[i][0] == rb[i][0] for i in ra)
    diff = max((float(np.abs(ra[i][1] - rb[i][1]).max()) for i in ra if i in rb), default=float("nan"))
    return {"rows": len(rb), "same_ids": same_ids, "same_sha256": same_sha, "max_abs_diff": diff}


def _churn(corpus: Path, extra: Path, rng: random.Random, share: float) -> dict[str, int]:
    """0.5·share new photos (moved in from ``extra``), 0.25·share re-encoded, 0.25·share removed."""
    files = sorted(p for p in corpus.rglob("*.jpg"))
    n = len(files)
    new, changed, removed = int(n * share / 2), int(n * share / 4), int(n * share / 4)
    picks = rng.sample(files, changed + removed)
    from PIL import Image

    for p in picks[:changed]:  # new bytes under the same name (another quality), a new mtime
        with Image.open(p) as im:
            im.load()
            im.save(p, "JPEG", quality=60)
    for p in picks[changed:]:
        p.unlink()
    fresh = sorted(extra.rglob("*.jpg"))[:new]
    for i, p in enumerate(fresh):
        dest = corpus / "new" / f"{i:06d}-{p.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, dest)
    return {"new": len(fresh), "changed": changed, "removed": removed, "before": n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=103_200)
    parser.add_argument("--corpus", default=None, help="a corpus made by benchmarks.scale_corpus (copied: the "
                                                       "night changes it)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument("--print-only", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-extract-nightly-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    if args.corpus:
        shutil.rmtree(corpus, ignore_errors=True)
        subprocess.run(["cp", "-a", args.corpus, str(corpus)], check=True)
    else:
        make_corpus(str(corpus), args.images)
    extra = work / "extra"
    make_corpus(str(extra), int(args.images * args.churn / 2) + 200, seed=7)
    images = sum(1 for _ in corpus.rglob("*.jpg"))
    print(f"setup: {machine()}\n       {images:,} JPEGs, churn {args.churn:.1%}, model mobilenet_v1_025, "
          f"default --commit-every", flush=True)
    one = work / "one"
    one.mkdir(exist_ok=True)
    shutil.copy(next(corpus.rglob("*.jpg")), one / "one.jpg")
    r: dict[str, Any] = {"images": images}
    r["startup"] = _extract("extract-one", one, work / "out-one", logs)
    r["first"] = _extract("extract-first", corpus, work / "out-first", logs)
    r["killed"] = _killed(corpus, work / "out-resume", logs, r["first"]["wall"] / 2)
    r["resumed"] = _extract("extract-resumed", corpus, work / "out-resume", logs)
    r["resumed_vs_first"] = _compare(work / "out-first", work / "out-resume")
    r["churn"] = _churn(corpus, extra, random.Random(3), args.churn)
    r["night"] = _extract("extract-night", corpus, work / "out-first", logs, "--previous", str(work / "out-first"))
    text = _report(r, args)
    print(text)
    if not args.print_only:
        update_section("bench_extract_nightly", text)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(r: dict[str, Any], args) -> str:
    first, night, resumed, start = r["first"], r["night"], r["resumed"], r["startup"]["wall"]
    m = night["manifest"]["metrics"]
    c = r["churn"]
    beyond = (night["wall"] - start) / (first["wall"] - start)
    rows = [
        ["start-up (extract of one photo)", f"{start:.1f}", "-", "-"],
        ["first extract", f"{first['wall']:.1f}", "1", f"{first['manifest']['counts']['ok']:,} ok, "
                                                       f"{first['manifest']['counts']['failed']} failed"],
        [f"killed at {r['killed']['after']:.0f} s, resumed", f"{resumed['wall']:.1f}",
         f"{resumed['wall'] / first['wall']:.3f}",
         f"{r['killed']['committed']:,} inputs committed before the kill; "
         f"{resumed['manifest']['metrics'].get('carried_from_resume', 0):,} carried, "
         f"{resumed['manifest']['metrics'].get('read', 0):,} read"],
        [f"night ({args.churn:.1%} churn), --previous", f"{night['wall']:.1f}",
         f"{night['wall'] / first['wall']:.3f} ({beyond:.3f} beyond start-up)",
         f"{m.get('reused_by_metadata', 0):,} carried unread, {m.get('read', 0):,} read: "
         f"{m.get('reused', 0):,} by digest, {m.get('to_extract', 0):,} extracted"],
    ]
    cmp = r["resumed_vs_first"]
    counts = night["manifest"]["counts"]
    return "\n".join([
        "## Extract at night: listing metadata and resume",
        "",
        "`.venv/bin/python -m benchmarks.bench_extract_nightly" + (
            f" --images {args.images}" if args.images != 103_200 else "") + "`",
        "",
        f"Setup: {machine()}; {r['images']:,} distinct JPEGs cut from the dev photos (long side 64–128 px), "
        f"MobileNet v1 0.25, every job a `cbir extract` process on the local runner, default `--commit-every` "
        f"(5,000).",
        "",
        md_table(["run", "wall s", "× first", "counts"], rows),
        "",
        f"The night: {c['new']:,} new, {c['changed']:,} re-encoded in place, {c['removed']:,} removed of "
        f"{c['before']:,}; its output holds {counts['inputs']:,} inputs = {counts['ok']:,} ok + "
        f"{counts['failed']} failed. The resumed run against the uninterrupted one: {cmp['rows']:,} rows, same "
        f"image ids {cmp['same_ids']}, same sha256 {cmp['same_sha256']}, largest feature difference "
        f"{cmp['max_abs_diff']:.2e}.",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
