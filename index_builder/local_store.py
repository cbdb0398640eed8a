"""Local features inside an index shard: three arrays in dense-id order, memory-mapped when read.

``local_offsets.npy`` (n + 1, int64): item i's keypoints are rows ``offsets[i]:offsets[i+1]`` of
``local_points.npy`` ((m, 2) float32, pixels of the item's ≤512 px frame) and
``local_descriptors.npy`` ((m, 128) uint8, raw SIFT). An item without local features (none
extracted, or a flat image with no keypoint) has an empty range. Verification reads only
the rows of the candidates it checks, so a query never loads a shard's descriptors whole.

Beside them, the vote index over every descriptor (``index_builder.types.votes``).

Pure numpy: the index build writes these from Parquet rows (``extract
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
DESCRIPTOR_DIM = 128

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
