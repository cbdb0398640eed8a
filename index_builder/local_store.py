"""Local features inside an index shard: three arrays in dense-id order, memory-mapped when read.

``local_offsets.npy`` (n + 1, int64): item i's keypoints are rows ``offsets[i]:offsets[i+1]`` of
``local_points.npy`` ((m, 2) float32, pixels of the item's ≤512 px frame) and
``local_descriptors.npy`` ((m, 128) uint8, raw SIFT). An item without local features (none
extracted, or a flat image with no keypoint) has an empty range. Verification reads only
the rows of the candidates it checks, so a query never loads a shard's descriptors whole.

Beside them, ``local_votes.faiss`` indexes every descriptor (as RootSIFT) under its item's
dense id, so a query's descriptors can *propose* candidates by votes (:func:`votes`): an
edited copy whose global descriptor has drifted out of the top N (a crop, a rotation) still
shares local features with its original. Up to :data:`EXACT_VOTES_UP_TO` descriptors it is
exact (``IndexFlatIP``), beyond an inverted file over 8-bit scalar-quantised vectors
(``IVF√m,SQ8``: a quarter of the float bytes, opened memory-mapped; :func:`vote_index_kind`).

Pure numpy and faiss: the index build writes these from Parquet rows (``extract
--local-features``), the searcher reads them; neither needs OpenCV.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

OFFSETS_FILE = "local_offsets.npy"
POINTS_FILE = "local_points.npy"
DESCRIPTORS_FILE = "local_descriptors.npy"
FILES = (OFFSETS_FILE, POINTS_FILE, DESCRIPTORS_FILE)
VOTES_FILE = "local_votes.faiss"  # recorded as the manifest's local_features["vote_index"]; older indexes lack it
DESCRIPTOR_DIM = 128
EXACT_VOTES_UP_TO = 50_000
VOTE_NPROBE = 16
VOTE_RATIO = 0.8  # Lowe's ratio test on a query descriptor's two nearest stored descriptors
TRAIN_PER_LIST = 64  # k-means samples per inverted list (faiss warns below 39)

# Parquet rows of <features>/local/part-*.parquet, one per image the extract job read
LOCAL_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("sha256", pa.string()),
    ("keypoints", pa.int32()),
    ("width", pa.int32()),  # the decoded frame the points live in
    ("height", pa.int32()),
    ("points", pa.binary()),  # little-endian float32 (keypoints, 2)
    ("descriptors", pa.binary()),  # uint8 (keypoints, 128)
    pa.field("error", pa.string(), nullable=True),  # why there are none (a decode failure), else null
])


def write_shard(out_dir: str, image_ids: list[str], sha256: list[str], rows: pa.Table | None) -> dict[str, int]:
    """Writes the three arrays for a shard's items (dense-id order) from its local-feature rows.

    A row counts for an item when its image id and sha256 both match (features and local
    features of one image version); other rows are left out. Returns counts for SHARD.json.
    """
    n = len(image_ids)
    by_id: dict[str, tuple[bytes, bytes]] = {}
    if rows is not None and rows.num_rows:
        ids = rows.column("image_id").to_pylist()
        digests = rows.column("sha256").to_pylist()
        points = rows.column("points").to_pylist()
        descs = rows.column("descriptors").to_pylist()
        want = dict(zip(image_ids, sha256, strict=True))
        for i, d, p, q in zip(ids, digests, points, descs, strict=True):
            if want.get(i) == d and p is not None and q is not None:
                by_id[i] = (p, q)
    counts = np.zeros(n, np.int64)
    point_parts, desc_parts = [], []
    for i, image_id in enumerate(image_ids):
        found = by_id.get(image_id)
        if found is None:
            continue
        p = np.frombuffer(found[0], dtype="<f4").reshape(-1, 2)
        d = np.frombuffer(found[1], dtype=np.uint8).reshape(-1, DESCRIPTOR_DIM)
        if len(p) != len(d):
            raise ValueError(f"{image_id}: {len(p)} keypoints but {len(d)} descriptors")
        counts[i] = len(p)
        point_parts.append(p)
        desc_parts.append(d)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    np.save(os.path.join(out_dir, OFFSETS_FILE), offsets)
    np.save(os.path.join(out_dir, POINTS_FILE),
            np.concatenate(point_parts).astype(np.float32) if point_parts else np.zeros((0, 2), np.float32))
    np.save(os.path.join(out_dir, DESCRIPTORS_FILE),
            np.concatenate(desc_parts) if desc_parts else np.zeros((0, DESCRIPTOR_DIM), np.uint8))
    return {"items_with_local_features": int(len(by_id)), "keypoints": int(offsets[-1])}


class ShardLocal:
    """One shard's local features, memory-mapped; rows are read per item on demand."""

    def __init__(self, shard_dir: str, n: int):
        self.offsets = np.load(os.path.join(shard_dir, OFFSETS_FILE), mmap_mode="r")
        self.points = np.load(os.path.join(shard_dir, POINTS_FILE), mmap_mode="r")
        self.descriptors = np.load(os.path.join(shard_dir, DESCRIPTORS_FILE), mmap_mode="r")
        m = int(self.offsets[-1]) if len(self.offsets) else 0
        if (len(self.offsets) != n + 1 or self.points.shape != (m, 2)
                or self.descriptors.shape != (m, DESCRIPTOR_DIM) or np.any(np.diff(self.offsets) < 0)):
            raise ValueError(f"{shard_dir}: local feature arrays do not describe {n} items "
                             f"(offsets {self.offsets.shape}, points {self.points.shape}, "
                             f"descriptors {self.descriptors.shape})")

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.points[lo:hi], np.float32), np.asarray(self.descriptors[lo:hi], np.uint8)


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (L1-normalise, square root): unit L2 norm, so inner product ranks like Hellinger's kernel."""
    d = np.asarray(descriptors, np.float32)
    d = d / np.maximum(d.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(d)


def vote_index_kind(m: int) -> str:
    """The faiss index for ``m`` descriptors: exact when small, else an inverted file of √m lists.

    √m lists keep both the k-means training (on :data:`TRAIN_PER_LIST` samples a list) and a
    query's scan (:data:`VOTE_NPROBE` lists of ~√m descriptors each) growing with √m; beyond
    4,096 lists the coarse assignment goes through an HNSW graph of the centroids, so adding
    100k images' descriptors does not compare each with every centroid.
    """
    if m <= EXACT_VOTES_UP_TO:
        return "flat"
    lists = int(np.sqrt(m))
    return f"IVF{lists}_HNSW32,SQ8" if lists > 4096 else f"IVF{lists},SQ8"


def write_vote_index(out_dir: str, seed: int = 0) -> dict[str, object]:
    """Builds ``local_votes.faiss`` from the shard's descriptor arrays (written just before)."""
    import faiss

    offsets = np.load(os.path.join(out_dir, OFFSETS_FILE))
    descriptors = np.load(os.path.join(out_dir, DESCRIPTORS_FILE), mmap_mode="r")
    m = int(offsets[-1])
    owners = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    kind = vote_index_kind(m)
    if kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(DESCRIPTOR_DIM))
    else:
        index = faiss.index_factory(DESCRIPTOR_DIM, kind, faiss.METRIC_INNER_PRODUCT)
        lists = faiss.extract_index_ivf(index).nlist
        sample = np.sort(np.random.default_rng(seed).choice(m, size=min(m, TRAIN_PER_LIST * lists), replace=False))
        index.train(root_sift(descriptors[sample]))
    for lo in range(0, m, 1 << 18):  # bounded memory: a quarter million descriptors at a time
        hi = min(m, lo + (1 << 18))
        index.add_with_ids(root_sift(descriptors[lo:hi]), owners[lo:hi])
    faiss.write_index(index, os.path.join(out_dir, VOTES_FILE))
    return {"descriptors": m, "kind": kind}


def open_vote_index(shard_dir: str):
    """The shard's vote index, memory-mapped where faiss can (the inverted lists)."""
    import faiss

    path = os.path.join(shard_dir, VOTES_FILE)
    try:
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # a flat index cannot be memory-mapped: read it
        index = faiss.read_index(path)
    if index.d != DESCRIPTOR_DIM:
        raise ValueError(f"{path}: vote index of dimension {index.d}, not {DESCRIPTOR_DIM}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = VOTE_NPROBE
    return index


def votes(index, root: np.ndarray, n_items: int) -> np.ndarray:
    """Per item of the shard, how many query descriptors (RootSIFT rows) have it as a ratio-tested match."""
    out = np.zeros(n_items, np.int64)
    if not len(root) or index.ntotal < 2:
        return out
    sims, ids = index.search(np.ascontiguousarray(root, np.float32), 2)
    first, second = 2.0 - 2.0 * sims[:, 0], 2.0 - 2.0 * sims[:, 1]  # squared distances of unit vectors
    keep = (ids[:, 0] >= 0) & (first < VOTE_RATIO * VOTE_RATIO * second)
    np.add.at(out, ids[keep, 0], 1)
    return out
