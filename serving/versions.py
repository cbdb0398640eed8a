"""Following ``LATEST``: open the new version, verify it, swap it in atomically, retire the old one.

A service must never answer from a half-opened index nor drop requests while it changes
version. So a new version is opened completely off to the side (``Searcher`` checks the
manifest, every file digest and, when asked, the signature; the embedder is loaded and
warmed up), and only then becomes the one new requests get. Each request holds a *lease*
on the version it started with: the old version stays open until the last lease on it is
returned, and is closed then, never under a running search. A version that fails to open
is not swapped in; its error is kept for ``/healthz`` and the log, and the version is not
tried again until ``LATEST`` names another one (a broken build does not heal by waiting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from search import index_files
from search.searcher import Searcher

log = logging.getLogger(__name__)


def utc_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclasses.dataclass(frozen=True)
class OpenOptions:
    """How each version is opened: integrity checks, signature, and the query model."""

    verify: bool = True  # sha256 of every file (False: sizes only)
    signing_key: bytes | None = None
    weights_dir: str | None = None
    model: str | None = None  # savedmodel:PATH for an index built with a SavedModel backbone
    runtime: str = "auto"  # how the backbone runs (models/backbone/runtimes.py)
    images: bool = True  # load the embedder (search by uploaded image); False serves ids and vectors only
    threads: int = 0  # the searcher's own fan-out threads (0: its default)


class ServedVersion:
    """One opened version: its searcher, its embedder, and how many requests hold it."""

    def __init__(self, searcher: Searcher, embedder: Any = None):
        self.searcher = searcher
        self.embedder = embedder  # None when the service was started without image search
        self.capabilities: dict[str, Any] = searcher.capabilities  # computed once: it scans the labels
        self.version: str = searcher.version
        self.opened_at = time.time()
        self.refs = 0
        self.retired = False
        self.closed = False

    def find(self, image_id: str) -> int:
        """Global id of ``image_id`` in this version (KeyError when it holds no such item)."""
        return self.searcher.find(image_id)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.searcher.close()
            log.info("closed index version %s", self.version)


def _warm_up(served: ServedVersion) -> None:
    """One search and one embedding, so the first real request does not pay for tracing and first touches."""
    s = served.searcher
    if s.size:
        s.search(s.vectors_of(np.asarray([0]))[0], s.options())
    if served.embedder is not None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, format="PNG")
        served.embedder.embed_bytes([buf.getvalue()])


def open_version(index_dir: str, version: str, options: OpenOptions) -> ServedVersion:
    """Opens and verifies ``version`` of ``index_dir`` (copied locally first when it lives on an object store)."""
    local = index_files.localise(index_dir, version)
    searcher = Searcher(local, version=version, verify=options.verify, signing_key=options.signing_key,
                        threads=options.threads)
    try:
        embedder = None
        if options.images:
            embedder = searcher.open_embedder(weights_dir=options.weights_dir, model=options.model,
                                              runtime=options.runtime)
        served = ServedVersion(searcher, embedder)
        _warm_up(served)
    except BaseException:
        searcher.close()
        raise
    return served


class VersionFollower:
    """The version new requests are answered from, kept in step with ``<index>/LATEST``.

    ``opener(version)`` opens one version (default :func:`open_version`); :meth:`check`
    is called every ``poll_seconds`` by the service (or directly, by tests and tools).
    """

    def __init__(self, index_dir: str, options: OpenOptions | None = None, poll_seconds: float = 10.0,
                 opener: Callable[[str], ServedVersion] | None = None):
        self.index_dir = index_dir
        self.options = options or OpenOptions()
        self.poll_seconds = poll_seconds
        self._opener = opener or (lambda v: open_version(index_dir, v, self.options))
        self._lock = threading.Lock()  # guards _current and every ServedVersion's refs / retired
        self._check_lock = threading.Lock()  # one check (and one open) at a time
        self._current: ServedVersion | None = None
        self._failed: dict[str, dict[str, Any]] = {}
        self.latest: str | None = None  # what LATEST named at the last check
        self.last_check: float | None = None
        self.last_error: dict[str, Any] | None = None
        self.swaps = 0
        self._closed = False

    # -- opening and swapping ---------------------------------------------------------------------

    def start(self) -> ServedVersion:
        """Opens the version ``LATEST`` names now; raises when it cannot be opened (nothing to serve)."""
        version = index_files.read_pointer(self.index_dir)
        self.latest = version
        self.last_check = time.time()
        served = self._opener(version)
        self._swap(served)
        return served

    def check(self) -> str | None:
        """Reads ``LATEST``; opens and swaps in the version it names when that is new. Returns the
        version swapped in, or None (unchanged, already failed, or failed now: see :meth:`status`)."""
        with self._check_lock:
            self.last_check = time.time()
            try:
                version = index_files.read_pointer(self.index_dir)
            except Exception as exc:  # a damaged or missing pointer: keep serving what we have
                self._record_error(None, "pointer", exc)
                return None
            self.latest = version
            current = self._current
            if (current is not None and current.version == version) or version in self._failed:
                return None
            log.info("LATEST names %s (serving %s): opening it", version, current.version if current else "none")
            started = time.perf_counter()
            try:
                served = self._opener(version)
            except Exception as exc:
                self._failed[version] = self._record_error(version, "open", exc)
                log.error("index version %s was not swapped in: %s: %s (still serving %s)", version,
                          type(exc).__name__, exc, current.version if current else "nothing")
                return None
            if not self._swap(served):
                return None
            log.info("now serving %s (opened and verified in %.1fs)", version, time.perf_counter() - started)
            return version

    def _record_error(self, version: str | None, stage: str, exc: BaseException) -> dict[str, Any]:
        self.last_error = {"version": version, "stage": stage, "error": type(exc).__name__, "message": str(exc),
                           "at": utc_iso(time.time())}
        if stage == "pointer":
            log.warning("could not read %s/LATEST: %s: %s", self.index_dir, type(exc).__name__, exc)
        return self.last_error

    def _swap(self, served: ServedVersion) -> bool:
        """Makes ``served`` current (False, and closes it, when the follower was closed meanwhile)."""
        with self._lock:
            if self._closed:  # the service stopped while this version was opening
                served.retired = True
                old = None
            else:
                old, self._current = self._current, served
            if old is not None:
                old.retired = True
                drained = old.refs == 0
            self.swaps += 1
        if served.retired:
            served.close()
            return False
        if old is not None:
            if drained:
                old.close()
            else:
                log.info("version %s retired; %d request(s) still finishing on it", old.version, old.refs)
        return True

    # -- leases -----------------------------------------------------------------------------------

    def acquire(self) -> ServedVersion:
        """The current version, held until :meth:`release`: it is not closed while held."""
        with self._lock:
            served = self._current
            if served is None:
                raise LookupError("no index version is open")
            served.refs += 1
            return served

    def release(self, served: ServedVersion) -> None:
        with self._lock:
            served.refs -= 1
            close = served.retired and served.refs == 0
        if close:
            served.close()

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedVersion]:
        served = self.acquire()
        try:
            yield served
        finally:
            self.release(served)

    @property
    def current(self) -> ServedVersion | None:
        return self._current

    # -- reporting and shutdown -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``/healthz`` shows: the served version, what LATEST names, and why they differ if they do."""
        current = self._current
        behind = current is not None and self.latest is not None and self.latest != current.version
        failed = self._failed.get(self.latest) if self.latest else None
        status = "ok" if current is not None and not behind else ("behind" if current is not None else "down")
        return {
            "status": status,
            "version": current.version if current else None,
            "latest": self.latest,
            "items": current.searcher.size if current else 0,
            "opened_at": utc_iso(current.opened_at) if current else None,
            "last_check": utc_iso(self.last_check) if self.last_check else None,
            "poll_seconds": self.poll_seconds,
            "swaps": self.swaps,
            "error": failed if behind else None,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        with self._lock:
            self._closed = True
            served, self._current = self._current, None
            if served is not None:
                served.retired = True
                idle = served.refs == 0
        if served is not None and idle:
            served.close()
