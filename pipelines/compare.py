"""``cbir compare``: two index versions side by side, before products read the new one.

``cbir compare --index IDX OLD NEW`` compares two versions of one index (``LATEST`` and
``PREVIOUS``, the complete version before it, are accepted as names); ``cbir compare OLD_DIR
NEW_DIR`` compares two index folders (their ``LATEST``) or two version folders. The figures
are defined in ``evaluation/compare.py``. Not a Beam job: it runs where the indexes are (a copy
is made first when one lives on an object store).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from artefacts import layout
from evaluation.compare import CompareConfig, compare, format_markdown, plot_overlap
from plumbing import fsutil
from search import index_files
from search.searcher import Searcher

log = logging.getLogger(__name__)


def locate(name: str, index: str | None) -> tuple[str, str]:
    """(index folder, version) for a version name in ``index``, or an index or version folder."""
    if index is not None:
        if name in ("LATEST", "PREVIOUS"):
            latest = index_files.read_pointer(index)
            if name == "LATEST":
                return index, latest
            older = [v for v in index_files.available_versions(index) if v < latest]
            if not older:
                raise FileNotFoundError(f"{index} holds no complete version older than LATEST ({latest})")
            return index, older[-1]
        return index, index_files.check_version_name(name)
    path = name.rstrip("/")
    if fsutil.exists(fsutil.join(path, layout.POINTER)):
        return path, index_files.read_pointer(path)
    if fsutil.exists(fsutil.join(path, layout.MANIFEST)):
        parent, _, version = path.rpartition("/")
        return parent or ".", version
    raise FileNotFoundError(f"{name} is neither an index folder (with {layout.POINTER}) nor a version folder "
                            f"(with {layout.MANIFEST}); to name versions of one index, give --index IDX")


def _open(index: str, version: str, verify: bool, signing_key: bytes | None) -> Searcher:
    return Searcher(index_files.localise(index, version), version=version, verify=verify, signing_key=signing_key)


def run(old: str, new: str, index: str | None, cfg: CompareConfig, verify: bool = True,
        signing_key: bytes | None = None, plot: str | None = None) -> dict[str, Any]:
    old_at, new_at = locate(old, index), locate(new, index)
    with _open(*old_at, verify, signing_key) as a, _open(*new_at, verify, signing_key) as b:
        log.info("comparing %s/%s (%d items) with %s/%s (%d items)", old_at[0], a.version, a.size, new_at[0],
                 b.version, b.size)
        report = compare(a, b, cfg)
    if plot:
        fsutil.write_bytes_atomic(plot, plot_overlap(report))
        report["plot"] = plot
    return report


def register(subparsers: Any) -> None:
    from pipelines.options import add_search_args, add_signing_arg, non_negative_int

    p = subparsers.add_parser("compare", help="two index versions: neighbour churn, recall, label metrics, changes")
    p.add_argument("old", help="version name (with --index; LATEST and PREVIOUS work), or an index / version folder")
    p.add_argument("new", help="as OLD")
    p.add_argument("--index", default=None, help="the index both versions belong to")
    add_search_args(p)
    p.add_argument("--sample", type=non_negative_int, default=1000,
                   help="query items, a seeded sample of those both versions hold (0: all; default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown")
    p.add_argument("--output", default=None, help="also write the report (markdown, or JSON with --json) here")
    p.add_argument("--plot", default=None, help="write the overlap@k histogram to this PNG")
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not digests")
    add_signing_arg(p)
    p.set_defaults(handler=main, beam=False)


def main(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines.options import search_options, signing_key

    cfg = CompareConfig(search=search_options(args), sample=args.sample, seed=args.seed)
    report = run(args.old, args.new, args.index, cfg, verify=not args.no_verify, signing_key=signing_key(args),
                 plot=args.plot)
    text = json.dumps(report, sort_keys=True) if args.json else format_markdown(report)
    print(text)
    if args.output:
        fsutil.write_bytes_atomic(args.output, (text + os.linesep).encode())
    if args.plot and not args.json:
        print(f"\noverlap histogram: {args.plot}")
    return 0
