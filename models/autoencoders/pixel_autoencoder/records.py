"""Pixel records: what the Beam pass writes (one ``tf.train.Example`` an image) and what tf.data streams
to training, as (noisy input, clean target) pairs drawn deterministically from a seed."""

from __future__ import annotations

from typing import Any

import numpy as np

from models.autoencoders.pixel_autoencoder.config import ID_KEY, PIXELS_KEY, PixelAutoencoderConfig
from models.autoencoders.pixel_noise import corrupt


def encode_pixels(pixels: np.ndarray, image_id: str) -> bytes:
    """One decoded image as a serialized ``tf.train.Example`` (raw uint8 bytes; deterministic)."""
    import tensorflow as tf

    pixels = np.ascontiguousarray(pixels, np.uint8)
    feature = {
        PIXELS_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
        ID_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def pixel_dataset(files: list[str], size: int, count: int | None = None) -> Any:
    """TFRecord files of :func:`encode_pixels` → a ``tf.data.Dataset`` of uint8 (size, size, 3), read in order.

    ``count``, when known (the launcher counted the records), is asserted as the dataset's
    cardinality, so Keras knows the steps per epoch.
    """
    import tensorflow as tf

    spec = {PIXELS_KEY: tf.io.FixedLenFeature([], tf.string)}

    def parse(record):
        raw = tf.io.parse_single_example(record, spec)[PIXELS_KEY]
        return tf.reshape(tf.io.decode_raw(raw, tf.uint8), (size, size, 3))

    ds = tf.data.TFRecordDataset(list(files)).map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds if count is None else ds.apply(tf.data.experimental.assert_cardinality(count))


def datasets(cfg: PixelAutoencoderConfig, train_images: Any, validation_images: Any) -> tuple[Any, Any]:
    """(training, validation) pair datasets from two datasets of uint8 images, seeded from ``cfg.seed``.

    The global seeds are set first: TensorFlow combines them with each op's own seed, so a
    dataset made after an earlier run in the same process would otherwise shuffle and draw
    noise differently.
    """
    import keras

    keras.utils.set_random_seed(cfg.seed)
    return (training_pairs(train_images, cfg, cfg.seed, training=True),
            training_pairs(validation_images, cfg, cfg.seed + 1, training=False))


def training_pairs(images: Any, cfg: PixelAutoencoderConfig, seed: int, training: bool) -> Any:
    """uint8 images → batches of (input pixels in [0, 255], clean target in [0, 1]).

    Training shuffles within ``cfg.shuffle_buffer`` and draws new noise every epoch;
    validation keeps its order and the same noise every epoch, so its loss is comparable
    across epochs. Both are deterministic for a seed.
    """
    import tensorflow as tf

    ds = images
    if training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=training).batch(2)
    noises = cfg.noise

    def pair(image, s):
        clean = tf.cast(image, tf.float32) / 255.0
        return corrupt(clean, noises, s) * 255.0, clean

    ds = tf.data.Dataset.zip((ds, seeds)).map(pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)
