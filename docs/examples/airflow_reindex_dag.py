"""Airflow DAG for the nightly ``cbir reindex``: copy it into your DAGs folder and set the paths below.

One task, because one command is the night: ``cbir reindex`` extracts (reusing last night's
features for unchanged images), updates the index in place (or builds it in full when it must),
gates it, refreshes the neighbour table and writes a report to ``<root>/reports/<night>.md``.
It keeps its own state, so Airflow's retry of the task resumes the night at the step that failed:
steps already done are not run again. A failed night is resumed by runs within
``--resume-within-hours`` (12) of its start; tomorrow's run starts a new night.

Exit codes (the task fails on any but 0; ``note_exit_code`` logs what the code means):

    1  unexpected error (a bug, or a failure outside the product): a retry often helps
    2  bad input or usage, or another reindex holds the root (its lease): fix, or wait for it
    3  too many inputs failed (--max-failure-fraction): look at <root>/features/failures/
    4  counts did not add up, nothing published: a retry re-runs that step
    5  the gate failed: the new version is built but LATEST did not move and the neighbour
       table was not refreshed; the report has the measured figures

A retry of 3 or 5 fails again unless the images or the conditions change (cheaply: only the failed
step runs again). With Airflow 2 the imports fall back to ``airflow.operators.bash``.

On Kubernetes, the same command runs in the project's image instead:

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    KubernetesPodOperator(task_id="reindex", name="cbir-reindex", image="REGISTRY/cbir:TAG",
                          cmds=["cbir"], arguments=shlex.split(COMMAND)[1:], retries=2)
"""

from __future__ import annotations

import datetime as dt
import logging
import re

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator

log = logging.getLogger(__name__)

INPUT = "gs://bucket/images"  # the images, as cbir extract takes them
ROOT = "gs://bucket/cbir"  # features/, index/, neighbors/, reports/ of every night
COMMAND = (
    f"cbir reindex --input {INPUT} --root {ROOT} --model inception_v3 --max-failure-fraction 0.01 "
    "--gate 'map>=0.50,recall@10>=0.95,expected@10>=0.9' --gate-queries gs://bucket/gate/known_copies.jsonl "
    "-k 20 --runner DataflowRunner --project P --region europe-west1 --temp_location gs://bucket/tmp "
    "--setup_file ./setup.py"
)

EXIT_CODES = {
    1: "unexpected error: see the task log (a retry often helps)",
    2: "bad input or usage, or another cbir reindex holds the root",
    3: "too many inputs failed (--max-failure-fraction); outputs were written, see features/failures/",
    4: "counts did not add up; nothing was published by the failed step",
    5: "the quality gate failed: LATEST unchanged, neighbours not refreshed; see the night's report",
}


def note_exit_code(context: dict) -> None:
    """on_failure_callback: what the command's exit code means, and where the night's report is."""
    found = re.search(r"exit code (\d+)", str(context.get("exception")))
    code = int(found.group(1)) if found else None
    log.error("cbir reindex failed with exit code %s: %s. Report: %s/reports/ (the newest night)", code,
              EXIT_CODES.get(code, "see the task log"), ROOT)


with DAG(
    dag_id="cbir_reindex",
    schedule="0 2 * * *",  # every night at 02:00
    start_date=dt.datetime(2026, 1, 1),
    catchup=False,  # a missed night is not worth running late: the next one indexes everything new
    max_active_runs=1,  # the command refuses a second run into one root anyway (exit 2)
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=15), "on_failure_callback": note_exit_code},
    tags=["cbir"],
) as dag:
    reindex = BashOperator(task_id="reindex", bash_command=COMMAND, execution_timeout=dt.timedelta(hours=10))
