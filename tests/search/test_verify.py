"""Geometric verification on real photos: copies verify, look-alikes do not, and the score is symmetric."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from models.backbone import local_features as lf
from models.backbone.imaging import ImageDecodeError
from search import verify

CLASS = "3"
PHOTOS = [f"image_{n:04d}.jpg" for n in range(241, 251)]  # ten photos of one flower class


def _jpeg(im: Image.Image, quality: int = 60) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _edited_copy(data: bytes) -> bytes:
    """A third of the area, rotated 20°, darker, re-encoded at low quality."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    crop = im.crop((w // 5, h // 6, w // 5 + int(w * 0.6), h // 6 + int(h * 0.55)))
    crop = crop.rotate(20, resample=Image.Resampling.BILINEAR, expand=True)
    return _jpeg(ImageEnhance.Brightness(crop).enhance(0.7), quality=40)


@pytest.fixture(scope="module")
def photos(flowers) -> list[bytes]:
    return [(flowers / CLASS / name).read_bytes() for name in PHOTOS]


@pytest.fixture(scope="module")
def features(photos) -> list[lf.LocalFeatures]:
    return [lf.from_image_bytes(p, 256) for p in photos]


def test_an_edited_copy_ranks_its_original_first_among_same_class_photos(photos, features):
    original = 4
    copy = lf.from_image_bytes(_edited_copy(photos[original]), 256)
    counts = verify.verify(copy, features)
    assert int(np.argmax(counts)) == original
    others = np.delete(counts, original)
    assert counts[original] >= verify.MIN_INLIERS and counts[original] >= 3 * max(1, others.max()), counts


def test_inlier_counts_are_symmetric_enough_to_be_stable(photos, features):
    a = verify.prepare(features[2])
    b = verify.prepare(lf.from_image_bytes(_edited_copy(photos[2]), 256))
    ab, ba = verify.inliers(a, b), verify.inliers(b, a)
    assert ab >= verify.MIN_INLIERS
    assert abs(ab - ba) <= max(2, 0.15 * max(ab, ba)), (ab, ba)
    assert verify.inliers(a, b) == ab  # seeded: the same pair always scores the same
    matches_ab, matches_ba = verify.matches(a, b), verify.matches(b, a)
    assert sorted(map(tuple, matches_ab.tolist())) == sorted(map(tuple, matches_ba[:, ::-1].tolist()))


def test_features_keep_at_most_k_keypoints_and_round_trip_through_bytes(photos):
    f = lf.from_image_bytes(photos[0], 64)
    assert 0 < f.size <= 64 and f.descriptors.dtype == np.uint8
    assert max(f.width, f.height) <= lf.DEFAULT_MAX_SIDE
    assert (f.points[:, 0] < f.width).all() and (f.points[:, 1] < f.height).all()
    back = lf.LocalFeatures.from_bytes(*f.to_bytes())
    np.testing.assert_array_equal(back.points, f.points)
    np.testing.assert_array_equal(back.descriptors, f.descriptors)
    with pytest.raises(ValueError, match="cannot hold"):
        lf.LocalFeatures.from_bytes(f.to_bytes()[0], f.to_bytes()[1][:-1])


def test_flat_and_broken_images_give_no_matches_not_errors_downstream():
    flat = lf.from_image_bytes(_jpeg(Image.new("RGB", (200, 150), (90, 90, 90))), 64)
    assert flat.size == 0 and flat.width == 200
    assert verify.verify(flat, [flat, None]).tolist() == [0, 0]
    with pytest.raises(ImageDecodeError):
        lf.from_image_bytes(b"", 64)


def test_aspect_ratio_is_kept_when_decoding_for_local_features(photos):
    from models.backbone.imaging import decode_to_fit

    im = Image.open(io.BytesIO(photos[0]))
    decoded = decode_to_fit(photos[0], 256)
    assert max(decoded.pixels.shape[:2]) == 256
    assert abs(decoded.pixels.shape[1] / decoded.pixels.shape[0] - im.size[0] / im.size[1]) < 0.02
    small = decode_to_fit(_jpeg(Image.new("RGB", (120, 80), (10, 200, 30))), 512)
    assert small.pixels.shape == (80, 120, 3)  # never enlarged
