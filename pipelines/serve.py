"""``cbir serve``: the search service and its browser front end over an index that follows ``LATEST``.

Binds 127.0.0.1 by default: exposing it on another interface is a choice (``--host``), and
then a bearer token (``--token-file``) is what stands between the network and the index's
photos. The first version is opened (and every file digest checked) before the socket is
bound, so a service that starts is a service that can answer; later versions are picked up
every ``--poll-seconds`` (see ``serving/versions.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16


@dataclasses.dataclass
class ServeConfig:
    index: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 0  # 0: one per core
    queue: int = 32
    poll_seconds: float = 10.0
    token_file: str | None = None
    weights_dir: str | None = None
    model: str | None = None
    runtime: str = "auto"
    images: bool = True
    verify: bool = True
    signing_key: bytes | None = None
    max_upload_mb: float = 16.0
    timeout_seconds: float = 30.0
    max_k: int = 100


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); refused when short or readable by others."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ValueError(f"the token in {path} must be at least {MIN_TOKEN_CHARS} characters without spaces "
                         f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path})")
    if os.stat(path).st_mode & 0o077:
        log.warning("%s is readable by other users: chmod 600 it", path)
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(cfg: ServeConfig) -> Any:
    """The application over the first opened version (raises when it cannot be opened)."""
    from serving.app import ServiceConfig, make_app
    from serving.versions import OpenOptions, VersionFollower

    token = read_token(cfg.token_file) if cfg.token_file else None
    service = ServiceConfig(workers=cfg.workers or max(1, os.cpu_count() or 1), queue=cfg.queue,
                            max_upload_bytes=int(cfg.max_upload_mb * (1 << 20)),
                            timeout_seconds=cfg.timeout_seconds, max_k=cfg.max_k, token=token)
    service.validate()
    if not _is_loopback(cfg.host) and token is None:
        log.warning("serving on %s without a token: anyone who can reach it can search the index and see its "
                    "photos (--token-file)", cfg.host)
    follower = VersionFollower(cfg.index, OpenOptions(verify=cfg.verify, signing_key=cfg.signing_key,
                                                      weights_dir=cfg.weights_dir, model=cfg.model,
                                                      runtime=cfg.runtime, images=cfg.images),
                               poll_seconds=cfg.poll_seconds)
    served = follower.start()
    log.info("opened %s/%s: %d items, methods %s%s", cfg.index, served.version, served.searcher.size,
             ", ".join(served.searcher.available_methods), "" if cfg.images else " (no image search)")
    return make_app(follower, service)


def run(cfg: ServeConfig) -> int:
    from serving.server import serve_forever

    app = build(cfg)

    def ready(url: str) -> None:
        print(f"cbir serve: {url} (index {cfg.index}, following LATEST every {cfg.poll_seconds:g}s; Ctrl-C stops)",
              flush=True)

    try:
        serve_forever(app, cfg.host, cfg.port, ready)
    except OSError as exc:  # address in use, not available here, a privileged port
        print(f"cbir serve: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: Any) -> None:
    from pipelines.options import (
        add_runtime_arg,
        add_signing_arg,
        int_at_least,
        non_negative_float,
        non_negative_int,
        positive_int,
    )

    p = subparsers.add_parser("serve", help="HTTP search API and browser front end over an index (follows LATEST)")
    p.add_argument("--index", required=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_at_least(0), default=8080, help="TCP port (0: any free port; default 8080)")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="threads that run searches, embeddings and thumbnails (default: one per core)")
    p.add_argument("--queue", type=non_negative_int, default=32,
                   help="requests that may wait for a worker; more are answered 503 at once (default 32)")
    p.add_argument("--poll-seconds", type=non_negative_float, default=10.0,
                   help="how often LATEST is checked for a new version (0: never; default 10)")
    p.add_argument("--token-file", default=None,
                   help="require 'Authorization: Bearer TOKEN' on /api/ with the token in this file")
    p.add_argument("--weights-dir", default=None, help="backbone weights for image queries (default $CBIR_WEIGHTS_DIR)")
    p.add_argument("--model", default=None,
                   help="savedmodel:PATH for an index built with a SavedModel backbone (never taken from the index)")
    add_runtime_arg(p)
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="do not load the backbone: search by id and by vector only")
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not digests, when opening")
    add_signing_arg(p)
    p.add_argument("--max-upload-mb", type=non_negative_float, default=16.0, help="request body limit (default 16)")
    p.add_argument("--timeout", type=non_negative_float, default=30.0, help="per-request time limit in seconds")
    p.add_argument("--max-k", type=positive_int, default=100, help="largest k a request may ask for (default 100)")
    p.set_defaults(handler=main, beam=False)


def main(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines.options import signing_key

    cfg = ServeConfig(index=args.index, host=args.host, port=args.port, workers=args.workers, queue=args.queue,
                      poll_seconds=args.poll_seconds, token_file=args.token_file, weights_dir=args.weights_dir,
                      model=args.model, runtime=args.runtime, images=args.images, verify=not args.no_verify,
                      signing_key=signing_key(args), max_upload_mb=args.max_upload_mb,
                      timeout_seconds=args.timeout, max_k=args.max_k)
    return run(cfg)
