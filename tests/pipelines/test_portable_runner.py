"""The jobs through a real portable runner: Beam's job server and an external SDK worker pool, each its own process.

This is the path Flink and Dataflow Runner v2 take (a job service, workers that run the SDK
harness elsewhere); their own job servers are downloads this machine cannot fetch, and Beam's
DaskRunner runs these pipelines wrongly without failing, so it is not supported. Both
services start on free ports with this venv's Python first on PATH (the pool starts workers
with the first ``python`` it finds), the jobs run one after another in a ``cbir`` process
(``pipelines.cli.main`` per job, so the launcher's TensorFlow and Beam start-up is paid once) with a
timeout so a dead worker cannot hang the suite, and both services are stopped by their process groups.
"""

from __future__ import annotations

import json
import os
import shutil
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


# Runs each job as ``cbir <argv>`` would, one after another; prints when each started and ended.
JOBS = """
import json, sys, time
from pipelines import cli
for argv in json.loads(sys.argv[1]):
    start = time.time()
    code = cli.main(argv)
    print("JOB " + json.dumps([argv[0], code, start, time.time()]), flush=True)
    if code:
        sys.exit(code)
"""


def _cbir(services, *jobs: list[str]) -> subprocess.CompletedProcess:
    """Runs the jobs in one process; checks that the worker pool started SDK worker processes for each of them."""
    pool = services["pool"].pid
    seen: list[tuple[float, set[int]]] = []  # (when, the pool's descendants then)
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append((time.time(), _children(pool)))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    argvs = [[*argv, *services["args"]] for argv in jobs]
    try:
        proc = subprocess.run([sys.executable, "-c", JOBS, json.dumps(argvs)], capture_output=True, text=True,
                              timeout=JOB_TIMEOUT, env=services["env"], cwd=REPO)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("JOB ")]
    assert [(name, code) for name, code, _, _ in ran] == [(argv[0], 0) for argv in jobs]
    for name, _, start, end in ran:
        before = set().union(*(pids for t, pids in seen if t < start))
        during = set().union(*(pids for t, pids in seen if start <= t <= end))
        assert during - before, f"the external worker pool started no SDK worker process for {name}"
    assert all(os.getpid() not in pids for _, pids in seen)
    return proc


@pytest.mark.slow
def test_extract_index_and_neighbors_through_a_job_server_and_an_external_worker_pool(services, tmp_path, flowers,
                                                                                       weights_dir):
    photos, features, index_dir, table = (tmp_path / n for n in ("photos", "features", "index", "neighbors"))
    photos.mkdir()
    for p in sorted((flowers / "6").glob("*.jpg"))[:24]:  # the count does not matter here, start-up does
        shutil.copy(p, photos / p.name)
    _cbir(services,
          ["extract", "--input", str(photos), "--output", str(features), "--model", "mobilenet_v1_025"],
          ["index", "--features", str(features), "--output", str(index_dir), "--dims", "16", "--shards", "2"],
          ["neighbors", "--index", str(index_dir), "--output", str(table), "-k", "5", "--chunk-size", "8"])
    m = json.loads((features / "MANIFEST.json").read_text())
    assert m["counts"] == {"inputs": 24, "read": 24, "ok": 24, "failed": 0}
    assert m["accounting"]["checked"]["read (counter) + carried"] == 24  # metrics came back from the workers
    assert m["metrics"]["num_inferences"] == 24
    version = json.loads((index_dir / "LATEST").read_text())["version"]
    im = json.loads((index_dir / version / "MANIFEST.json").read_text())
    assert im["items"] == 24 and im["metrics"]["items"] == 24 and im["index_types"] == ["annoy", "lsh", "hnsw"]
    nm = json.loads((table / "MANIFEST.json").read_text())
    assert nm["counts"]["rows"] == 24 and nm["accounting"]["checked"]["rows (counter)"] == 24
