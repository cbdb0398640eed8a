"""TensorBoard scalar and image summaries written with TensorFlow alone.

``tf.summary.scalar`` / ``tf.summary.image`` (and Keras's ``TensorBoard`` callback, built on
them) are implemented by the ``tensorboard`` package, which this product does not install:
training needs only to *write* the logs, and whoever reads them runs TensorBoard anyway. So the
two kinds are written here through TensorFlow's own ``tf.summary.write``, with the same
summary metadata TensorBoard's writers attach (plugin ``scalars`` with data class scalar,
plugin ``images`` with a blob sequence of ``[width, height, png, …]``), which is what its
scalars and images dashboards read. tests/models/autoencoders/test_pixel_autoencoder.py reads them back.
"""

from __future__ import annotations

from typing import Any


def _metadata(plugin: str, data_class: int) -> Any:
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
                                       data_class=data_class)


def scalar(tag: str, value: float, step: int) -> None:
    """One point of a scalar curve, into the default writer (``with writer.as_default():``)."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step,
                     metadata=_metadata("scalars", summary_pb2.DataClass.DATA_CLASS_SCALAR))


def images(tag: str, batch: Any, step: int, max_outputs: int = 8) -> None:
    """A batch of (n, h, w, 3) images in [0, 1] as PNGs, into the default writer."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    pixels = tf.image.convert_image_dtype(tf.clip_by_value(tf.convert_to_tensor(batch, tf.float32), 0.0, 1.0),
                                          tf.uint8, saturate=True)[:max_outputs]
    encoded = tf.map_fn(tf.io.encode_png, pixels, fn_output_signature=tf.string)
    shape = tf.shape(pixels)
    tensor = tf.concat([tf.stack([tf.as_string(shape[2]), tf.as_string(shape[1])]), encoded], axis=0)
    tf.summary.write(tag, tensor, step=step,
                     metadata=_metadata("images", summary_pb2.DataClass.DATA_CLASS_BLOB_SEQUENCE))
