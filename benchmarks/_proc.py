"""Running a ``cbir`` command as its own process, as a user would, and measuring it.

Wall time and the child's own peak resident memory. The peak comes from GNU ``time`` (``%M``)
when it is installed: ``ru_maxrss`` survives ``exec``, so a child forked straight from a
benchmark that holds a million vectors would report the benchmark's size as its own;
forked from ``time`` it starts small. Without ``time``, ``wait4`` is used and the figure is
an upper bound. Output goes to a log file; the tail comes back for error messages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def run_cbir(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> dict:
    """``{"wall": s, "peak_mb": MB, "code": exit code, "tail": last log lines}`` of ``cbir ARGV``.

    ``cwd`` runs another checkout's ``cbir`` (a baseline revision) with this interpreter.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    # A benchmark may pin its own searches to one thread; the jobs it runs get the whole machine.
    child_env = {k: v for k, v in os.environ.items() if k not in ONE_THREAD_VARIABLES}
    gnu_time = shutil.which("time") if os.path.exists("/usr/bin/time") else None
    peak_file = log_dir / f"{name}.peak"
    command = [sys.executable, "-m", "pipelines.cli", *argv]
    if gnu_time:
        command = ["/usr/bin/time", "-f", "%M", "-o", str(peak_file), *command]
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd or REPO,
                                env={**child_env, "PYTHONUNBUFFERED": "1", **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    peak_kb = usage.ru_maxrss
    if gnu_time and peak_file.exists():
        numbers = [line for line in peak_file.read_text().split() if line.isdigit()]
        peak_kb = int(numbers[-1]) if numbers else peak_kb
    tail = log_path.read_text().splitlines()[-6:]
    print(f"  {name}: exit {code}, {wall:.1f}s, peak {peak_kb / 1024:.0f} MB", flush=True)
    return {"wall": wall, "peak_mb": peak_kb / 1024, "code": code, "tail": tail}
