"""``cbir reindex``: the night's order (extract → index → gate → neighbours → report), under one lease.

The root's lease (``<root>/_reindex/_LEASE.json``) is taken before the state is read, renewed
before each step, and given back at the end, done or not. A lease whose holder died (a process
of this host that no longer exists, or one not renewed for ``--lease-hours``) never blocks the
next night. A step's failure is recorded in the state and a partial report, then raised again
unchanged, so ``cbir`` exits with the code of that job's failure (3, 4, 5, …).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from artefacts.manifests import utc_now
from pipelines.reindex import night as nights
from pipelines.reindex import report as reports
from pipelines.reindex import steps
from pipelines.reindex.night import STEPS, Night, Paths
from pipelines.reindex.steps import ReindexConfig
from plumbing import fsutil
from plumbing.lease import Lease, LeaseHeldError

log = logging.getLogger(__name__)

HELP = "one command for the night: extract → index → gate → neighbours, resumable, with a report"


def run(cfg: ReindexConfig, beam_args: list[str] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the night in ``cfg.root``; returns the report. A step's failure is raised after the report."""
    cfg.validate()
    paths = Paths(cfg.root)
    ttl = cfg.lease_hours * 3600
    with _take_lease(paths, ttl) as lease:
        night, start = nights.begin(paths, cfg.resume_within_hours * 3600)
        this_run = {"from": start or "report", "started_utc": utc_now(), "host": socket.gethostname(),
                    "pid": os.getpid()}
        night.runs.append(this_run)
        night.status = "running"
        night.reset_from(start)
        nights.save(paths, night)
        started = time.time()
        try:
            for step in STEPS[STEPS.index(start):] if start else ():
                _renew(lease, ttl)
                _run_step(step, cfg, paths, night, beam_args)
            compared, note = _compare(cfg, paths, night)
        except BaseException:
            try:  # the step's own error is what the scheduler must see, whatever happens to the bookkeeping
                _finish(paths, night, this_run, "failed", started, None, "Not run: the night stopped before it.")
            except Exception as exc:
                log.warning("could not record the failed night in %s: %s", paths.bookkeeping, exc)
            raise
        return _finish(paths, night, this_run, "done", started, compared, note)


def _run_step(step: str, cfg: ReindexConfig, paths: Paths, night: Night, beam_args: list[str] | None) -> None:
    """One step, its attempt recorded before it starts and its outcome after (a crash leaves 'running': re-run)."""
    record = night.steps[step]
    for stale in ("error", "message", "version", "run_id", "output"):
        record.pop(stale, None)
    record.update(status="running", attempts=record.get("attempts", 0) + 1, started_utc=utc_now())
    nights.save(paths, night)
    log.info("night %s: %s (attempt %d)", night.night, step, record["attempts"])
    t0 = time.time()
    try:
        if step == "neighbors":
            published = steps.neighbors(cfg, paths, night.steps["index"]["output"], beam_args)
        else:
            published = getattr(steps, step)(cfg, paths, beam_args)
    except BaseException as exc:
        record.update(status="failed", seconds=round(time.time() - t0, 3), error=type(exc).__name__,
                      message=str(exc) or repr(exc), **_left_behind(exc))
        raise  # run() records the state and the partial report
    record.update(status="done", seconds=round(time.time() - t0, 3), finished_utc=utc_now(), **published)
    nights.save(paths, night)


def _left_behind(exc: BaseException) -> dict[str, Any]:
    """What a failed step still wrote, for the report's figures: a refused gate's version (committed, not
    published), the extract run that had too many failures (published; the step runs again on a re-run)."""
    report = getattr(exc, "report", None)
    if isinstance(report, dict) and "version" in report:
        return {"version": report["version"]}
    run_id = getattr(getattr(exc, "manifest", None), "run_id", None)
    return {"run_id": run_id} if isinstance(run_id, str) else {}


def _compare(cfg: ReindexConfig, paths: Paths, night: Night) -> tuple[dict[str, Any] | None, str | None]:
    """``cbir compare`` against the version LATEST named when the night began; a failure only notes why."""
    new, old = night.steps["index"].get("output"), night.previous_version
    if old is None:
        return None, "No previous version: this is the index's first night."
    if old == new:
        return None, f"The index version did not change ({new})."
    try:
        return steps.compare(cfg, paths, old, new), None
    except Exception as exc:  # tonight's outputs are published: a comparison that fails is a note, not a failure
        log.warning("could not compare %s with %s: %s", old, new, exc)
        return None, f"Not compared with {old}: {type(exc).__name__}: {exc}"


def _finish(paths: Paths, night: Night, this_run: dict[str, Any], status: str, started: float,
            compared: dict[str, Any] | None, note: str | None) -> dict[str, Any]:
    """The state's outcome, then the report (its path in ``report["path"]``)."""
    night.status = status
    this_run.update(status=status, seconds=round(time.time() - started, 3), finished_utc=utc_now())
    nights.save(paths, night)
    report = reports.build(paths, night, compared, note)
    report["path"] = reports.write(paths, report)
    log.info("report: %s", report["path"])
    return report


# -- the lease ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _take_lease(paths: Paths, ttl: float) -> Iterator[Lease]:
    """The root's lease while the night runs, or LeaseHeldError naming the live holder; a dead holder's is taken."""
    lease = Lease(paths.bookkeeping, "cbir reindex", ttl)
    held = _holder(lease)
    if held and held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
        log.warning("taking over the lease of cbir reindex pid %s, which no longer runs on this host", held["pid"])
        fsutil.delete_quietly([lease.path])
    try:
        lease.acquire()
    except LeaseHeldError:
        held = _holder(lease) or {}
        raise LeaseHeldError(
            f"another cbir reindex (host {held.get('host')}, pid {held.get('pid')}, started "
            f"{_utc(held.get('started'))}) is working on {paths.root}; two into one root are not supported. Its lease "
            f"{lease.path} lapses at {_utc(held.get('expires'))} if that run died on another host") from None
    try:
        yield lease
    finally:
        lease.release()


def _renew(lease: Lease, ttl: float) -> None:
    """Pushes the lease's expiry on before each step, so only a step longer than the lease can outlive it."""
    held = _holder(lease)
    if held is None or held.get("token") != lease.token:
        raise LeaseHeldError(f"the lease {lease.path} was taken over while this cbir reindex ran; stopping")
    lease.record["expires"] = time.time() + ttl
    fsutil.write_json_atomic(lease.path, lease.record)


def _holder(lease: Lease) -> dict[str, Any] | None:
    if not fsutil.exists(lease.path):
        return None
    try:
        return fsutil.read_json(lease.path)
    except (ValueError, OSError):
        return None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: let the expiry decide
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _utc(seconds: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds)) if isinstance(seconds, int | float) else "?"


# -- command line ---------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Adds ``reindex``; Beam options pass through to every job of the night (``beam=True``)."""
    from pipelines.options import (
        add_model_args,
        add_runtime_arg,
        fraction,
        method_name,
        non_negative_float,
        non_negative_int,
        positive_int,
    )

    r = subparsers.add_parser("reindex", help=HELP)
    r.add_argument("--input", required=True, help="the images, as cbir extract takes them")
    r.add_argument("--root", required=True,
                   help="the night's folder: features/, index/, neighbors/, reports/<night>.json|.md, _reindex/")
    add_model_args(r, "inception_v3")
    add_runtime_arg(r)
    r.add_argument("--max-failure-fraction", type=fraction, default=None,
                   help="extract: exit 3 when more than this fraction of the inputs failed")
    r.add_argument("--shards", type=positive_int, default=1,
                   help="index shards (a full build; an update keeps the base's)")
    r.add_argument("--dims", type=non_negative_int, default=256, help="PCA dimension (a full build)")
    r.add_argument("--full", action="store_true", help="build the index from scratch instead of updating LATEST")
    r.add_argument("--gate", default="", metavar="CONDITIONS",
                   help="as cbir index --gate: LATEST moves only when they hold, else exit 5 and no neighbours")
    r.add_argument("--gate-queries", default=None, metavar="FILE", help="as cbir index --gate-queries")
    r.add_argument("--gate-sample", type=positive_int, default=1000, help="as cbir index --gate-sample")
    r.add_argument("-k", type=positive_int, default=10, help="neighbours per row, and the comparison's k")
    r.add_argument("--method", type=method_name, default="auto", help="search method of the table and comparison")
    r.add_argument("--compare-sample", type=non_negative_int, default=1000,
                   help="items compared with the previous version (0: all)")
    r.add_argument("--resume-within-hours", type=non_negative_float, default=12.0,
                   help="a failed night is resumed at its failed step by a run within this many hours of its start; "
                        "later, a new night starts (0: always start a new night)")
    r.add_argument("--lease-hours", type=positive_int, default=12,
                   help="a run that died on another host blocks the root at most this long after its last step began")
    r.set_defaults(handler=main, beam=True)


def main(args: Any, beam_args: list[str]) -> int:
    """Runs the night from parsed options; prints one summary, and where the report is when a step failed."""
    from models.backbone.network import ModelSpec

    cfg = ReindexConfig(
        input=args.input, root=args.root,
        model=ModelSpec(name=args.model, weights_dir=args.weights_dir, runtime=args.runtime),
        max_failure_fraction=args.max_failure_fraction, shards=args.shards, dims=args.dims, full=args.full,
        gate=args.gate, gate_queries=args.gate_queries, gate_sample=args.gate_sample, k=args.k, method=args.method,
        compare_sample=args.compare_sample, resume_within_hours=args.resume_within_hours, lease_hours=args.lease_hours,
    )
    paths = Paths(cfg.root)
    before = _state_of(paths)
    try:
        report = run(cfg, beam_args)
    except BaseException:
        _say_where_it_stopped(paths, before)
        raise
    print_summary(report)
    return 0


def _state_of(paths: Paths) -> tuple[str, int] | None:
    """(night, runs so far): whether a run got as far as recording itself."""
    try:
        night = nights.load(paths)
    except (OSError, ValueError):
        return None
    return (night.night, len(night.runs)) if night is not None else None


def _say_where_it_stopped(paths: Paths, before: tuple[str, int] | None) -> None:
    """After a step failed: the step, how to resume, the partial report (the cli prints the error itself)."""
    if _state_of(paths) in (before, None):
        return  # refused before the night was touched (usage, lease): nothing to resume
    latest = nights.load(paths)
    failed = next((n for n in STEPS if latest.steps[n]["status"] == "failed"), "an interruption")
    print(f"reindex: night {latest.night} stopped at {failed}; the same command resumes it there. Report: "
          f"{fsutil.join(paths.reports, latest.night)}.md")


def print_summary(report: dict[str, Any]) -> None:
    """Two lines: the night and its steps' times, then what the index and table did."""
    s = report["steps"]
    times = ", ".join(f"{n} {s[n]['seconds']:.1f}s" if s[n].get("seconds") is not None else f"{n} -" for n in STEPS)
    print(f"reindex: night {report['night']} done ({times}); report {report.get('path')}")
    for name in STEPS:
        print(f"  {name}: {reports.summary(name, s[name])}")
