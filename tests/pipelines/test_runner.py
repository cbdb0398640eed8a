"""The local default runner: the FnApiRunner the project is tested on, never a Prism binary fetched at run time."""

from __future__ import annotations

import logging
import os
import tempfile

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.testing.util import assert_that, equal_to

from pipelines.runner import LOCAL_RUNNER, pipeline_options


@pytest.mark.parametrize("args", [[], ["--runner", "DirectRunner"], ["--runner=direct"]])
def test_the_local_default_runs_without_trying_prism_and_leaves_no_temp_dir(args, tmp_path, monkeypatch, caplog):
    # Beam's DirectRunner first starts a Prism job server (a mkdtemp under the temp dir that is never
    # removed when the binary cannot be fetched) and logs that it runs the pipeline with Prism.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    options = pipeline_options(args)
    assert options.view_as(StandardOptions).runner == LOCAL_RUNNER
    with caplog.at_level(logging.INFO), beam.Pipeline(options=options) as p:
        out = p | beam.Create(range(100)) | beam.Map(lambda x: (x % 3, x)) | beam.CombinePerKey(sum)
        assert_that(out, equal_to([(0, sum(range(0, 100, 3))), (1, sum(range(1, 100, 3))), (2, sum(range(2, 100, 3)))]))
    assert "Prism" not in caplog.text
    assert not list(tmp_path.glob("beam-temp*"))


def test_multi_processing_workers_run_under_the_local_runner_with_the_job_options():
    options = pipeline_options(["--direct_running_mode=multi_processing", "--direct_num_workers=2",
                                "--job_name=local-runner-options-probe"])
    here = os.getpid()

    def seen_by_worker(x: int) -> tuple[int, int, str]:  # nested: pickled by value, the workers cannot import tests
        # An SDK worker process reads its pipeline options from this variable, which the runner
        # fills from the provision info: empty when the runner is built without it.
        return x, os.getpid(), os.environ.get("PIPELINE_OPTIONS", "")

    def check(rows):
        assert sorted(x for x, _, _ in rows) == list(range(200))
        assert all(pid != here for _, pid, _ in rows), "elements were processed in the launcher, not in workers"
        assert all("local-runner-options-probe" in opts for _, _, opts in rows), "workers did not get the options"

    with beam.Pipeline(options=options) as p:
        rows = p | beam.Create(range(200)) | beam.Reshuffle() | beam.Map(seen_by_worker)
        assert_that(rows, check)


@pytest.mark.parametrize("runner", ["PrismRunner", "DataflowRunner", "PortableRunner", "BundleBasedDirectRunner"])
def test_a_runner_asked_for_by_name_is_left_alone(runner):
    assert pipeline_options(["--runner", runner]).view_as(StandardOptions).runner == runner
