"""Search speed of two checkouts on one index, runs interleaved: is a refactor's q/s difference real?

One ``bench_index`` run per checkout is not enough to compare q/s: on this machine the same
search swung by up to 2× between runs. Here each checkout searches the same published index in
its own process (its own modules first on ``sys.path``, this interpreter), one query at a time on
one thread with one options record (as ``bench_index`` and a service search) after a warm-up
pass, and the checkouts take turns, so a slow minute of the machine
hits both. Prints every pass and the median per checkout and method.

    .venv/bin/python -m benchmarks.bench_checkouts --index DIR --checkouts /tmp/before,. [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

_PROBE = r"""
import os, sys, time
sys.path.insert(0, os.getcwd())
try:
    from serving.searcher import Searcher  # checkouts before the search/ package
except ImportError:
    from search.searcher import Searcher
index, queries, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
with Searcher(index, verify=False, threads=1) as s:
    v = s.all_vectors()[:queries]
    for method in methods:
        opts = s.options(k=10, method=method)  # one options record, as a service holds it
        for rep in range(3):  # the first pass pages in what the memory-mapped files need
            t = time.perf_counter()
            for row in v:
                s.search_arrays(row[None, :], opts)
            if rep:
                print(method, len(v) / (time.perf_counter() - t), flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="a published index both checkouts can open")
    parser.add_argument("--checkouts", required=True, help="two or more checkout folders, comma-separated")
    parser.add_argument("--methods", default="hnsw,annoy,lsh")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    found: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for checkout in args.checkouts.split(","):
            out = subprocess.run([sys.executable, "-c", _PROBE, args.index, str(args.queries), args.methods],
                                 cwd=Path(checkout).resolve(), env=env, capture_output=True, text=True, check=True)
            for line in out.stdout.splitlines():
                method, qps = line.split()
                found.setdefault((checkout, method), []).append(float(qps))
                print(f"round {r + 1} {checkout} {method} {float(qps):,.0f} q/s", flush=True)
    for (checkout, method), values in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{method:6s} {checkout}: {min(values):,.0f} – {max(values):,.0f} q/s, median "
              f"{statistics.median(values):,.0f} ({len(values)} passes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
