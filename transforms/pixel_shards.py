"""Decoded pixels → TFRecord shards for ``tf.data`` (``cbir train-autoencoder``), independent of the runner.

Each decoded image goes to shard ``blake2b(image_id) mod shards``; all images of a shard
are grouped on one worker, sorted by ``(image_id, sha256)`` and written as one file
``pixels-SSSSS-of-NNNNN.tfrecord`` of ``tf.train.Example`` records (raw uint8 pixels and the
id, :func:`models.autoencoders.pixel_autoencoder.encode_pixels`). So the files' contents depend on the
inputs alone, never on the order a runner delivered them in, and a re-run on the same data
trains on the same examples in the same order. The shard number also decides the
held-out split (:func:`validation_shards`): an image is held out or not by its id alone.

A shard's group is held in one worker's memory: at 128 px that is 49 KB per image, so
``shards`` is chosen to keep groups to about a thousand images (:func:`default_shards`).
"""

from __future__ import annotations

import hashlib
import math

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from models.autoencoders.pixel_autoencoder import encode_pixels
from plumbing import fsutil
from transforms.decode import NAMESPACE
from transforms.readers.tfrecord import iter_tfrecord_frames, write_tfrecord

IMAGES_PER_SHARD = 1000
MIN_SHARDS = 10  # the held-out split is made of whole shards: ten gives it a granularity of 10 %
MAX_SHARDS = 4096


def shard_of(image_id: str, shards: int) -> int:
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def default_shards(expected_images: int) -> int:
    return max(MIN_SHARDS, min(MAX_SHARDS, math.ceil(expected_images / IMAGES_PER_SHARD)))


def validation_shards(shards: int, fraction: float) -> list[int]:
    """The held-out shards: the last ``round(fraction × shards)`` of them (at least one, never all)."""
    if shards < 2:
        raise ValueError(f"need at least 2 pixel shards to hold some out for validation, not {shards}")
    n = min(shards - 1, max(1, round(fraction * shards)))
    return list(range(shards - n, shards))


def shard_name(shard: int, shards: int) -> str:
    return f"pixels-{shard:05d}-of-{shards:05d}.tfrecord"


def shard_number(path: str) -> int:
    return int(path.rsplit("/", 1)[-1].split("-")[1])


class _WriteShardFn(beam.DoFn):
    def __init__(self, folder: str, shards: int):
        self._folder = folder
        self._shards = shards
        self._examples = Metrics.counter(NAMESPACE, "pixel_examples")
        self._files = Metrics.counter(NAMESPACE, "pixel_shards")

    def process(self, item):
        shard, images = item
        images = sorted(images, key=lambda e: (e[0].image_id, e[0].sha256))
        path = fsutil.join(self._folder, shard_name(shard, self._shards))
        # a retried bundle rewrites the same bytes: the shard's content is a function of its images
        with FileSystems.create(path) as f:
            for meta, pixels in images:
                write_tfrecord(f, encode_pixels(pixels, meta.image_id))
        self._examples.inc(len(images))
        self._files.inc()
        yield path


class WritePixelShards(beam.PTransform):
    """``(ImageMeta, uint8 pixels)`` → one TFRecord file per non-empty shard under ``folder``; emits the paths."""

    def __init__(self, folder: str, shards: int):
        super().__init__()
        self._folder = folder
        self._shards = shards

    def expand(self, images):
        shards = self._shards
        return (
            images
            | "KeyByShard" >> beam.Map(lambda e: (shard_of(e[0].image_id, shards), e))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShardFn(self._folder, shards))
        )


def count_records(path: str) -> int:
    """Records in one TFRecord file, every frame's checksums verified (the launcher's own count)."""
    n = 0
    with FileSystems.open(path, compression_type="uncompressed") as f:
        for frame in iter_tfrecord_frames(f):
            if frame.error is not None:
                raise ValueError(f"{path}: record {frame.index} is damaged ({frame.error}); re-run the job")
            n += 1
    return n
