"""``cbir query``: image files in, top-k neighbours out (table, JSON lines, contact sheet).

Query images are embedded by the index's own model in this process, or, with
``--serving HOST:PORT``, by a TensorFlow Serving endpoint serving ``cbir export-model``
output (gRPC or REST); either way the vectors are checked against the index's model
fingerprint before they are searched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Any

from inspection.sheet import contact_sheet, save_png
from plumbing import fsutil
from search.embedder import open_embedder
from search.options import SearchOptions
from search.searcher import Searcher

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """Where the query embedding comes from when it is not the local model."""

    address: str  # HOST:PORT (REST also takes http://HOST:PORT)
    protocol: str = "grpc"
    model_name: str = "cbir"
    signature: str = "serving_default"
    timeout: float = 30.0


def _read_or_none(uri: str) -> bytes | None:
    try:
        return fsutil.read_input(uri)
    except Exception:
        return None


def _write_bytes(path: str, data: bytes) -> None:
    fsutil.write_bytes_atomic(path, data)


def _clean_before_embedding(embedder: Any, model_dir: str) -> None:
    """``--denoise DIR``: every query image is cleaned by that denoiser, at its own size exactly as
    ``cbir denoise`` writes it (PNG), before the embedder decodes and embeds it. Bytes that do not
    decode are passed on unchanged, so the embedder reports them as it always does."""
    from models.autoencoders.denoiser import Denoiser, decode_rgb, encode_png

    denoiser = Denoiser.load(model_dir, read=fsutil.read_bytes)
    embed_bytes = embedder.embed_bytes

    def cleaned(blobs: list[bytes]):
        out = []
        for data in blobs:
            try:
                rgb = decode_rgb(data)
            except Exception:  # not an image: the embedder's own decode names the failure
                out.append(data)
                continue
            out.append(encode_png(denoiser.clean(rgb)))
        return embed_bytes(out)

    embedder.embed_bytes = cleaned


def run_query(
    index: str,
    images: list[str],
    opts: SearchOptions | None = None,
    version: str | None = None,
    weights_dir: str | None = None,
    sheet: str | None = None,
    verify: bool = True,
    serving: ServingOptions | None = None,
    signing_key: bytes | None = None,
    model: str | None = None,
    runtime: str = "auto",
    like: tuple[str, ...] = (),
    unlike: tuple[str, ...] = (),
    denoise: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Returns (result rows, failures, timings); all images go through the model as one batch
    (with ``serving``, as batches of requests to TF Serving).

    ``like`` / ``unlike`` are image ids of indexed results marked relevant / not relevant
    (relevance feedback, applied to every query). With ``opts.rerank.verify``, each query image's
    local features are extracted as the index's were and the top N verified geometrically.
    """
    t0 = time.perf_counter()
    searcher = Searcher(index, version=version, verify=verify, signing_key=signing_key)
    t1 = time.perf_counter()
    if serving is None:
        embedder = open_embedder(searcher.version_dir, searcher.manifest, weights_dir, model=model, runtime=runtime)
    else:
        from search.tf_serving import ServingEmbedder, make_client

        client = make_client(serving.address, serving.protocol, serving.model_name, serving.signature,
                             timeout=serving.timeout)
        embedder = ServingEmbedder(searcher.version_dir, searcher.manifest, client)
    if denoise:
        _clean_before_embedding(embedder, denoise)
    t2 = time.perf_counter()
    try:
        vectors, ok_paths, failures = embedder.embed_files(images)
    finally:
        if serving is not None:
            embedder.close()
    t3 = time.perf_counter()
    rows = []
    opts = searcher.options(opts)
    if opts.rerank.verify and not searcher.capabilities["verify"]:
        raise ValueError(f"{index} carries no local features, so --verify cannot run: extract with "
                         "--local-features K (e.g. 256), then rebuild the index from those features")
    like_ids, unlike_ids = _marked(searcher, like), _marked(searcher, unlike)
    for path, vec in zip(ok_paths, vectors, strict=True):
        local = searcher.query_local_features(fsutil.read_input(path)) if opts.rerank.verify else None
        hits = searcher.search(vec, opts, like=like_ids, unlike=unlike_ids, local=local)
        rows.append({"query": path, "results": [searcher.describe(h, r + 1) for r, h in enumerate(hits)]})
    t4 = time.perf_counter()
    if sheet:
        save_png(contact_sheet(rows, _read_or_none), sheet, _write_bytes)
    timings = {"open_s": t1 - t0, "load_model_s": t2 - t1, "embed_s": t3 - t2, "search_s": t4 - t3,
               "queries": len(rows)}
    fails = [{"query": f.path, "error": f.error, "message": f.message} for f in failures]
    return rows, fails, timings


def _marked(searcher: Searcher, image_ids: tuple[str, ...]) -> list[int]:
    """Global ids of feedback marks given as image ids; an id the index does not hold is a usage error."""
    out = []
    for image_id in image_ids:
        try:
            out.append(searcher.find(image_id))
        except KeyError:
            raise ValueError(f"--like / --unlike: {image_id!r} is not in {searcher.version_dir}") from None
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        verified = any("inliers" in r for r in row["results"])
        lines.append(f"query: {row['query']}")
        lines.append(f"  {'rank':>4}  {'score':>7}  " + ("inliers  " if verified else "") + f"{'label':<16} image_id")
        for r in row["results"]:
            inl = (f"{r['inliers']:>7}  " if r.get("inliers") is not None else f"{'-':>7}  ") if verified else ""
            lines.append(f"  {r['rank']:>4}  {r['score']:>7.4f}  {inl}{str(r['label'] or '-'):<16} {r['image_id']}")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    from pipelines.options import add_runtime_arg, add_search_args, add_signing_arg

    q = subparsers.add_parser("query", help="image files → nearest neighbours")
    q.add_argument("--index", required=True)
    q.add_argument("images", nargs="+")
    add_search_args(q)
    q.add_argument("--json", action="store_true", help="one JSON object per query")
    q.add_argument("--sheet", default=None, help="write a contact sheet PNG")
    q.add_argument("--version", default=None, help="index version (default: LATEST)")
    q.add_argument("--no-verify", action="store_true", help="check file sizes only, not digests")
    q.add_argument("--weights-dir", default=None)
    q.add_argument("--model", default=None,
                   help="savedmodel:PATH for an index built with a SavedModel backbone (never taken from the index)")
    add_runtime_arg(q)
    add_signing_arg(q)
    q.add_argument("--denoise", default=None, metavar="DIR",
                   help="clean query images with this cbir train-autoencoder --noise output before embedding them")
    q.add_argument("--like", nargs="+", default=[], metavar="IMAGE_ID",
                   help="relevance feedback: indexed results marked relevant (the query moves toward them)")
    q.add_argument("--unlike", nargs="+", default=[], metavar="IMAGE_ID",
                   help="relevance feedback: results marked not relevant (the query moves away from them; "
                        "they are not shown again)")
    q.add_argument("--feedback-weights", default=None, metavar="A,B,G",
                   help="Rocchio weights of the query, the relevant and the not-relevant mean (default 1,0.75,0.25)")
    q.add_argument("--feedback-kernel", default=None, metavar="P,C",
                   help="re-score the moved query's top 500 by mean cos^P to the query and liked results minus C times "
                        "that to the unliked (default 5,3; 0,0: Rocchio's order alone)")
    q.add_argument("--serving", default=None, metavar="HOST:PORT",
                   help="embed the queries with TensorFlow Serving (cbir export-model) instead of the local model")
    q.add_argument("--serving-protocol", choices=("grpc", "rest"), default="grpc",
                   help="grpc (TF Serving port 8500) or rest (port 8501)")
    q.add_argument("--serving-model", default="cbir", help="the model name TF Serving serves it under")
    q.add_argument("--serving-signature", default="serving_default",
                   help="serving_default (transform applied here) or transformed (exported with --index)")
    q.set_defaults(handler=main, beam=False)


def main(args: Any, beam_args: list[str]) -> int:
    from pipelines.options import search_options, signing_key
    from search.tf_serving import ServingError

    serving = None
    if args.serving:
        serving = ServingOptions(args.serving, args.serving_protocol, args.serving_model, args.serving_signature)
    try:
        rows, failures, timings = run_query(
            args.index, args.images, search_options(args), version=args.version, weights_dir=args.weights_dir,
            sheet=args.sheet, verify=not args.no_verify, serving=serving, signing_key=signing_key(args),
            model=args.model, runtime=args.runtime, like=tuple(args.like), unlike=tuple(args.unlike),
            denoise=args.denoise,
        )
    except ServingError as exc:
        print(f"cbir query: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows))
        print(f"{timings['queries']} queries: embed {timings['embed_s']:.2f}s, search {timings['search_s']*1e3:.1f} ms"
              f" (index open {timings['open_s']:.2f}s, model load {timings['load_model_s']:.2f}s)")
        if args.sheet:
            print(f"contact sheet: {args.sheet}")
    for f in failures:
        print(f"could not read {f['query']}: {f['error']}: {f['message']}", file=sys.stderr)
    return 1 if failures and not rows else 0
