"""``cbir reindex``: one command for the night, each step resumable, with a report.

extract (in place, reusing the previous night's features for unchanged images) → index (an
in-place update of the version ``LATEST`` names, or a full build when there is none, ``--full``
is given or the index job decides so itself) → the gate (the index job's, before ``LATEST``
moves) → neighbours (only the rows the update can have changed) → a report with ``cbir compare``
against the previous version. Each step is the job's own Python entry point.

Modules: ``night`` (the root's layout and the night's state: what is done, where a re-run
starts), ``steps`` (the settings and one function per step), ``report`` (JSON and Markdown from
what the steps published), ``command`` (the order under the root's lease, the options, the summary).
"""

from pipelines.reindex.command import HELP, main, register, run
from pipelines.reindex.steps import ReindexConfig

__all__ = ["HELP", "ReindexConfig", "main", "register", "run"]
