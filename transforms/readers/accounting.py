"""How many inputs a job was given, known independently of what the runner delivered.

Every job that reads images through :class:`transforms.readers.ReadImages` (extract,
train-autoencoder) writes the readers' per-shard tallies under
``<staging>/_tallies/`` and counts its inputs here before it publishes: a runner that drops
elements then cannot make a short run look complete (issue 10).
"""

from __future__ import annotations

import json

import apache_beam as beam

from artefacts.manifests import Accounting
from plumbing import fsutil, publish
from transforms.readers.spec import InputSpec, ListedFile

TALLIES_DIR = "_tallies"


def write_tallies(tallies: beam.PCollection, staging: str) -> None:
    """The shard readers' tallies as JSON lines under ``<staging>/_tallies/``, where :func:`count_inputs`
    reads them back (the step labels are the jobs' own, so their graphs keep their step names)."""
    (
        tallies
        | "TallyJson" >> beam.Map(lambda t: json.dumps(t, sort_keys=True))
        | "WriteTallies" >> beam.io.WriteToText(fsutil.join(staging, TALLIES_DIR, "part"), file_name_suffix=".jsonl")
    )


def count_inputs(spec: InputSpec, listed: list[ListedFile], staging: str, job: str = "extract"
                 ) -> tuple[int, Accounting]:
    """How many inputs the run was given, known independently of what the runner delivered.

    Folders: the launcher's listing. Shards: each listed shard's tally; a shard with no
    tally (or two) refuses the run, since its records cannot be counted.
    """
    rows = unit_rows(spec, listed, staging, job)
    total = sum(rows.values())
    if not spec.is_shards:
        return total, Accounting("listing", len(listed), total)
    source = "parquet footers" if spec.format == "parquet" else "tallies"
    return total, Accounting(source, len(listed), total)


def unit_rows(spec: InputSpec, listed: list[ListedFile], staging: str, job: str = "extract") -> dict[str, int]:
    """Rows each listed input must have produced: one per file; a shard's tally (exactly one per shard)."""
    if not spec.is_shards:
        return {f.path: 1 for f in listed}
    tallies: dict[str, list[int]] = {}
    for path in fsutil.match(fsutil.join(staging, TALLIES_DIR, "part-*")):
        for line in fsutil.read_bytes(path).decode("utf-8").splitlines():
            if line.strip():
                t = json.loads(line)
                tallies.setdefault(t["unit"], []).append(int(t["entries"]))
    missing = [f.path for f in listed if len(tallies.get(f.path, [])) != 1]
    if missing:
        raise publish.PublishRefusedError(
            job, {"shards listed": len(listed), "shards with one tally": len(listed) - len(missing)},
            f"no single tally for {len(missing)} shard(s), e.g. {missing[:3]}",
        )
    return {f.path: tallies[f.path][0] for f in listed}
