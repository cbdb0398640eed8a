"""What a trained autoencoder leaves in its output folder besides the manifest: the weights as data, the
SavedModels, the loss curve and the reconstruction sheet (written to a local folder)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from artefacts.manifests import FileDigest
from models.autoencoders.pictures import loss_curve_png, reconstruction_sheet_png
from models.autoencoders.pixel_autoencoder.config import WEIGHTS_DIR
from models.autoencoders.pixel_autoencoder.savedmodel import export_savedmodels
from models.autoencoders.pixel_autoencoder.training import Trained
from models.autoencoders.pixel_autoencoder.weights import save_weights_data, weights_digest

LOSS_PNG = "loss.png"
SHEET_PNG = "reconstructions.png"


def write_outputs(trained: Trained, scores: dict[str, float], preview: tuple[np.ndarray, np.ndarray],
                  local: str) -> dict[str, Any]:
    """Writes them under ``local``; returns ``{"weights": {file: FileDigest}, "digest": weights digest,
    "savedmodels": what export_savedmodels records}`` for the manifest."""
    m = trained.config
    nets = trained.networks
    weights = save_weights_data(nets.autoencoder, m, os.path.join(local, WEIGHTS_DIR))
    digest = weights_digest(weights)
    savedmodels = export_savedmodels(nets, m, local, digest)
    what = (f"denoising autoencoder ({', '.join(str(n) for n in m.noise)})" if m.denoising else "autoencoder")
    shape = f"{m.size} px, " + (f"{m.code_dim}-d code" if m.dense else f"{m.grid}x{m.grid}x{m.filters[-1]} map")
    with open(os.path.join(local, LOSS_PNG), "wb") as f:
        f.write(loss_curve_png(trained.history, f"{what}, {shape}", scores.get("mse_input")))
    noisy, clean = preview
    recon = nets.autoencoder(noisy, training=False).numpy()
    rows = [("held-out input", clean)] + ([("noisy input", noisy / 255.0)] if m.denoising else [])
    rows.append(("reconstruction", recon))
    title = f"{what}, {shape}: held-out PSNR {scores['psnr']:.1f} dB" + (
        f" (noisy input {scores['psnr_input']:.1f} dB)" if m.denoising else "")
    with open(os.path.join(local, SHEET_PNG), "wb") as f:
        f.write(reconstruction_sheet_png(rows, title))
    return {"weights": {k: FileDigest(v, os.path.getsize(os.path.join(local, WEIGHTS_DIR, k)))
                        for k, v in weights.items()},
            "digest": digest, "savedmodels": savedmodels}
