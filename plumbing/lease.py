"""One index build at a time per output: a lease taken atomically before any work.

Two builds publishing into one index folder would both report success while one's cleanup
deleted the other's version. ``cbir index`` therefore takes ``<index>/_LEASE.json`` before
it starts and gives it back when it ends, published or not. The file names its holder
(version, host, pid, start) and when it lapses: a build killed with -9 cannot give it back,
so a lease older than ``--stale-after-hours`` may be taken over (or deleted by hand).

Local disk takes the lease with ``O_CREAT | O_EXCL``, which is atomic. Object stores have no
create-if-absent through Beam's filesystems: there the lease is written and read back, which
closes all but a narrow window; schedulers should not start two builds of one index anyway.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from plumbing import fsutil

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"


class LeaseHeldError(RuntimeError):
    """Another build holds the output's lease; this one did not start."""


def _holder_gone(held: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (killed, OOM): its lease holds nothing.

    A holder on another host cannot be checked from here; its lease holds until it lapses.
    """
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


class Lease:
    def __init__(self, output: str, version: str, ttl_seconds: float, what: str = "index build"):
        self.output = output
        self.what = what
        self.path = fsutil.join(output, LEASE_FILE)
        self.token = uuid.uuid4().hex
        self.record = {"version": version, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "expires": time.time() + ttl_seconds}

    def acquire(self) -> Lease:
        held = self._read()
        if held is not None and held.get("expires", 0) > time.time() and not _holder_gone(held):
            raise LeaseHeldError(
                f"another {self.what} ({held.get('version')}, host {held.get('host')}, pid {held.get('pid')}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(held.get('started', 0)))} UTC) holds {self.path}; "
                f"two runs into one output are not supported. If that run died, the lease lapses at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(held['expires']))} UTC, or delete the file")
        if held is not None:
            log.warning("taking over the lease of %s (%s): it lapsed or its process is gone", held.get("version"),
                        self.path)
            fsutil.delete_quietly([self.path])
        data = fsutil.json_bytes(self.record)
        if "://" not in self.path:
            os.makedirs(self.output, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise LeaseHeldError(f"another {self.what} took {self.path} a moment ago") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            fsutil.write_bytes_atomic(self.path, data)
            if (self._read() or {}).get("token") != self.token:
                raise LeaseHeldError(f"another {self.what} took {self.path} a moment ago")
        return self

    def release(self) -> None:
        if (self._read() or {}).get("token") == self.token:
            fsutil.delete_quietly([self.path])

    def _read(self) -> dict[str, Any] | None:
        if not fsutil.exists(self.path):
            return None
        try:
            return json.loads(fsutil.read_bytes(self.path))
        except (ValueError, OSError):
            return {"version": "unreadable", "expires": 0}  # a damaged lease holds nothing

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
