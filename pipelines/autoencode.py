"""``cbir autoencode``: learn compact descriptors and rewrite a feature set with them.

1. trains an autoencoder (denoising with ``--noise``/``--mask``) on a sample of the
   features on the launcher;
2. exports the encoder as a SavedModel under ``<out>/encoder/``;
3. a Beam job encodes every feature row and writes ``<out>/features`` in the usual
   layout and schema, so ``cbir index --features <out>`` indexes the codes.

The output manifest keeps the backbone description and adds the encoder's, and its
model fingerprint covers both, so an index of codes is never mixed with raw features.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from artefacts.manifests import Accounting, ExtractCounts, FeaturesManifest, new_run_id, utc_now
from artefacts.vector_space import encoder_fingerprint
from models.autoencoders import feature_autoencoder as autoencoder
from models.backbone.weights import file_digest
from pipelines.runner import pipeline_options
from plumbing import fsutil
from plumbing import publish as protocol
from transforms import features_io
from transforms.feature_sets import feature_files, read_features_manifest
from transforms.records import FeatureRow, ImageMeta

log = logging.getLogger(__name__)


class EncodeTableFn(beam.DoFn):
    """Arrow feature table → FeatureRows of codes; the encoder's data loads once per worker (numpy, no TF)."""

    def __init__(self, weights_dir: str):
        self._dir = weights_dir
        self._rows = Metrics.counter("cbir", "encoded")

    def setup(self):
        self._encode = autoencoder.NumpyEncoder.load(self._dir, read=fsutil.read_bytes)

    def process(self, table):
        codes = self._encode(features_io.feature_matrix(table))
        cols = {c: table.column(c).to_pylist() for c in ("image_id", "uri", "label", "sha256", "width", "height")}
        for i in range(table.num_rows):
            meta = ImageMeta(cols["image_id"][i], cols["uri"][i], cols["label"][i], cols["sha256"][i],
                             cols["width"][i], cols["height"][i])
            yield FeatureRow(meta, codes[i].astype(np.float32))
        self._rows.inc(table.num_rows)


def _load_sample(files: list[str], limit: int, seed: int) -> np.ndarray:
    tables = features_io.iter_tables(files, ["feature"])
    x = np.concatenate([features_io.feature_matrix(t) for t in tables])
    if len(x) > limit:
        x = x[np.random.default_rng(seed).choice(len(x), limit, replace=False)]
    return x


def run(features: str, output: str, cfg: autoencoder.AutoencoderConfig, train_sample: int = 200_000,
        beam_args: list[str] | None = None) -> FeaturesManifest:
    source = read_features_manifest(features)
    files = feature_files(features, source)
    started = time.time()
    x = _load_sample(files, train_sample, cfg.seed)
    trained = autoencoder.train(x, cfg)
    run_id = new_run_id()
    staging = protocol.staging_dir(output, run_id)
    local = tempfile.mkdtemp(prefix="cbir-encoder-")
    try:
        autoencoder.export(trained, local, {"source_fingerprint": source.model_fingerprint})
        autoencoder.export_weights(trained, os.path.join(local, autoencoder.ENCODER_DATA_DIR))
        encoder_digest = autoencoder.weights_digest(os.path.join(local, autoencoder.ENCODER_DATA_DIR))
        encoder_dir = fsutil.join(staging, "encoder")
        for root, _, names in os.walk(local):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), local)
                with open(os.path.join(root, name), "rb") as f:
                    fsutil.write_bytes_atomic(fsutil.join(encoder_dir, rel), f.read())
    finally:
        shutil.rmtree(local, ignore_errors=True)
    p = beam.Pipeline(options=pipeline_options(beam_args))
    (
        p
        | "Files" >> beam.Create(files)
        | "Read" >> beam.io.ReadAllFromParquetBatched()
        | "Encode" >> beam.ParDo(EncodeTableFn(fsutil.join(encoder_dir, autoencoder.ENCODER_DATA_DIR)))
        | "Write" >> features_io.WriteFeatureParquet(fsutil.join(staging, "features", "part"),
                                                     features_io.feature_schema(cfg.code_dim))
    )
    try:
        result = p.run()
        result.wait_until_finish()
        return _publish(output, run_id, staging, encoder_dir, source, features, cfg, trained, encoder_digest,
                        time.time() - started, result)
    except BaseException:
        protocol.discard_staging(staging)
        raise


def _publish(output: str, run_id: str, staging: str, encoder_dir: str, source: FeaturesManifest, features: str,
             cfg: autoencoder.AutoencoderConfig, trained: Any, encoder_digest: str, elapsed: float,
             result: Any) -> FeaturesManifest:
    staged = protocol.count_staged(staging, ["features"], run_id)
    rows = sum(p.rows for _, p in staged["features"])
    rows_in = sum(p.rows for p in source.parts("features"))
    from plumbing import job_metrics

    encoded = job_metrics.collect(result, ("cbir",), distributions=False).get("encoded")
    checked = {"source rows": rows_in, "encoded (counter)": encoded, "rows written": rows}
    protocol.check_counts("autoencode", checked)
    # The encoder replaces any earlier one only at the commit, like the parts.
    final_encoder = fsutil.join(output, "encoder", run_id)
    encoder_files = fsutil.match(fsutil.join(encoder_dir, "**"))
    moves = [(src, fsutil.join(final_encoder, src[len(encoder_dir) + 1:])) for src in encoder_files]
    encoder_desc = {"kind": "denoising_autoencoder" if cfg.denoising else "autoencoder",
                    "config": dataclasses.asdict(cfg), "weights_digest": encoder_digest,
                    "weights": autoencoder.ENCODER_DATA_DIR,
                    "saved_model_digest": file_digest(fsutil.join(encoder_dir, "saved_model.pb"))
                    if "://" not in encoder_dir else None,
                    "path": final_encoder, "val_loss": min(trained.history["val_loss"]),
                    "source_fingerprint": source.model_fingerprint}
    manifest = FeaturesManifest(
        run_id=run_id,
        created_utc=utc_now(),
        model={**source.model, "encoder": encoder_desc},
        model_fingerprint=encoder_fingerprint(source.model_fingerprint, encoder_digest),
        input_size=source.input_size,
        preprocessing=source.preprocessing,
        precision=source.precision,
        source_features=features,
        dimension=cfg.code_dim,
        feature_dtype="float32",
        counts=ExtractCounts(read=rows, ok=rows, failed=0, inputs=rows_in),
        elapsed_seconds=round(elapsed, 3),
        files={"features": [p for _, p in staged["features"]], "failures": []},
        accounting=Accounting("upstream manifest", len(source.parts("features")), rows_in, checked),
    )
    old_encoders = [m.rsplit("/", 1)[0] for m in fsutil.match(fsutil.join(output, "encoder", "*", "saved_model.pb"))]
    stale = protocol.stale_parts(output, ["features", "failures"], [p.path for p in manifest.files["features"]])
    protocol.commit(output, manifest, moves + protocol.part_moves(output, staged), staging, stale=stale)
    for folder in old_encoders:
        if folder != final_encoder:
            fsutil.delete_tree(folder)
    return manifest


def register(sub: Any) -> None:
    p = sub.add_parser("autoencode", help="learn compact (optionally denoising) codes and rewrite features")
    p.add_argument("--features", required=True, help="an extract output folder")
    p.add_argument("--output", required=True)
    p.add_argument("--code-dim", type=int, default=64)
    p.add_argument("--hidden", default="512", help="comma-separated hidden widths")
    p.add_argument("--noise", type=float, default=0.0, help="denoising: Gaussian noise stddev on the input")
    p.add_argument("--mask", type=float, default=0.0, help="denoising: fraction of input dims zeroed")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-sample", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(handler=_main, beam=True)


def _main(args, beam_args: list[str]) -> int:
    cfg = autoencoder.AutoencoderConfig(
        code_dim=args.code_dim, hidden=tuple(int(h) for h in args.hidden.split(",") if h),
        noise_stddev=args.noise, mask_fraction=args.mask, epochs=args.epochs, seed=args.seed,
    )
    m = run(args.features, args.output, cfg, args.train_sample, beam_args)
    enc = m.encoder
    print(f"autoencode: {m.counts.ok} rows → {m.dimension}-d codes ({enc['kind']}, "
          f"val loss {enc['val_loss']:.5f}) in {m.elapsed_seconds:.1f}s; encoder {enc['path']}")
    return 0
