"""Training the autoencoder and scoring it on held-out images: the fit, its progress and TensorBoard logs."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from models.autoencoders.pixel_autoencoder.config import PixelAutoencoderConfig
from models.autoencoders.pixel_autoencoder.network import Networks, build
from models.autoencoders.pixel_autoencoder.records import datasets, pixel_dataset

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8  # held-out images in the reconstruction sheet and the TensorBoard image summaries


def _epoch_timer(epochs: int) -> Any:
    """A Keras callback that keeps seconds per epoch and logs one progress line per epoch."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self._t = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)
            logs = logs or {}
            log.info("epoch %d/%d: loss %.5f, val_loss %.5f (%.1fs)", epoch + 1, epochs, logs.get("loss", np.nan),
                     logs.get("val_loss", np.nan), self.seconds[-1])

    return EpochTimer()


def _tensorboard(log_dir: str, preview: tuple[np.ndarray, np.ndarray] | None, denoising: bool) -> Any:
    """A Keras callback writing TensorBoard logs after every epoch: the loss under ``train/`` and
    ``validation/`` (tag ``epoch_loss``, as Keras's own callback names it) and, for a fixed held-out
    batch, image summaries under ``images/`` (input, noisy input when denoising, reconstruction),
    as the recipe shows them. Written with :mod:`models.autoencoders.tb_summaries` (no ``tensorboard`` package)."""
    import keras
    import tensorflow as tf

    from models.autoencoders import tb_summaries

    class TensorBoardLogs(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writers = {name: tf.summary.create_file_writer(os.path.join(log_dir, name))
                            for name in ("train", "validation", "images")}

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            step = epoch + 1
            for name, key in (("train", "loss"), ("validation", "val_loss")):
                if key in logs:
                    with self.writers[name].as_default():
                        tb_summaries.scalar("epoch_loss", logs[key], step)
            if preview is not None:
                noisy, clean = preview
                recon = self.model(noisy, training=False)
                with self.writers["images"].as_default():
                    tb_summaries.images("1_input", clean, step, len(clean))
                    if denoising:
                        tb_summaries.images("2_noisy_input", noisy / 255.0, step, len(clean))
                    tb_summaries.images("3_reconstruction", recon, step, len(clean))
            for writer in self.writers.values():
                writer.flush()

        def on_train_end(self, logs=None):
            for writer in self.writers.values():
                writer.close()

    return TensorBoardLogs()


@dataclasses.dataclass
class Trained:
    networks: Networks
    config: PixelAutoencoderConfig
    history: dict[str, list[float]]
    epoch_seconds: list[float]


def preview_batch(validation: Any, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` held-out (input, clean) pairs: the fixed batch of the pictures and image summaries."""
    noisy, clean = [], []
    for x, y in validation.unbatch().take(n):
        noisy.append(x.numpy())
        clean.append(y.numpy())
    if not clean:
        raise ValueError("the validation split is empty")
    return np.stack(noisy), np.stack(clean)


def fit(cfg: PixelAutoencoderConfig, train: Any, validation: Any, log_dir: str | None = None,
        preview: tuple[np.ndarray, np.ndarray] | None = None) -> Trained:
    """Trains on ``train`` pairs (from :func:`training_pairs`), validating on ``validation`` every epoch.

    With ``log_dir``, TensorBoard gets the loss scalars (``train/``, ``validation/``) and,
    with ``preview``, image summaries (``images/``).
    """
    import keras

    nets = build(cfg)
    nets.autoencoder.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="mse")
    timer = _epoch_timer(cfg.epochs)
    callbacks = [timer]
    if log_dir:
        callbacks.append(_tensorboard(log_dir, preview, cfg.denoising))
    history = nets.autoencoder.fit(train, validation_data=validation, epochs=cfg.epochs, verbose=0, shuffle=False,
                                   callbacks=callbacks)
    hist = {k: [float(v) for v in values] for k, values in sorted(history.history.items())}
    return Trained(nets, cfg, hist, list(timer.seconds))


def held_out_scores(model: Any, validation: Any, denoising: bool) -> dict[str, float]:
    """Mean MSE, PSNR and SSIM (in [0, 1], reconstruction rounded to 8 bits as a saved image is) of the
    reconstructions of the held-out pairs; for a denoiser also of its noisy inputs, the do-nothing baseline."""
    import tensorflow as tf

    sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "psnr_input": 0.0, "ssim_input": 0.0, "mse_input": 0.0}
    n = 0
    for noisy, clean in validation:
        out = tf.round(model(noisy, training=False) * 255.0) / 255.0
        sums["mse"] += float(tf.reduce_sum(tf.reduce_mean(tf.square(out - clean), axis=[1, 2, 3])))
        sums["psnr"] += float(tf.reduce_sum(tf.image.psnr(out, clean, 1.0)))
        sums["ssim"] += float(tf.reduce_sum(tf.image.ssim(out, clean, 1.0)))
        if denoising:
            x = noisy / 255.0
            sums["mse_input"] += float(tf.reduce_sum(tf.reduce_mean(tf.square(x - clean), axis=[1, 2, 3])))
            sums["psnr_input"] += float(tf.reduce_sum(tf.image.psnr(x, clean, 1.0)))
            sums["ssim_input"] += float(tf.reduce_sum(tf.image.ssim(x, clean, 1.0)))
        n += int(clean.shape[0])
    keys = sums if denoising else ("mse", "psnr", "ssim")
    out = {k: round(sums[k] / max(n, 1), 6) for k in keys}
    out["images"] = n
    return out


def train_on_shards(cfg: PixelAutoencoderConfig, train_files: list[str], val_files: list[str], n_train: int,
                    n_validation: int, log_dir: str) -> tuple[Trained, dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Trains on the pixel shards ``train_files``, holding out ``val_files`` (``n_*`` records each, as the
    launcher counted them); returns the trained networks, their held-out scores and the preview batch."""
    train, validation = datasets(cfg, pixel_dataset(train_files, cfg.size, n_train),
                                 pixel_dataset(val_files, cfg.size, n_validation))
    preview = preview_batch(validation, PREVIEW_IMAGES)
    trained = fit(cfg, train, validation, log_dir=log_dir, preview=preview)
    scores = held_out_scores(trained.networks.autoencoder, validation, cfg.denoising)
    if cfg.denoising:
        log.info("held-out PSNR %.2f dB denoised, %.2f dB noisy input; SSIM %.3f vs %.3f", scores["psnr"],
                 scores["psnr_input"], scores["ssim"], scores["ssim_input"])
    else:
        log.info("held-out reconstruction PSNR %.2f dB, SSIM %.3f", scores["psnr"], scores["ssim"])
    return trained, scores, preview
