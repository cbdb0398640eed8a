"""One ``cbir train-autoencoder --noise`` run shared by test_train_autoencoder.py and test_denoise.py.

A training run (Beam decode pass, Keras tracing, two SavedModel exports) costs about ten seconds on
two cores whatever its size, so both modules read the same one: 36 dev photos with four broken
inputs among them, a convolutional denoiser at 32 px. Tests that change an output work on a copy.
"""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def pixel_corpus(tmp_path_factory, flowers):
    """36 dev photos (4 of each of 9 classes) and four broken inputs: truncated, text, empty, a symlink."""
    root = tmp_path_factory.mktemp("ae_corpus")
    for label in sorted(p.name for p in flowers.iterdir())[:9]:
        (root / label).mkdir()
        for photo in sorted((flowers / label).glob("*.jpg"))[:4]:
            shutil.copy(photo, root / label / photo.name)
    first = sorted((flowers / "0").glob("*.jpg"))[0].read_bytes()
    (root / "0" / "truncated.jpg").write_bytes(first[:2000])
    (root / "1" / "not_an_image.jpg").write_text("this is not a JPEG")
    (root / "2" / "empty.png").write_bytes(b"")
    os.symlink(sorted((flowers / "3").glob("*.jpg"))[0], root / "3" / "link.jpg")
    return root


@pytest.fixture(scope="session")
def denoiser_run(pixel_corpus, tmp_path_factory):
    """(output folder, manifest, config): a convolutional denoiser (gaussian:0.25), 3 epochs, seed 7."""
    from models.autoencoders import pixel_autoencoder as pae
    from models.autoencoders.pixel_noise import parse_noise
    from pipelines import train_autoencoder

    out = tmp_path_factory.mktemp("denoiser")
    model = pae.PixelAutoencoderConfig(size=32, code_dim=0, filters=(16, 32), noise=parse_noise("gaussian:0.25"),
                                       epochs=3, batch_size=4, learning_rate=3e-3, seed=7)
    cfg = train_autoencoder.TrainAutoencoderConfig(input=str(pixel_corpus), output=str(out), model=model)
    return out, train_autoencoder.run(cfg), cfg
