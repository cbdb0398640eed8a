"""Running the service: in the foreground until a signal (``cbir serve``), or on a background thread.

The background form is a real server on a real socket with its own event loop, so tests and
benchmarks talk HTTP to exactly what ``cbir serve`` runs, without a second process paying
TensorFlow's start-up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return runner, f"http://{shown}:{bound_port}/"


def serve_forever(app: web.Application, host: str, port: int, on_ready: Callable[[str], None] | None = None) -> None:
    """Serves until SIGINT or SIGTERM; ``on_ready(url)`` once the socket is bound (port 0 picks a free one)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        runner, url = await _start(app, host, port)
        try:
            if on_ready is not None:
                on_ready(url)
            await stop.wait()
            log.info("stopping: finishing requests in flight")
        finally:
            await runner.cleanup()

    asyncio.run(main())


class ServiceThread:
    """The application served on ``host:port`` from a daemon thread; ``url`` once :meth:`start` returns."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url: str = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cbir-service", daemon=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._runner, self.url = loop.run_until_complete(_start(self.app, self.host, self.port))
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

    def start(self, timeout: float = 30.0) -> ServiceThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the service did not start within {timeout}s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> ServiceThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
