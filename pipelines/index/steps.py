"""The index job's launcher-side steps, between and after the Beam passes.

They run on the launcher because each needs the whole corpus or the fit's one result at
once: the transform read back off ``transform_fn`` as data (and the LSH projection fitted
on the sample), database-side augmentation (DBA) and the corpus k-NN graph. Everything
they write goes under the build's staging folder and is published with the shards.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from artefacts import layout
from artefacts.manifests import FeaturesManifest
from artefacts.transform import (
    BIAS_FILE,
    CHECK_TOLERANCE,
    PROJECTION_FILE,
    VectorTransform,
    max_difference,
    probe_matrices,
)
from index_builder import augment, lsh
from pipelines.index.config import IndexBuildError, IndexConfig
from pipelines.index.graphs import SAMPLE_FILE
from pipelines.index.publishing import choose_attempts
from plumbing import fsutil

log = logging.getLogger(__name__)

AUGMENTED_DIR = "_augmented"  # --dba: the augmented vectors the shards are rebuilt from (not published)


def copy_encoder(features_manifest: FeaturesManifest, staging: str) -> None:
    """An index of autoencoder codes carries the encoder as data, so a query never loads it from elsewhere."""
    encoder = features_manifest.encoder
    if not encoder:
        return
    from models.autoencoders.feature_autoencoder import ENCODER_DATA_DIR, weights_digest

    source = fsutil.join(encoder["path"], encoder.get("weights", ENCODER_DATA_DIR))
    local = fsutil.localise_tree(source)
    if weights_digest(local) != encoder.get("weights_digest"):
        raise IndexBuildError(f"the encoder data at {source} is not the encoder these codes were made with "
                              "(weights digest differs): re-run cbir autoencode")
    for name in sorted(os.listdir(local)):
        fsutil.write_bytes_atomic(fsutil.join(staging, layout.ENCODER_DIR, name),
                                  fsutil.read_bytes(os.path.join(local, name)))


def transform_as_data(cfg: IndexConfig, staging: str, dim_in: int, dim_out: int
                      ) -> tuple[VectorTransform, np.ndarray, np.ndarray]:
    """Reads the fitted transform off our own transform_fn, checks it, fits LSH; writes both as .npy.

    Queries apply the transform as numpy data, never the tf.Transform graph, so the two must
    agree on real rows (the fit's sample) before anything is built with it.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    local = fsutil.localise_tree(staging) if "://" in staging else staging
    graph = tft.TFTransformOutput(local)  # the SavedModel this very job just wrote: ours to load

    def run_graph(x: np.ndarray, output: str) -> np.ndarray:
        out = graph.transform_raw_features({"feature": tf.constant(np.asarray(x, np.float32))},
                                           drop_unused_features=True)
        return out[output].numpy()

    sample = fsutil.read_npy(fsutil.join(staging, SAMPLE_FILE))
    fsutil.delete_quietly([fsutil.join(staging, SAMPLE_FILE)])
    if cfg.dims:
        projection, bias = probe_matrices(lambda x: run_graph(x, "projected"), dim_in)
        transform = VectorTransform(projection, bias)
        fsutil.write_npy(fsutil.join(staging, layout.TRANSFORM_DATA_DIR, PROJECTION_FILE), projection)
        fsutil.write_npy(fsutil.join(staging, layout.TRANSFORM_DATA_DIR, BIAS_FILE), bias)
    else:
        transform = VectorTransform()
    check = sample[:512]
    diff = max_difference(transform(check), run_graph(check, "feature"))
    if diff > CHECK_TOLERANCE:
        raise IndexBuildError(f"the transform as data differs from transform_fn by {diff:.2e} (more than "
                              f"{CHECK_TOLERANCE:g}) on {len(check)} rows: nothing was published")
    log.info("transform as data matches transform_fn on %d rows (max |diff| %.1e)", len(check), diff)
    lsh_params = cfg.params_of("lsh")  # the projection is fitted even without LSH codes: SHARD.json records its width
    planes, offsets = lsh.fit_projection(transform(sample), lsh_params.bits, cfg.seed, lsh_params.projection)
    fsutil.write_npy(fsutil.join(staging, layout.LSH_PLANES), planes)
    fsutil.write_npy(fsutil.join(staging, layout.LSH_OFFSETS), offsets)
    return transform, planes, offsets


def load_attempts(attempts: list[tuple[str, dict[str, Any]]]) -> tuple[np.ndarray, list[Any]]:
    """Every chosen attempt's vectors (float32, global order = shard order) and id-map tables."""
    import io

    import pyarrow.parquet as pq

    vectors, idmaps = [], []
    for folder, _ in attempts:
        vectors.append(fsutil.read_npy(fsutil.join(folder, layout.VECTORS_FILE)).astype(np.float32))
        idmaps.append(pq.read_table(io.BytesIO(fsutil.read_bytes(fsutil.join(folder, layout.IDMAP_FILE)))))
    dim = vectors[0].shape[1] if vectors else 0
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), idmaps


def augment_vectors(cfg: IndexConfig, staging: str, attempts: list[tuple[str, dict[str, Any]]]
                    ) -> tuple[list[str], dict[str, Any]]:
    """DBA on the launcher over the first pass's vectors; writes the augmented rows, one Parquet per shard.

    Returns the Parquet files the next pass builds the shards from and what the manifest
    records of the augmentation. Memory: the corpus's vectors as float32 plus the neighbour
    search (exact up to ``augment.EXACT_UP_TO`` items, an HNSW graph beyond), i.e. about
    1 GB per million items at 128 dimensions.
    """
    started = time.monotonic()
    vectors, idmaps = load_attempts(attempts)
    ids, sims = augment.knn(vectors, cfg.dba)
    augmented = augment.dba(vectors, ids, sims, cfg.dba, cfg.dba_alpha)
    del vectors, ids, sims
    out, lo = [], 0
    for s, idmap in enumerate(idmaps):
        n = idmap.num_rows
        out.append(_write_augmented(fsutil.join(staging, AUGMENTED_DIR, f"part-{s:05d}.parquet"), idmap,
                                    augmented[lo:lo + n]))
        lo += n
    info = {"k": cfg.dba, "alpha": cfg.dba_alpha, "neighbours": augment.method_for(len(augmented)),
            "seconds": round(time.monotonic() - started, 3)}
    log.info("DBA (k=%d, alpha=%g) over %d items in %.1fs", cfg.dba, cfg.dba_alpha, len(augmented), info["seconds"])
    return out, info


def _write_augmented(path: str, idmap: Any, block: np.ndarray) -> str:
    """One shard's augmented vectors as feature rows (the id map's columns beside them), so a pass reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "image_id": idmap.column("image_id"), "uri": idmap.column("uri"), "label": idmap.column("label"),
        "sha256": idmap.column("sha256"),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1), pa.float32()),
                                                     block.shape[1] if block.ndim == 2 else 0),
    })
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    fsutil.write_bytes_atomic(path, buf.getvalue().to_pybytes())
    return path


def knn_graph(cfg: IndexConfig, staging: str) -> dict[str, Any]:
    """The k-NN graph of the stored vectors (global ids), for diffusion; written under ``staging/graph/``."""
    started = time.monotonic()
    vectors, _ = load_attempts(choose_attempts(staging, cfg.shards))
    ids, sims = augment.knn(vectors, cfg.graph_k)
    fsutil.write_npy(fsutil.join(staging, layout.GRAPH_NEIGHBOURS), ids.astype(np.int32))
    fsutil.write_npy(fsutil.join(staging, layout.GRAPH_SIMILARITIES), np.where(ids >= 0, sims, 0).astype(np.float16))
    info = {"k": cfg.graph_k, "neighbours": layout.GRAPH_NEIGHBOURS, "similarities": layout.GRAPH_SIMILARITIES,
            "built_on": "the stored vectors" + (" (after DBA)" if cfg.dba else ""),
            "method": augment.method_for(len(vectors)), "seconds": round(time.monotonic() - started, 3)}
    log.info("k-NN graph (k=%d) of %d items in %.1fs", cfg.graph_k, len(vectors), info["seconds"])
    return info
