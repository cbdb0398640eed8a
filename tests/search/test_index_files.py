"""An index is data only: opening it never runs code it carries, and any change to it is refused."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from artefacts import layout, signing
from index_builder.types import annoy as annoy_type
from pipelines import index
from plumbing.lease import LEASE_FILE, Lease, LeaseHeldError
from search.index_files import verify_files
from search.searcher import Searcher


def _copy(flowers_index, tmp_path):
    out, manifest = flowers_index
    root = tmp_path / "index"
    shutil.copytree(out, root)
    return root, root / manifest.version


def _rehash(version_dir) -> None:
    """What an attacker with write access does after changing files: make the digests match again."""
    path = version_dir / layout.MANIFEST
    manifest = json.loads(path.read_text())
    for rel in list(manifest["files"]):
        digest, size = layout.sha256_file(str(version_dir / rel))
        manifest["files"][rel] = {"sha256": digest, "bytes": size}
    path.write_text(json.dumps(manifest))


def test_queries_never_load_the_transform_graph_an_index_carries(flowers_index, tmp_path, weights_dir, flowers,
                                                                  monkeypatch):
    import tensorflow as tf

    root, version_dir = _copy(flowers_index, tmp_path)
    for pb in (version_dir / layout.TRANSFORM_DIR).rglob("saved_model.pb"):
        pb.write_bytes(b"\x0a\x05crafted: any graph at all, e.g. one that calls tf.io.write_file")
    _rehash(version_dir)

    def refuse(*args, **kwargs):
        raise AssertionError(f"the query path loaded a SavedModel: {args}")

    monkeypatch.setattr(tf.saved_model, "load", refuse)
    with Searcher(str(root)) as s:
        embedder = s.open_embedder(weights_dir)
        vectors, ok, failures = embedder.embed_files([str(flowers / "2" / "image_0161.jpg")])
        assert not failures and s.search(vectors[0], k=1)[0].score > 0.99


def test_entries_removed_from_the_manifest_are_refused(flowers_index, tmp_path):
    root, version_dir = _copy(flowers_index, tmp_path)
    manifest = json.loads((version_dir / layout.MANIFEST).read_text())
    for name in (layout.ANNOY_FILE, layout.VECTORS_FILE):
        rel = f"{layout.shard_dir(0)}/{name}"
        del manifest["files"][rel]
        data = bytearray((version_dir / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (version_dir / rel).write_bytes(bytes(data))
    (version_dir / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(layout.IndexIntegrityError, match="does not list 2 required file") as info:
        Searcher(str(root))
    assert "annoy.ann" in str(info.value) and "vectors.f16.npy" in str(info.value)


def test_a_file_slipped_into_a_shard_is_refused(flowers_index, tmp_path):
    root, version_dir = _copy(flowers_index, tmp_path)
    (version_dir / layout.shard_dir(1) / "extra.npy").write_bytes(b"planted")
    with pytest.raises(layout.IndexIntegrityError, match="not in the manifest.*extra.npy"):
        Searcher(str(root), verify=False)


def test_signed_versions(flowers_features, tmp_path):
    key_file, other_file = tmp_path / "key", tmp_path / "other"
    key_file.write_bytes(os.urandom(32))
    other_file.write_bytes(os.urandom(32))
    out = tmp_path / "index"
    m = index.run(index.IndexConfig(features=str(flowers_features[0]), output=str(out), dims=16,
                                    type_params={"annoy": annoy_type.Params(trees=5)},
                                    index_types=("annoy",), target_recall=0, signing_key_file=str(key_file)))
    key, other = signing.load_key(str(key_file)), signing.load_key(str(other_file))
    Searcher(str(out), signing_key=key).close()
    Searcher(str(out)).close()  # a reader without a key does not check
    with pytest.raises(signing.SignatureError, match="another key"):
        Searcher(str(out), signing_key=other)
    manifest_path = out / m.version / layout.MANIFEST
    tampered = json.loads(manifest_path.read_text())
    tampered["annoy"]["search_k"] = 1
    manifest_path.write_text(json.dumps(tampered, indent=2, sort_keys=True) + "\n")
    with pytest.raises(signing.SignatureError, match="changed after signing"):
        Searcher(str(out), signing_key=key)
    (out / m.version / signing.SIGNATURE_FILE).unlink()
    with pytest.raises(signing.SignatureError, match="not signed"):
        Searcher(str(out), signing_key=key)
    with pytest.raises(ValueError, match="at least 16"):
        (tmp_path / "short").write_bytes(b"abc")
        signing.load_key(str(tmp_path / "short"))


def test_a_second_build_into_one_output_refuses_to_start(flowers_features, tmp_path):
    out = tmp_path / "index"
    with Lease(str(out), "v-first", ttl_seconds=3600):
        with pytest.raises(LeaseHeldError, match="v-first"):
            Lease(str(out), "v-second", ttl_seconds=3600).acquire()
        with pytest.raises(LeaseHeldError, match="two runs into one output are not supported"):
            index.run(index.IndexConfig(features=str(flowers_features[0]), output=str(out), dims=8,
                                        type_params={"annoy": annoy_type.Params(trees=2)}))
        assert sorted(p.name for p in out.iterdir()) == [LEASE_FILE]  # nothing else was written
    assert not (out / LEASE_FILE).exists()  # given back
    stale = {"version": "v-dead", "token": "x", "started": time.time() - 7200, "expires": time.time() - 10}
    (out / LEASE_FILE).write_text(json.dumps(stale))
    with Lease(str(out), "v-next", ttl_seconds=60) as lease:  # a lapsed lease is taken over
        assert json.loads((out / LEASE_FILE).read_text())["token"] == lease.token


def test_a_savedmodel_backbone_is_never_loaded_from_a_path_the_index_names(flowers_index, tmp_path):
    from search.compatibility import ModelMismatchError
    from search.embedder import open_embedder

    root, version_dir = _copy(flowers_index, tmp_path)
    with Searcher(str(root)) as s:
        manifest = s.manifest
    manifest.model = {**manifest.model, "preset": "savedmodel", "path": "/somewhere/else/model", "signature": "x",
                      "output_key": None, "input_size": 224}
    with pytest.raises(ModelMismatchError, match="never names code to load"):
        open_embedder(str(version_dir), manifest)


def test_verify_files_accepts_the_published_version(flowers_index):
    out, manifest = flowers_index
    verify_files(str(out / manifest.version), manifest)
    assert np.isfinite(manifest.elapsed_seconds)
