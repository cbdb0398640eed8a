"""Convolutional autoencoders on pixels: a compact descriptor, and a denoiser for query images.

The recipe this product follows trains autoencoders on images. The encoder is a stack of
strided 3×3 convolutions (each halves the side) ending, by default, in a small dense layer
whose output, the *code*, is a compact descriptor of the whole image; the decoder mirrors it
with transposed convolutions back to an RGB image, and the pair is trained on reconstruction
error (mean squared error in [0, 1]). Trained on noisy inputs against clean targets
(``noise``, see :mod:`models.autoencoders.pixel_noise`) the same network is a denoising autoencoder.

``code_dim = 0`` drops the dense layers: the bottleneck is then the last feature map
(side / 2^L × side / 2^L × filters[-1]) and the network is fully convolutional, which is
the denoising recipe's shape and what lets :class:`models.autoencoders.denoiser.Denoiser` clean an
image of any size tile by tile. A dense code has to squeeze a whole image through a few
hundred numbers, so its reconstructions are blurred: good for retrieval codes, poor for
cleaning photos.

Inputs are RGB pixels in [0, 255] (float32), as :func:`models.backbone.imaging.decode_and_resize`
produces them and as the backbone's ``pixels`` signature takes them: the scaling to [0, 1]
is the first layer, inside every exported graph. Outputs are in [0, 1] (sigmoid); the
exported signatures return [0, 255].

The package holds the settings (``config``), the pixel records and tf.data pairs (``records``),
the Keras models (``network``), training and held-out scores (``training``), the weights as data
(``weights``), the SavedModels (``savedmodel``) and everything a training run writes
(``outputs``); every public name is importable from here.

Exports (:func:`export_savedmodels`): ``encoder/`` (signatures ``pixels`` and
``serving_default``: pixels → ``{"code"}``, one flat vector per image, the feature map flattened
for a convolutional bottleneck; with an export card so that
``cbir extract --model savedmodel:DIR/encoder --signature pixels`` finds its input size) and
``autoencoder/`` (pixels → ``{"reconstruction"}``, the denoiser when trained with noise).
The weights (the decoder's too) are also written as data (:func:`save_weights_data`: ``layers.json``
and one ``.npy`` per variable, no pickle), which is what the denoiser rebuilds the network from.
"""

from models.autoencoders.pixel_autoencoder.config import (
    CONV_FILTERS,
    DENSE_FILTERS,
    EXPORT_CARD,
    ID_KEY,
    LAYERS_FILE,
    PIXELS_KEY,
    SIGNATURE,
    WEIGHTS_DIR,
    PixelAutoencoderConfig,
    default_filters,
)
from models.autoencoders.pixel_autoencoder.network import Networks, build
from models.autoencoders.pixel_autoencoder.outputs import LOSS_PNG, SHEET_PNG, write_outputs
from models.autoencoders.pixel_autoencoder.records import datasets, encode_pixels, pixel_dataset, training_pairs
from models.autoencoders.pixel_autoencoder.savedmodel import export_savedmodels
from models.autoencoders.pixel_autoencoder.training import (
    PREVIEW_IMAGES,
    Trained,
    fit,
    held_out_scores,
    preview_batch,
    train_on_shards,
)
from models.autoencoders.pixel_autoencoder.weights import (
    load_weights_data,
    model_fingerprint,
    save_weights_data,
    set_weights,
    weights_digest,
)

__all__ = ["CONV_FILTERS", "DENSE_FILTERS", "EXPORT_CARD", "ID_KEY", "LAYERS_FILE", "LOSS_PNG", "PIXELS_KEY",
           "PREVIEW_IMAGES", "SHEET_PNG", "SIGNATURE", "WEIGHTS_DIR", "Networks", "PixelAutoencoderConfig", "Trained",
           "build", "datasets", "default_filters", "encode_pixels", "export_savedmodels", "fit", "held_out_scores",
           "load_weights_data", "model_fingerprint", "pixel_dataset", "preview_batch", "save_weights_data",
           "set_weights", "train_on_shards", "training_pairs", "weights_digest", "write_outputs"]
