"""The jobs through a real portable runner: Beam's job server and an external SDK worker pool, each its own process.

This is the path Flink and Dataflow Runner v2 take (a job service, workers that run the SDK
harness elsewhere); their own job servers are downloads this machine cannot fetch, and Beam's
DaskRunner runs these pipelines wrongly without failing, so it is not supported. Both
services start on free ports with this venv's Python first on PATH (the pool starts workers
with the first ``python`` it finds), every job runs as a ``cbir`` process with a timeout so a
dead worker cannot hang the suite, and both services are stopped by their process groups.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a service exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s: {log.read_text()[-2000:]}")


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found.update(kids)
        todo += kids
    return found


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    logs = tmp_path_factory.mktemp("portable-logs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO)}
    job_port, pool_port = _free_port(), _free_port()
    procs = []
    try:
        for name, argv, port in (
            ("job", ["-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)],
             job_port),
            ("pool", ["-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"], pool_port),
        ):
            log = logs / f"{name}.log"
            proc = subprocess.Popen([sys.executable, *argv], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO, start_new_session=True)
            procs.append(proc)
            _wait_for(port, proc, log)
        yield {"args": ["--runner", "PortableRunner", "--job_endpoint", f"localhost:{job_port}",
                        "--environment_type", "EXTERNAL", "--environment_config", f"localhost:{pool_port}"],
               "pool": procs[1], "env": env, "logs": logs}
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


def _cbir(services, *argv: str) -> subprocess.CompletedProcess:
    """Runs a job as a ``cbir`` process; records whether the worker pool had SDK worker processes meanwhile."""
    pool = services["pool"].pid
    seen: set[int] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(_children(pool))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv, *services["args"]], capture_output=True,
                              text=True, timeout=JOB_TIMEOUT, env=services["env"], cwd=REPO)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seen, "the external worker pool started no SDK worker process for this job"
    assert os.getpid() not in seen and all(pid != os.getpid() for pid in seen)
    return proc


@pytest.mark.slow
def test_extract_index_and_neighbors_through_a_job_server_and_an_external_worker_pool(services, tmp_path, flowers,
                                                                                       weights_dir):
    features, index_dir, table = tmp_path / "features", tmp_path / "index", tmp_path / "neighbors"
    _cbir(services, "extract", "--input", str(flowers / "6"), "--output", str(features), "--model", "mobilenet_v1_025")
    m = json.loads((features / "MANIFEST.json").read_text())
    assert m["counts"] == {"inputs": 80, "read": 80, "ok": 80, "failed": 0}
    assert m["accounting"]["checked"]["read (counter)"] == 80  # metrics came back from the workers
    assert m["metrics"]["num_inferences"] == 80
    _cbir(services, "index", "--features", str(features), "--output", str(index_dir), "--dims", "16", "--shards", "2")
    version = json.loads((index_dir / "LATEST").read_text())["version"]
    im = json.loads((index_dir / version / "MANIFEST.json").read_text())
    assert im["items"] == 80 and im["metrics"]["items"] == 80 and im["index_types"] == ["annoy", "lsh", "hnsw"]
    _cbir(services, "neighbors", "--index", str(index_dir), "--output", str(table), "-k", "5", "--chunk-size", "20")
    nm = json.loads((table / "MANIFEST.json").read_text())
    assert nm["counts"]["rows"] == 80 and nm["accounting"]["checked"]["rows (counter)"] == 80
