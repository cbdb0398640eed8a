"""Compact descriptors: (denoising) autoencoders trained on real features, and the Beam rewrite."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.metrics import label_precision_at_k
from index_builder.types import annoy as annoy_type
from models.autoencoders import feature_autoencoder as autoencoder
from pipelines import autoencode, index
from search.embedder import open_embedder
from search.searcher import Searcher
from transforms import features_io
from transforms.feature_sets import feature_files


@pytest.fixture(scope="module")
def flowers_matrix(flowers_features):
    out, manifest = flowers_features
    tables = [features_io.read_table(p) for p in feature_files(str(out), manifest)]
    table = pa.concat_tables(tables)
    return features_io.feature_matrix(table), table.column("label").to_pylist()


@pytest.mark.parametrize("denoise", [{}, {"noise_stddev": 0.02, "mask_fraction": 0.2}])
def test_codes_keep_retrieval_quality(flowers_matrix, denoise):
    x, labels = flowers_matrix
    cfg = autoencoder.AutoencoderConfig(code_dim=32, epochs=20, **denoise)
    trained = autoencoder.train(x, cfg)
    assert trained.history["val_loss"][-1] < trained.history["val_loss"][0]
    codes = trained.encode(x)
    assert codes.shape == (720, 32)
    assert cfg.denoising == bool(denoise)
    # 8x smaller than the 256-d features, still far above chance (0.11) for same-label neighbours.
    assert label_precision_at_k(codes, labels) > 0.5


def test_too_few_vectors_is_an_error():
    with pytest.raises(ValueError, match="at least 10"):
        autoencoder.train(np.ones((3, 8), np.float32), autoencoder.AutoencoderConfig(code_dim=2))


def test_autoencode_job_rewrites_features_that_index(tmp_path, flowers, flowers_features, flowers_matrix):
    src, source_manifest = flowers_features
    out = tmp_path / "codes"
    cfg = autoencoder.AutoencoderConfig(code_dim=16, epochs=5, noise_stddev=0.01)
    m = autoencode.run(str(src), str(out), cfg)
    assert m.dimension == 16 and m.counts.ok == 720
    assert m.encoder["kind"] == "denoising_autoencoder"
    assert m.model_fingerprint != source_manifest.model_fingerprint
    table = pa.concat_tables([pq.read_table(p) for p in feature_files(str(out), m)])
    assert table.schema.field("feature").type == pa.list_(pa.float32(), 16)
    # the Beam job's codes equal the exported encoder applied directly
    encode = autoencoder.load_encoder(m.encoder["path"])
    x, _ = flowers_matrix
    ids_src = pa.concat_tables([pq.read_table(p) for p in feature_files(str(src), source_manifest)])
    order = {i: n for n, i in enumerate(ids_src.column("image_id").to_pylist())}
    direct = encode(x)[[order[i] for i in table.column("image_id").to_pylist()]]
    assert np.max(np.abs(features_io.feature_matrix(table) - direct)) < 1e-5
    im = index.run(index.IndexConfig(features=str(out), output=str(tmp_path / "index"), dims=0,
                                     type_params={"annoy": annoy_type.Params(trees=5)}))
    assert im.items == 720 and im.dimension.output == 16
    # the query path applies backbone → encoder → transform, and finds the photo itself
    with Searcher(str(tmp_path / "index")) as searcher:
        embedder = open_embedder(searcher.version_dir, searcher.manifest)
        photo = flowers / "4" / sorted(p.name for p in (flowers / "4").iterdir())[0]
        vectors, _, failures = embedder.embed_files([str(photo)])
        assert not failures and vectors.shape == (1, 16)
        top = searcher.describe(searcher.search(vectors[0], k=1, method="exact")[0], 1)
        assert top["image_id"] == f"4/{photo.name}" and top["score"] > 0.99
