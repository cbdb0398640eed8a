"""Nothing lost at scale: extract → index → neighbours over ≥ 100k distinct real images, counted.

Makes (or reuses) a corpus of small distinct JPEGs cut from the dev photos
(``benchmarks/scale_corpus.py``; never committed), then runs each stage as its own
``cbir`` process on the local default runner (``pipelines.runner.LocalRunner``), exactly as
a user would, and reports per stage: wall time, rate, peak resident memory (``wait4`` of that
process) and the counts its manifest recorded. It fails loudly (exit 1) when any count differs:
images made = extract inputs = ok + failed; ok = items indexed; items = neighbour rows.

``--old-default`` also runs extract the way the project's old default did
(``--direct_running_mode=multi_threading --direct_num_workers=2``), to show what its
accounting does with a runner that drops elements: it must refuse (exit 4) or count
right, never publish a short run.

    .venv/bin/python -m benchmarks.bench_scale                           # 103,200 images, writes RESULTS.md
    .venv/bin/python -m benchmarks.bench_scale --images 103200 --extract-runs 2 --old-default
    .venv/bin/python -m benchmarks.bench_scale --quick                   # 3,000 images, prints only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._proc import run_cbir
from benchmarks._results import machine, md_table, update_section
from benchmarks.scale_corpus import make_corpus


def _stage(name: str, argv: list[str], log_dir: Path) -> dict:
    return run_cbir(name, argv, log_dir)


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=103_200)
    parser.add_argument("--corpus", default=None, help="reuse a corpus folder made by benchmarks.scale_corpus")
    parser.add_argument("--work", default=None, help="folder for outputs (default: a temporary one, deleted)")
    parser.add_argument("--model", default="mobilenet_v1_025")
    parser.add_argument("--extract-runs", type=int, default=1, help="repeat extract to check the count holds")
    parser.add_argument("--old-default", action="store_true", help="also run extract in multi_threading x2")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="3,000 images, no RESULTS.md")
    args = parser.parse_args(argv)
    images = 3000 if args.quick else args.images
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else work / "corpus"
    t = time.perf_counter()
    if not args.corpus:
        made = make_corpus(str(corpus), images)
    else:
        made = sum(1 for p in corpus.rglob("*.jpg"))
    make_s = time.perf_counter() - t
    origin = f"made in {make_s:.0f}s" if not args.corpus else "made earlier by benchmarks.scale_corpus"
    print(f"setup: {machine()}\n       {made} distinct JPEGs under {corpus} ({origin}), model {args.model}, "
          "local default runner", flush=True)
    problems: list[str] = []
    rows: list[list] = []

    extract_runs = []
    for run in range(args.extract_runs):
        out = work / f"features-{run}"
        r = _stage(f"extract-{run}", ["extract", "--input", str(corpus), "--output", str(out), "--model", args.model],
                   logs)
        if r["code"] != 0:
            problems.append(f"extract run {run} exited {r['code']}: {r['tail']}")
            continue
        m = _manifest(out / "MANIFEST.json")
        c = m["counts"]
        if not (c["inputs"] == made == c["ok"] + c["failed"] == c["read"]):
            problems.append(f"extract run {run}: made {made}, counts {c}")
        extract_runs.append((out, m, r))
        rows.append([f"extract (run {run + 1})", f"{r['wall']:.0f}", f"{made / r['wall']:.0f} img/s",
                     f"{r['peak_mb']:.0f}", f"inputs {c['inputs']:,}, ok {c['ok']:,}, failed {c['failed']:,}"])
    if not extract_runs:
        print("\n".join(problems), file=sys.stderr)
        return 1
    features, fm, _ = extract_runs[0]

    index_dir = work / "index"
    r = _stage("index", ["index", "--features", str(features), "--output", str(index_dir), "--shards",
                         str(args.shards)], logs)
    if r["code"] != 0:
        problems.append(f"index exited {r['code']}: {r['tail']}")
    else:
        latest = json.loads((index_dir / "LATEST").read_text())["version"]
        im = _manifest(index_dir / latest / "MANIFEST.json")
        if im["items"] + im.get("duplicates_dropped", 0) != fm["counts"]["ok"]:
            problems.append(f"index holds {im['items']} items (+{im.get('duplicates_dropped', 0)} duplicates) for "
                            f"{fm['counts']['ok']} features")
        rows.append(["index", f"{r['wall']:.0f}", f"{im['items'] / r['wall']:.0f} items/s", f"{r['peak_mb']:.0f}",
                     f"items {im['items']:,} in {im['shards']} shards, {im['bytes'] / 1e6:.0f} MB"])
        nb = work / "neighbors"
        r = _stage("neighbors", ["neighbors", "--index", str(index_dir), "--output", str(nb), "-k", "10"], logs)
        if r["code"] != 0:
            problems.append(f"neighbors exited {r['code']}: {r['tail']}")
        else:
            nm = _manifest(nb / "MANIFEST.json")
            if nm["counts"]["rows"] != im["items"]:
                problems.append(f"neighbours: {nm['counts']['rows']} rows for {im['items']} items")
            rows.append(["neighbors (k=10, --method auto: HNSW, exact re-rank)", f"{r['wall']:.0f}",
                         f"{nm['counts']['rows'] / r['wall']:.0f} items/s", f"{r['peak_mb']:.0f}",
                         f"rows {nm['counts']['rows']:,}"])

    if args.old_default:
        out = work / "features-old-default"
        r = _stage("extract-old-default", ["extract", "--input", str(corpus), "--output", str(out), "--model",
                                           args.model, "--direct_running_mode=multi_threading",
                                           "--direct_num_workers=2"], logs)
        published = (out / "MANIFEST.json").exists()
        if published:
            c = _manifest(out / "MANIFEST.json")["counts"]
            outcome = f"published: inputs {c['inputs']:,}, ok {c['ok']:,}, failed {c['failed']:,}"
            if c["ok"] + c["failed"] != made:
                problems.append(f"the old default published a short run: {c}")
        else:
            last = r["tail"][-1] if r["tail"] else ""
            refusal = next((line for line in r["tail"] if "counts disagree" in line), last)
            outcome = f"exit {r['code']}, nothing published: {refusal.split(': ', 1)[-1][:160]}"
        rows.append(["extract, old default (multi_threading x2)", f"{r['wall']:.0f}", f"{made / r['wall']:.0f} img/s",
                     f"{r['peak_mb']:.0f}", outcome])

    table = md_table(["stage", "wall s", "rate", "peak RSS MB", "counts"], rows)
    print(table)
    if problems:
        print("COUNTS DIFFER:\n  " + "\n  ".join(problems), file=sys.stderr)
    if not args.quick and not problems:
        update_section("bench_scale", "\n\n".join([
            "## Scale: nothing lost at 100k images",
            "`.venv/bin/python -m benchmarks.bench_scale"
            + (f" --extract-runs {args.extract_runs}" if args.extract_runs > 1 else "")
            + (" --old-default" if args.old_default else "") + "`",
            f"Setup: {machine()}; {made:,} distinct JPEGs (64–128 px crops of the 1,720 dev photos, {origin}), "
            f"model {args.model}, every stage a `cbir` process on the local default runner "
            f"(Beam's FnApiRunner, in_memory, decode pool). Peak RSS is that process's own (wait4). "
            "The run fails if any count differs: images made = extract inputs = ok + failed = read; "
            "ok = items indexed; items = neighbour rows.",
            table,
        ]))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
