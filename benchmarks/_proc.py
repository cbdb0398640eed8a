"""Running a ``cbir`` command as its own process, as a user would, and measuring it.

Wall time and the child's own peak resident memory (``wait4``, so other processes of the
benchmark do not count). Output goes to a log file; the tail comes back for error messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cbir(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> dict:
    """``{"wall": s, "peak_mb": MB, "code": exit code, "tail": last log lines}`` of ``cbir ARGV``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text().splitlines()[-6:]
    print(f"  {name}: exit {code}, {wall:.1f}s, peak {usage.ru_maxrss / 1024:.0f} MB", flush=True)
    return {"wall": wall, "peak_mb": usage.ru_maxrss / 1024, "code": code, "tail": tail}
