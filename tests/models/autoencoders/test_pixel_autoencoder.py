"""Autoencoders on pixels: noise models, training on dev photos, weights as data, TensorBoard logs, the denoiser."""

from __future__ import annotations

import numpy as np
import pytest

from models.autoencoders import pixel_autoencoder as pa
from models.autoencoders.denoiser import Denoiser, decode_rgb
from models.autoencoders.pixel_autoencoder.training import _tensorboard
from models.autoencoders.pixel_noise import Noise, add_noise, parse_noise
from models.backbone.imaging import decode_and_resize

SIZE = 32


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


@pytest.fixture(scope="module")
def photos(flowers):
    """84 dev photos at 32 px for training and validation; 4 others held back at 96x72 (their own aspect)."""
    from PIL import Image

    paths = sorted(flowers.glob("*/*.jpg"))[::8]
    small = np.stack([decode_and_resize(p.read_bytes(), SIZE).pixels for p in paths[:-4]])
    held = [np.asarray(Image.fromarray(decode_rgb(p.read_bytes())).resize((96, 72), Image.Resampling.BILINEAR))
            for p in paths[-4:]]
    return small, held


def _datasets(cfg, small):
    import tensorflow as tf

    return pa.datasets(cfg, tf.data.Dataset.from_tensor_slices(small[:-12]),
                       tf.data.Dataset.from_tensor_slices(small[-12:]))


def test_noise_specs_parse_and_refuse_nonsense():
    assert parse_noise("gaussian:0.1, saltpepper:0.05,jpeg:20") == (
        Noise("gaussian", 0.1), Noise("saltpepper", 0.05), Noise("jpeg", 20.0))
    assert parse_noise(None) == () and parse_noise(" ") == ()
    assert str(Noise("jpeg", 20.0)) == "jpeg:20" and str(Noise("gaussian", 0.1)) == "gaussian:0.1"
    for bad, says in [("gaussian:25", "units of the full intensity range"), ("blur:3", "not one of"),
                      ("jpeg:0", "integer from 1 to 100"), ("jpeg:50.5", "integer"), ("saltpepper:1", "0 < p < 1"),
                      ("gaussian", "not one of"), ("gaussian:x", "not a number")]:
        with pytest.raises(ValueError, match=says):
            parse_noise(bad)


def test_noise_is_seeded_and_what_it_says():
    grey = np.full((64, 80, 3), 128, np.uint8)
    g1, g2, g3 = (add_noise(grey, "gaussian:0.1", seed) for seed in (1, 1, 2))
    assert g1.shape == grey.shape and g1.dtype == np.uint8
    assert np.array_equal(g1, g2) and not np.array_equal(g1, g3)
    assert abs(np.std(g1.astype(float) - 128) - 25.5) < 2.5
    sp = add_noise(grey, "saltpepper:0.2", 0)
    hit = np.all(sp != 128, axis=2)
    assert abs(hit.mean() - 0.2) < 0.03 and set(np.unique(sp[hit])) <= {0, 255}
    photo = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert not np.array_equal(add_noise(photo, "jpeg:10", 0), photo)


def test_config_refuses_what_the_encoder_cannot_halve():
    with pytest.raises(ValueError, match="multiple of 8"):
        pa.PixelAutoencoderConfig(size=100)
    with pytest.raises(ValueError, match="code-dim"):
        pa.PixelAutoencoderConfig(code_dim=-1)
    cfg = pa.PixelAutoencoderConfig(size=64, code_dim=0, filters=(16, 32), noise=parse_noise("jpeg:30"))
    assert pa.PixelAutoencoderConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.code_size == 16 * 16 * 32 and cfg.denoising and not cfg.dense


@pytest.fixture(scope="module")
def trained(photos):
    """A convolutional denoiser (gaussian:0.25) trained for 4 short epochs on 72 dev photos at 32 px."""
    small, _ = photos
    cfg = pa.PixelAutoencoderConfig(size=SIZE, code_dim=0, filters=(16, 32), noise=parse_noise("gaussian:0.25"),
                                    epochs=4, batch_size=8, learning_rate=3e-3)
    train, validation = _datasets(cfg, small)
    return pa.fit(cfg, train, validation), validation


def test_training_loss_falls_and_the_code_is_the_last_feature_map(trained, photos):
    result, _ = trained
    h = result.history
    assert len(h["loss"]) == 4 and len(result.epoch_seconds) == 4
    assert h["loss"][-1] < h["loss"][0] and h["val_loss"][-1] < h["val_loss"][0], h
    codes = result.networks.encoder(photos[0][:5].astype(np.float32)).numpy()
    assert codes.shape == (5, 8, 8, 32) and np.all(np.isfinite(codes))


def test_weights_as_data_rebuild_the_same_network(trained, tmp_path):
    result, _ = trained
    x = np.random.default_rng(1).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    digests = pa.save_weights_data(result.networks.autoencoder, result.config, str(tmp_path))
    cfg, weights, read = pa.load_weights_data(str(tmp_path))
    assert cfg == result.config and read == digests
    again = pa.build(cfg)
    pa.set_weights(again.autoencoder, weights)
    assert np.array_equal(again.autoencoder(x).numpy(), result.networks.autoencoder(x).numpy())
    assert pa.weights_digest(digests) == pa.weights_digest(pa.save_weights_data(again.autoencoder, cfg,
                                                                                 str(tmp_path / "again")))
    np.save(tmp_path / "encode_0.0.npy", np.zeros((3, 3), np.float32))  # not the shape layers.json promises
    with pytest.raises(ValueError, match="encode_0.0.npy holds"):
        pa.load_weights_data(str(tmp_path))


def test_tensorboard_logs_hold_loss_scalars_and_images(trained, photos, tmp_path):
    import tensorflow as tf

    result, validation = trained
    preview = pa.preview_batch(validation, 3)
    callback = _tensorboard(str(tmp_path), preview, denoising=True)
    callback.set_model(result.networks.autoencoder)
    for epoch in range(2):
        callback.on_epoch_end(epoch, {"loss": 0.5 - epoch * 0.1, "val_loss": 0.4})
    callback.on_train_end()
    seen: dict[str, list] = {}
    for run in ("train", "validation", "images"):
        (events,) = (tmp_path / run).iterdir()
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for v in event.summary.value:
                seen.setdefault(f"{run}/{v.tag}", []).append((event.step, v.metadata.plugin_data.plugin_name,
                                                              v.tensor))
    assert [(s, p) for s, p, _ in seen["train/epoch_loss"]] == [(1, "scalars"), (2, "scalars")]
    assert np.isclose(tf.make_ndarray(seen["train/epoch_loss"][1][2]), 0.4)
    step, plugin, tensor = seen["images/3_reconstruction"][0]
    blobs = tf.make_ndarray(tensor)
    assert plugin == "images" and blobs[:2].tolist() == [b"32", b"32"] and len(blobs) == 5  # w, h, 3 PNGs
    assert blobs[2].startswith(b"\x89PNG") and "images/1_input" in seen and "images/2_noisy_input" in seen


@pytest.fixture(scope="module")
def denoiser(trained):
    result, _ = trained
    # tiles of 32 px with a 4-px margin: a 96x72 photo takes 18 of them, edges and corners included
    return Denoiser.from_model(result.networks.autoencoder, result.config, tile=32, margin=4)


def test_denoiser_raises_psnr_on_noisy_held_back_photos(denoiser, photos):
    _, held = photos
    noisy = [add_noise(p, "gaussian:0.25", seed=i) for i, p in enumerate(held)]
    cleaned = [denoiser.clean(n) for n in noisy]
    assert all(c.shape == p.shape and c.dtype == np.uint8 for c, p in zip(cleaned, held, strict=True))
    before = np.mean([_psnr(n, p) for n, p in zip(noisy, held, strict=True)])
    after = np.mean([_psnr(c, p) for c, p in zip(cleaned, held, strict=True)])
    assert after > before + 1.0, (before, after)


def test_denoiser_keeps_any_size_and_refuses_what_is_not_rgb(denoiser):
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (5, 301, 3), (301, 5, 3), (24, 24, 3)]:
        out = denoiser.clean(rng.integers(0, 256, shape, dtype=np.uint8))
        assert out.shape == shape and out.dtype == np.uint8
    for bad in [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32),
                np.zeros((0, 8, 3), np.uint8)]:
        with pytest.raises(ValueError):
            denoiser.clean(bad)


def test_a_dense_encoder_exports_its_code_under_a_pixels_signature(tmp_path):
    """The dense-code path (the pipeline tests train a convolutional one): export card, signatures, same codes."""
    import tensorflow as tf

    from models.backbone.network import ModelSpec

    cfg = pa.PixelAutoencoderConfig(size=SIZE, code_dim=16, filters=(8, 16))
    nets = pa.build(cfg)
    info = pa.export_savedmodels(nets, cfg, str(tmp_path), digest="0" * 64)
    assert info["encoder"]["dimension"] == 16 and sorted(info["encoder"]["signatures"]) == ["pixels",
                                                                                          "serving_default"]
    assert ModelSpec(f"savedmodel:{tmp_path / 'encoder'}", signature="pixels").size() == SIZE
    x = np.random.default_rng(3).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    code = tf.saved_model.load(str(tmp_path / "encoder")).signatures["pixels"](pixels=tf.constant(x))["code"]
    assert code.shape == (2, 16) and np.max(np.abs(code.numpy() - nets.encoder(x).numpy())) <= 1e-5
