"""Shared helpers for benchmarks: machine description and RESULTS.md sections.

Each benchmark owns one section of ``benchmarks/RESULTS.md`` between
``<!-- NAME -->`` and ``<!-- /NAME -->`` and replaces only that section, so
benchmarks can be re-run one at a time without touching each other's figures.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_HEADER = (
    "# Benchmark results\n\nEach section is written by the benchmark named in it; "
    "re-run the command to refresh it.\n"
)


def machine() -> str:
    """One line describing where the figures were measured."""
    import numpy as np

    try:
        import tensorflow as tf

        tf_version = tf.__version__
    except Exception:
        tf_version = "n/a"
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"TensorFlow {tf_version}, {time.strftime('%Y-%m-%d', time.gmtime())}"
    )


def update_section(name: str, markdown: str) -> None:
    """Replaces (or appends) the ``name`` section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    block = f"<!-- {name} -->\n{markdown.rstrip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)
