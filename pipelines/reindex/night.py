"""A night's state: which steps of ``cbir reindex`` are done, so that a re-run after a failure picks up there.

``<root>/_reindex/STATE.json`` (written atomically, read and written only under the root's lease)
names the night (a run id), the version ``LATEST`` named when it began (what the report compares
with), and per step its status, attempts, wall time and what it published: the features' run id,
the index version, the neighbour table's run id. A step counts as done only while its output still
publishes exactly that (someone may have re-run a job by hand); the first step that is not done is
where a re-run starts, and every step after it runs again. A night whose steps are all done is over:
the next run starts a new one. So does a run more than ``resume_within`` seconds after a failed night
began, so that tomorrow's run never indexes yesterday's images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from artefacts import layout
from artefacts.manifests import new_run_id, utc_now
from plumbing import fsutil

log = logging.getLogger(__name__)

STEPS = ("extract", "index", "neighbors")
BOOKKEEPING = "_reindex"  # <root>/_reindex/: STATE.json and the lease
STATE_FILE = "STATE.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where each step of a night reads and writes under the root."""

    root: str

    def _at(self, *parts: str) -> str:
        return fsutil.join(self.root.rstrip("/"), *parts)

    @property
    def features(self) -> str:
        return self._at("features")

    @property
    def index(self) -> str:
        return self._at("index")

    @property
    def neighbors(self) -> str:
        return self._at("neighbors")

    @property
    def reports(self) -> str:
        return self._at("reports")

    @property
    def bookkeeping(self) -> str:
        return self._at(BOOKKEEPING)

    @property
    def state(self) -> str:
        return self._at(BOOKKEEPING, STATE_FILE)


@dataclasses.dataclass
class Night:
    """One night's record; ``steps[name]`` holds status, attempts, seconds, output (and error when it failed)."""

    night: str
    started: float
    started_utc: str
    previous_version: str | None  # what LATEST named when the night began
    status: str = "running"  # running | failed | done
    steps: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # each invocation of the command
    abandoned: str | None = None  # a failed night this one replaced because it was too old to resume

    def __post_init__(self) -> None:
        for step in STEPS:
            self.steps.setdefault(step, {"status": "pending", "attempts": 0})

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Night:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def reset_from(self, step: str | None) -> None:
        """Steps from ``step`` on are to run again: none of them counts as done any more."""
        if step is None:
            return
        for name in STEPS[STEPS.index(step):]:
            record = self.steps[name]
            if record["status"] == "done":
                record["status"] = "pending"


def load(paths: Paths) -> Night | None:
    """The last night's state, or None when the root never ran (or the file is not ours to read)."""
    if not fsutil.exists(paths.state):
        return None
    data = fsutil.read_json(paths.state)
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{paths.state} has format_version {data.get('format_version')}, this cbir reads "
                         f"{FORMAT_VERSION}: move the file away to start a new night")
    return Night.from_dict(data)


def save(paths: Paths, night: Night) -> None:
    """Atomically: a reader (or the next run after a crash) sees the previous state or this one."""
    fsutil.write_json_atomic(paths.state, night.to_dict())


def published(paths: Paths, step: str) -> str | None:
    """What a step's output publishes now: the features' or the table's run id, the version LATEST names."""
    if step == "index":
        pointer = fsutil.join(paths.index, layout.POINTER)
        return fsutil.read_json(pointer).get("version") if fsutil.exists(pointer) else None
    folder = paths.features if step == "extract" else paths.neighbors
    manifest = fsutil.join(folder, layout.MANIFEST)
    return fsutil.read_json(manifest).get("run_id") if fsutil.exists(manifest) else None


def first_pending(paths: Paths, night: Night) -> str | None:
    """The first step that is not done, or whose recorded output is no longer the published one (None: all done)."""
    for step in STEPS:
        record = night.steps[step]
        if record["status"] != "done":
            return step
        now = published(paths, step)
        if record.get("output") != now:
            log.warning("%s: the night's output %s is no longer the published one (%s): running it again", step,
                        record.get("output"), now)
            return step
    return None


def begin(paths: Paths, resume_within: float, now: float | None = None) -> tuple[Night, str | None]:
    """The night to work on and the step to start at: the last night resumed, or a new one."""
    now = time.time() if now is None else now
    last = load(paths)
    if last is not None and last.status != "done":
        if now - last.started <= resume_within:
            start = first_pending(paths, last)
            log.info("resuming night %s at %s", last.night, start or "the report")
            return last, start
        log.warning("night %s (%s, began %s) is older than the %.0f h it may be resumed within: starting a new night",
                    last.night, last.status, last.started_utc, resume_within / 3600)
    night = Night(new_run_id(now), now, utc_now(), previous_version=published(paths, "index"),
                  abandoned=last.night if last is not None and last.status != "done" else None)
    log.info("night %s begins (LATEST: %s)", night.night, night.previous_version or "none yet")
    return night, STEPS[0]
