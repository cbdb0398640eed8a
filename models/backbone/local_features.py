"""Local features for geometric verification: SIFT keypoints and descriptors with OpenCV.

Global CNN descriptors say "these look alike"; local features say "these are the same
scene": a strongly cropped, rotated, re-coloured copy keeps many of its keypoints, and a
homography fitted through their matches separates a real copy from a look-alike.

SIFT was chosen by measurement over ORB (benchmarks/bench_rerank.py): on the copy set its
inlier counts separate copies from same-class photos far better, at an extraction cost
(~25 ms per 512 px photo on one core) paid once per corpus image in ``cbir extract``.

Images are decoded with the product's own limits (``models.backbone.imaging.decode_to_fit``) to a
long side of at most :data:`DEFAULT_MAX_SIDE`, aspect ratio kept, in grey. Descriptors are
stored as uint8 (OpenCV's SIFT values are integers 0..255 already) and turned into
RootSIFT (Arandjelović & Zisserman) only when matched.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from models.backbone.imaging import DEFAULT_MAX_PIXELS, decode_to_fit

DEFAULT_MAX_SIDE = 512
DESCRIPTOR_DIM = 128
DETECTOR = "sift"

_local = threading.local()  # one detector per thread: OpenCV feature detectors are not shared across threads


@dataclasses.dataclass(frozen=True)
class LocalFeatures:
    """Keypoints of one image: positions in its decoded frame and their descriptors."""

    points: np.ndarray  # (n, 2) float32, x and y in pixels of the decoded frame
    descriptors: np.ndarray  # (n, 128) uint8, raw SIFT
    width: int = 0  # the decoded frame the points live in
    height: int = 0

    def __post_init__(self) -> None:
        if self.points.ndim != 2 or self.points.shape[1] != 2:
            raise ValueError(f"points must be (n, 2), not {self.points.shape}")
        if self.descriptors.shape != (len(self.points), DESCRIPTOR_DIM):
            raise ValueError(f"{len(self.points)} points but descriptors of shape {self.descriptors.shape}")

    @property
    def size(self) -> int:
        return len(self.points)

    @classmethod
    def empty(cls) -> LocalFeatures:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_DIM), np.uint8))

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(points, descriptors) as little-endian float32 / uint8 bytes: how Parquet rows store them."""
        return self.points.astype("<f4").tobytes(), self.descriptors.astype(np.uint8).tobytes()

    @classmethod
    def from_bytes(cls, points: bytes, descriptors: bytes, width: int = 0, height: int = 0) -> LocalFeatures:
        p = np.frombuffer(points, dtype="<f4")
        d = np.frombuffer(descriptors, dtype=np.uint8)
        if p.size % 2 or d.size != (p.size // 2) * DESCRIPTOR_DIM:
            raise ValueError(f"local features of {p.size // 2} points cannot hold {d.size} descriptor bytes")
        return cls(p.reshape(-1, 2).astype(np.float32), d.reshape(-1, DESCRIPTOR_DIM), width, height)


def _detector(max_keypoints: int):
    import cv2

    cache = getattr(_local, "sift", None)
    if cache is None or cache[0] != max_keypoints:
        cache = (max_keypoints, cv2.SIFT_create(nfeatures=max_keypoints))
        _local.sift = cache
    return cache[1]


def from_grey(grey: np.ndarray, max_keypoints: int) -> LocalFeatures:
    """SIFT on a 2-D uint8 image: up to ``max_keypoints`` strongest keypoints."""
    if max_keypoints < 1:
        raise ValueError(f"max_keypoints must be at least 1, not {max_keypoints}")
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, not {grey.shape}")
    keypoints, desc = _detector(max_keypoints).detectAndCompute(grey, None)
    h, w = grey.shape
    if desc is None or not keypoints:
        return dataclasses.replace(LocalFeatures.empty(), width=w, height=h)
    # SIFT may return a few more than asked (ties at the response cut-off): keep the strongest
    order = np.argsort([-k.response for k in keypoints], kind="stable")[:max_keypoints]
    points = np.asarray([keypoints[i].pt for i in order], np.float32).reshape(-1, 2)
    descriptors = np.clip(np.rint(desc[order]), 0, 255).astype(np.uint8)
    return LocalFeatures(points, descriptors, w, h)


def from_rgb(rgb: np.ndarray, max_keypoints: int) -> LocalFeatures:
    import cv2

    return from_grey(cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2GRAY), max_keypoints)


def from_image_bytes(data: bytes, max_keypoints: int, max_side: int = DEFAULT_MAX_SIDE,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> LocalFeatures:
    """Local features of encoded image bytes (raises ``ImageDecodeError`` like every decode)."""
    decoded = decode_to_fit(data, max_side, max_pixels)
    return from_rgb(decoded.pixels, max_keypoints)
