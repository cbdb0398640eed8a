"""Periodic progress lines from inside a running pipeline.

Beam metrics are only visible to the launcher at the end on the DirectRunner, so
each worker also logs its own count and rate every few seconds.
"""

from __future__ import annotations

import logging
import time

import apache_beam as beam

log = logging.getLogger("cbir.progress")


class LogProgressFn(beam.DoFn):
    """Passes elements through unchanged and logs '<what>: N done, R/s' periodically."""

    def __init__(self, what: str, every_seconds: float = 10.0):
        self._what = what
        self._every = every_seconds

    def setup(self):
        self._count = 0
        self._start = time.monotonic()
        self._last = self._start

    def process(self, element):
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            rate = self._count / max(now - self._start, 1e-9)
            log.info("%s: %d done in this worker, %.1f/s", self._what, self._count, rate)
        yield element
