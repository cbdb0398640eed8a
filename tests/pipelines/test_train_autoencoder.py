"""cbir train-autoencoder (its run is shared with test_denoise.py: tests/pipelines/conftest.py): broken inputs
accounted for, published outputs, same seed → same manifest, and the exported encoder through
``cbir extract --model savedmodel:DIR/encoder --signature pixels``."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from models.autoencoders import pixel_autoencoder as pae
from models.backbone.imaging import decode_and_resize
from models.backbone.network import ModelSpec
from pipelines import extract, train_autoencoder
from pipelines.cli import main as cli_main
from transforms import features_io
from transforms.feature_sets import feature_files

BROKEN = {"0/truncated.jpg": "decode", "1/not_an_image.jpg": "decode", "2/empty.png": "decode",
          "3/link.jpg": "read"}  # what tests/pipelines/conftest.py puts among the photos, and where each fails


@pytest.fixture(scope="module")
def corpus(pixel_corpus):
    return pixel_corpus


@pytest.fixture(scope="module")
def trained(denoiser_run):
    out, manifest, _ = denoiser_run
    return out, manifest


def test_broken_images_are_accounted_for_and_training_completes(trained):
    out, m = trained
    c = m.counts
    assert (c.inputs, c.read, c.failed, c.decoded) == (40, 40, 4, 36)
    assert c.train + c.validation == 36 and c.validation > 0
    assert m.accounting.checked == {"inputs": 40, "read (counter)": 40, "records in pixel shards + failure rows": 40}
    (part,) = m.parts("failures")
    table = features_io.read_table(str(out / part.path))
    assert dict(zip(table.column("image_id").to_pylist(), table.column("stage").to_pylist(), strict=True)) == BROKEN
    assert sum(m.failures_by_reason.values()) == 4 and m.failures_by_reason["read:NotRegularFileError"] == 1
    h = m.history  # reconstruction loss over a short training on the dev photos
    assert len(h["loss"]) == 3 and h["loss"][-1] < h["loss"][0] and h["val_loss"][-1] < h["val_loss"][0], h
    assert m.validation["images"] == c.validation and m.denoising
    assert m.validation["psnr_input"] > 0  # a denoiser's held-out scores include the noisy input's
    for name in ("encoder", "autoencoder"):
        assert (out / name / "saved_model.pb").is_file()
        assert sorted(m.savedmodels[name].signatures)[-1] == "serving_default"
    for picture in ("loss.png", "reconstructions.png"):
        assert (out / picture).read_bytes().startswith(b"\x89PNG")
    runs = [p.name for p in (out / m.tensorboard).iterdir()]
    assert sorted(runs) == ["images", "train", "validation"]
    assert not (out / "_staging").exists()


def test_same_seed_same_data_same_manifest_apart_from_timings(denoiser_run, tmp_path):
    first_out, first, cfg = denoiser_run
    out = tmp_path / "again"
    shutil.copytree(first_out, out)  # the re-run goes into a copy of the first output and replaces it
    second = train_autoencoder.run(dataclasses.replace(cfg, output=str(out)))

    def comparable(m, folder):
        d = json.loads(json.dumps(m.to_dict()).replace(m.run_id, "RUN").replace(str(folder), "OUT"))
        for key in ("timings", "created_utc"):
            d.pop(key)
        return d

    assert comparable(second, out) == comparable(first, first_out)
    assert second.weights.digest == first.weights.digest and second.run_id != first.run_id
    # the earlier run's failure parts and TensorBoard run are gone; only what the new manifest lists stays
    assert {p.name for p in (out / "tensorboard").iterdir()} == {second.run_id}
    assert [f"failures/{p.name}" for p in (out / "failures").iterdir()] == [p.path for p in second.parts("failures")]
    assert json.loads((out / "MANIFEST.json").read_text())["run_id"] == second.run_id


def test_exported_encoder_extracts_through_savedmodel_like_the_encoder_itself(trained, corpus, tmp_path):
    """The convolutional bottleneck (8x8x32) reaches extract flattened, one 2048-d code per image."""
    out, m = trained
    spec = ModelSpec(f"savedmodel:{out / 'encoder'}", signature="pixels")
    assert spec.size() == 32  # from the export card: no --input-size needed
    fm = extract.run(extract.ExtractConfig(input=str(corpus), output=str(tmp_path / "codes"), model=spec))
    assert fm.dimension == 8 * 8 * 32 == m.savedmodels["encoder"].dimension
    assert fm.counts.ok == 36 and fm.counts.failed == 4
    table = pa.concat_tables([features_io.read_table(p) for p in feature_files(str(tmp_path / "codes"), fm)])
    cfg, weights, _ = pae.load_weights_data(str(out / "weights"))
    nets = pae.build(cfg)
    pae.set_weights(nets.autoencoder, weights)
    pixels = np.stack([decode_and_resize((corpus / i).read_bytes(), 32).pixels
                       for i in table.column("image_id").to_pylist()])
    direct = nets.encoder(pixels.astype(np.float32), training=False).numpy().reshape(len(pixels), -1)
    assert np.max(np.abs(features_io.feature_matrix(table) - direct)) <= 1e-4


def test_command_line_refuses_bad_options_in_one_line(corpus, tmp_path, capsys):
    code = cli_main(["train-autoencoder", "--input", str(corpus), "--output", str(tmp_path / "x"), "--size", "100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "multiple of 8" in err[0]
    code = cli_main(["train-autoencoder", "--input", str(corpus), "--output", str(tmp_path / "x"),
                     "--noise", "gaussian:30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "gaussian σ" in err[0]
    assert not (tmp_path / "x").exists()
