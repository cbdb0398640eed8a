"""What the routes share: the version follower, the bounded worker pool, the in-flight count, the caches.

Searches are CPU work (numpy, Annoy, faiss, TensorFlow), so they run in a bounded thread pool, never on
the event loop; a request beyond the pool and its queue is answered 503 at once rather than piling up,
and each request has a time limit. Each request holds a lease on the index version it started with, so
a swap to a new version never mixes two versions in one answer.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from serving.config import ServiceConfig
from serving.errors import TimedOut, Unavailable
from serving.thumbnails import ThumbnailCache
from serving.versions import VersionFollower

log = logging.getLogger(__name__)


STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


class ServiceState:
    """What the routes share: the version follower, the worker pool, the in-flight count, the caches."""

    def __init__(self, follower: VersionFollower, config: ServiceConfig):
        config.validate()
        self.follower = follower
        self.config = config
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="cbir-serve")
        self.admin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-follow")  # opening versions
        self.thumbnails = ThumbnailCache(config.thumbnail_cache_mb << 20, config.thumbnail_max_input_bytes)
        self.capacity = config.workers + config.queue
        self.in_flight = 0
        self.answered = 0
        self.rejected = 0
        self.explain = _load_explain()
        self.static = {name: (importlib.resources.files("serving").joinpath("static", name).read_bytes(),
                              kind) for name, kind in STATIC_FILES.items()}

    async def run(self, request_fn: Any, *args: Any) -> Any:
        """``request_fn(served, *args)`` in the pool, under a lease on the current version.

        Refused at once (503) when the pool and its queue are full; 504 past the time limit.
        The lease and the pool place are given back when the work ends, not when the caller
        stops waiting, so a timed-out search still counts until it is done and its version
        is not closed under it; work whose deadline passed while it queued is not started.
        """
        if self.in_flight >= self.capacity:
            self.rejected += 1
            raise Unavailable(f"the server is busy ({self.in_flight} requests in flight, limit {self.capacity}): "
                              "retry shortly")
        try:
            served = self.follower.acquire()
        except LookupError as exc:
            raise Unavailable(str(exc)) from None
        limit = self.config.timeout_seconds
        deadline = time.monotonic() + limit

        def job() -> Any:
            if time.monotonic() > deadline:
                raise TimeoutError("expired while queued")
            return request_fn(served, *args)

        self.in_flight += 1
        future = asyncio.get_running_loop().run_in_executor(self.pool, job)

        def done(finished: asyncio.Future) -> None:
            self.in_flight -= 1
            self.follower.release(served)
            if not finished.cancelled():
                finished.exception()  # marks it seen: a caller that timed out no longer awaits it

        future.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            raise TimedOut(f"the request took longer than the limit of {limit:g}s") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.admin.shutdown(wait=False, cancel_futures=True)
        self.follower.close()


STATE = web.AppKey("cbir_state", ServiceState)


def _load_explain() -> Any:
    """``inspection.explain.explain_match`` when that module is there and imports; else None (no endpoint)."""
    try:
        from inspection.explain import explain_match
    except ImportError:
        return None
    except Exception as exc:  # present but broken: the service still starts, without the map
        log.warning("inspection.explain is present but failed to import (%s: %s): no \"why it matched\" endpoint",
                    type(exc).__name__, exc)
        return None
    return explain_match
