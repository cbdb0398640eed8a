"""The search service under load: p50 / p99 latency and throughput of ``cbir serve`` on loopback.

A ``cbir serve`` process (its own Python, as deployed) over the flowers17-dev index (MobileNet v1
0.25, 2 shards, PCA 128; built once under ``--work`` by ``bench_serving``'s helper) and a load
generator in this process: C concurrent aiohttp clients, each sending its next request as soon as
the previous one is answered (closed loop), for a fixed number of requests per level.

* **by id**: ``POST /api/search {"image_id", "k": 10, "method": "annoy", "rerank": true}``;
* **by image**: the same options with a photo uploaded as multipart (decode + backbone + transform
  in the server).

The baseline, in the same run: the searcher called directly in this process, one query at a time
(``Searcher.search`` for ids; ``embed_bytes`` + ``search`` for photos), before the server starts so
the two never share the cores. The difference is what HTTP, JSON and the service's pool cost.

    .venv/bin/python -m benchmarks.bench_service            # full run, writes RESULTS.md
    .venv/bin/python -m benchmarks.bench_service --quick    # a few requests at two levels; prints only
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._results import machine, md_table, update_section

DATA = os.environ.get("CBIR_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
REPO = Path(__file__).resolve().parent.parent
K = 10
OPTIONS = {"k": K, "method": "annoy", "rerank": True}


def _pcts(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_baseline(index_dir: str, ids: list[str], photos: list[bytes]) -> list[list]:
    """The searcher in this process, one query at a time: the floor the service is measured against."""
    from search.options import SearchOptions
    from search.searcher import Searcher

    rows = []
    with Searcher(index_dir, verify=False) as s:
        opts = s.options(SearchOptions.from_dict(OPTIONS))
        where = {name: g for g, name in enumerate(s.image_ids)}
        vectors = s.vectors_of(np.asarray([where[i] for i in ids]))
        s.search(vectors[0], opts, exclude=where[ids[0]])
        times = []
        started = time.perf_counter()
        for image_id, v in zip(ids, vectors, strict=True):
            t = time.perf_counter()
            s.search(v, opts, exclude=where[image_id])
            times.append(time.perf_counter() - t)
        rate = len(ids) / (time.perf_counter() - started)
        rows.append(["by id", "direct `Searcher.search` (baseline)", 1, len(ids),
                     *(f"{x:.2f}" for x in _pcts(times)), f"{rate:.0f}", 0])
        embedder = s.open_embedder()
        for data in photos[:2]:  # warm-up: traces the backbone at batch size 1
            s.search(embedder.embed_bytes([data])[0][0], opts)
        times = []
        started = time.perf_counter()
        for data in photos:
            t = time.perf_counter()
            s.search(embedder.embed_bytes([data])[0][0], opts)
            times.append(time.perf_counter() - t)
        rate = len(photos) / (time.perf_counter() - started)
        rows.append(["by image", "direct `embed_bytes` + `search` (baseline)", 1, len(photos),
                     *(f"{x:.1f}" for x in _pcts(times)), f"{rate:.1f}", 0])
    for r in rows:
        print("  " + " | ".join(str(c) for c in r), flush=True)
    return rows


class Server:
    """``cbir serve`` as its own process on a free loopback port."""

    def __init__(self, index_dir: str, workers: int, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log_path.open("w")
        argv = [sys.executable, "-m", "pipelines.cli", "serve", "--index", index_dir, "--port", str(self.port),
                "--workers", str(workers), "--queue", "256", "--poll-seconds", "0"]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait(self, timeout: float = 180.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cbir serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "healthz", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"cbir serve did not answer within {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _load(url: str, concurrency: int, total: int, make_request) -> tuple[list[float], float, int]:
    """(latencies, wall seconds, failed requests) of ``total`` requests from ``concurrency`` closed-loop clients."""
    import aiohttp

    latencies: list[float] = []
    failed = 0
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client() -> None:
            nonlocal failed
            for i in counter:
                t = time.perf_counter()
                async with make_request(session, url, i) as r:
                    await r.read()
                    if r.status != 200:
                        failed += 1
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, wall, failed


def bench_service(url: str, ids: list[str], photos: list[bytes], levels: list[int], requests_per_level: int,
                  image_requests: int) -> list[list]:
    import aiohttp

    def by_id(session, base, i):
        return session.post(base + "api/search", json={**OPTIONS, "image_id": ids[i % len(ids)]})

    def by_image(session, base, i):
        form = aiohttp.FormData()
        form.add_field("image", photos[i % len(photos)], filename="q.jpg", content_type="image/jpeg")
        form.add_field("options", json.dumps(OPTIONS))
        return session.post(base + "api/search", data=form)

    rows = []
    asyncio.run(_load(url, 2, 8, by_id))  # warm-up: connections, first touches
    asyncio.run(_load(url, 1, 3, by_image))
    for mode, make, total in (("by id", by_id, requests_per_level), ("by image", by_image, image_requests)):
        for c in levels:
            latencies, wall, failed = asyncio.run(_load(url, c, total, make))
            fmt = "{:.2f}" if mode == "by id" else "{:.1f}"
            rows.append([mode, "`cbir serve` over HTTP", c, total, *(fmt.format(x) for x in _pcts(latencies)),
                         f"{total / wall:.0f}" if mode == "by id" else f"{total / wall:.1f}", failed])
            print("  " + " | ".join(str(x) for x in rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_serving import real_index

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few requests at two levels; no RESULTS.md")
    parser.add_argument("--work", default=os.path.join("out", "bench_serving"),
                        help="features and indexes are kept (and reused) here (shared with bench_serving)")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=None, help="requests by id per level (default 2000)")
    parser.add_argument("--images", type=int, default=None, help="requests by image per level (default 200)")
    parser.add_argument("--workers", type=int, default=0, help="the server's --workers (default: one per core)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CBIR_WEIGHTS_DIR", os.path.join(DATA, "..", "models", "keras"))
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.quick:
        levels = levels[:2]
    n_requests = args.requests or (40 if args.quick else 2000)
    n_images = args.images or (10 if args.quick else 200)
    work = os.path.abspath(args.work + ("-quick" if args.quick else ""))
    os.makedirs(work, exist_ok=True)
    print(f"bench_service: {machine()}\n  flowers17-dev index, levels {levels}, {n_requests} id requests and "
          f"{n_images} image requests per level, server workers {args.workers or os.cpu_count()}, work {work}")
    index_dir = real_index("flowers17-dev", work)
    paths = sorted(glob.glob(os.path.join(DATA, "flowers17-dev", "*", "*.jpg")))
    rng = np.random.default_rng(0)
    photos = [Path(p).read_bytes() for p in rng.choice(paths, size=min(len(paths), 40), replace=False)]
    from search.index_files import resolve

    version, _ = resolve(index_dir)
    import pyarrow.parquet as pq

    names = [n for shard in sorted(glob.glob(os.path.join(index_dir, version, "shards", "*", "idmap.parquet")))
             for n in pq.read_table(shard, columns=["image_id"]).column("image_id").to_pylist()]
    ids = [names[i] for i in rng.choice(len(names), size=min(len(names), n_requests), replace=False)]

    print("\ndirect (this process, one query at a time; ms):")
    rows = direct_baseline(index_dir, ids[: min(len(ids), 500)], photos[: min(len(photos), n_images)])

    print("\nthe service on loopback (ms; requests/s):")
    server = Server(index_dir, args.workers, Path(work) / "serve.log")
    try:
        t = time.perf_counter()
        server.wait()
        startup = time.perf_counter() - t
        rows += bench_service(server.url, ids, photos, levels, n_requests, n_images)
    finally:
        server.stop()
    print(f"  server start-up (open + verify + load the model + warm-up): {startup:.1f}s")

    given = sys.argv[1:] if argv is None else argv
    command = "CBIR_WEIGHTS_DIR=../shared/models/keras .venv/bin/python -m benchmarks.bench_service" + (
        " " + " ".join(given) if given else "")
    md = "\n\n".join([
        "## bench_service: `cbir serve` latency and throughput on loopback",
        f"Command: `{command}`  \nMachine: {machine()}",
        f"flowers17-dev index (MobileNet v1 0.25, 2 shards, PCA 128), k={K}, Annoy + exact re-rank. The server is "
        f"its own process (`--workers {args.workers or os.cpu_count()}`); the load generator runs C closed-loop "
        "aiohttp clients in the benchmark process on the same 2 cores, so at high C the two compete. Baseline: "
        "the searcher called directly, one query at a time, before the server started. Server start-up "
        f"(open, verify, load the model, warm up): {startup:.1f}s.",
        md_table(["query", "path", "concurrency", "requests", "p50 ms", "p99 ms", "requests/s", "failed"], rows),
    ])
    if args.quick:
        print("\n--quick: RESULTS.md not written")
    else:
        update_section("bench_service", md)
        print("\nwrote the bench_service section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
