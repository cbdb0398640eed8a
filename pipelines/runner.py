"""Beam pipeline options for every job: one place for the local default and its warnings.

The DirectRunner's default (``in_memory``, one worker) is what every job runs with here.
``multi_threading`` with more than one worker is refused as a default and warned about
when asked for: on Beam 2.77 it loses and corrupts elements at ~100k inputs without an
error (``MatchFiles | Reshuffle | count`` over 103,200 files counted 102,349–102,411 in
three of five runs; one extract published 99,990 of 103,200 images and exited 0).
Parallelism on one machine comes from inside the steps instead (the decode pool,
TensorFlow's own threads, Annoy's build threads) or from ``multi_processing``.

The DirectRunner itself is not what runs a job here: Beam 2.77's (the pinned version) first
downloads the Prism binary from GitHub and runs the job on that, and only on failure falls
back to the FnApiRunner. On a machine with internet a job would run on a runner this project never
tested, fetched as code at run time; without it, every job paid for a failed download and
left an empty ``beam-temp*`` directory behind. So the local default (no ``--runner``, or
``DirectRunner``) is :class:`LocalRunner`: the FnApiRunner, as the DirectRunner builds it
for a batch job. ``--runner PrismRunner`` still asks for Prism by name.
"""

from __future__ import annotations

import logging

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineRunner

log = logging.getLogger(__name__)

LOCAL_RUNNER = "pipelines.runner.LocalRunner"
DIRECT_RUNNERS = (None, "DirectRunner", "SwitchingDirectRunner", "FnApiRunner", LOCAL_RUNNER)
_PINNED = {"direct", "directrunner", "switchingdirectrunner"}  # how Beam's runner map spells the DirectRunner


class LocalRunner(PipelineRunner):
    """The DirectRunner's batch path without its Prism detour (see the module docstring).

    Built as ``SwitchingDirectRunner`` builds its FnApiRunner, so that the pipeline options
    reach the workers' provision info (``multi_processing`` workers read them there).
    """

    def run_pipeline(self, pipeline, options):  # noqa: ANN001, ANN201  (Beam's signature)
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        return fn_runner.FnApiRunner(provision_info=info).run_pipeline(pipeline, options)


MULTI_THREADING_DEFECT = (
    "--direct_running_mode=multi_threading with --direct_num_workers=%d: Beam 2.77's FnApiRunner in this mode "
    "silently drops and corrupts elements at ~100k inputs (counts of 102,349-102,411 of 103,200 files measured; "
    "an element arriving as None). The job's own accounting refuses to publish a short run, but prefer the "
    "default (in_memory) or --direct_running_mode=multi_processing."
)


def is_direct(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return runner in DIRECT_RUNNERS or (isinstance(runner, str) and runner.endswith("DirectRunner"))


def pipeline_options(beam_args: list[str] | None) -> PipelineOptions:
    """PipelineOptions for a job: the local default pinned to :class:`LocalRunner`; warns about modes that lose data."""
    options = PipelineOptions(list(beam_args or []))
    standard = options.view_as(StandardOptions)
    if standard.runner is None or standard.runner.lower() in _PINNED:
        standard.runner = LOCAL_RUNNER
    if is_direct(options):
        direct = options.view_as(DirectOptions)
        workers = direct.direct_num_workers
        if direct.direct_running_mode == "multi_threading" and workers != 1:
            log.warning(MULTI_THREADING_DEFECT, workers)
    return options


def _beam_option_strings() -> set[str]:
    """Every ``--flag`` some PipelineOptions view defines (Beam's own parser, not a copy of its list)."""
    import argparse

    from apache_beam.options import pipeline_options as po

    parser = argparse.ArgumentParser(add_help=False)
    seen: set[type] = set()
    todo = [po.PipelineOptions]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
                try:
                    sub._add_argparse_args(parser)  # noqa: SLF001  (how Beam itself builds its parser)
                except Exception:  # argparse conflicts between views that define the same flag
                    continue
    return {s for action in parser._actions for s in action.option_strings}  # noqa: SLF001


def check_beam_args(extra: list[str], command_parser) -> str | None:
    """None when every extra argument is a Beam pipeline option; else a message naming the first that is not.

    Beam itself only logs "Discarding unparseable args" and runs on with defaults, so a typo
    such as ``--dimz 32`` would build a default index and exit 0.
    """
    import difflib

    beam = _beam_option_strings()
    ours = {s for action in command_parser._actions for s in action.option_strings}  # noqa: SLF001
    for arg in extra:
        if not arg.startswith("-"):
            continue  # a value of the option before it
        flag = arg.split("=", 1)[0]
        if flag in beam:
            continue
        close = difflib.get_close_matches(flag, sorted(ours | beam), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unrecognised argument {flag}{hint}: it is neither an option of this command nor a Beam pipeline option"
    positional = [a for a in extra if not a.startswith("-")]
    if positional and not any(a.startswith("-") for a in extra):
        return f"unrecognised arguments: {' '.join(positional)}"
    return None
