"""cbir denoise and cbir query --denoise, with the denoiser cbir train-autoencoder trained on dev photos
(tests/pipelines/conftest.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from models.autoencoders.denoiser import Denoiser, decode_rgb, encode_png
from models.autoencoders.pixel_noise import add_noise
from pipelines.cli import main as cli_main
from pipelines.query import run_query
from search.options import SearchOptions


@pytest.fixture(scope="module")
def denoiser_dir(denoiser_run):
    """The convolutional denoiser tests/pipelines/conftest.py trains with cbir train-autoencoder --noise."""
    out, manifest, _ = denoiser_run
    assert manifest.denoising and manifest.validation["psnr_input"] > 0
    return out


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, flowers):
    """A photo the denoiser never saw, with gaussian noise, as a PNG at its own size (shrunk to keep it fast)."""
    root = tmp_path_factory.mktemp("noisy")
    clean = decode_rgb(sorted((flowers / "8").glob("*.jpg"))[-1].read_bytes())
    clean = np.asarray(Image.fromarray(clean).resize((clean.shape[1] // 4, clean.shape[0] // 4)))
    path = root / "photo.png"
    path.write_bytes(encode_png(add_noise(clean, "gaussian:0.25", seed=3)))
    (root / "other").mkdir()
    (root / "other" / "photo.png").write_bytes(encode_png(add_noise(clean, "gaussian:0.25", seed=4)))
    (root / "broken.jpg").write_text("not an image")
    return root


def test_denoise_writes_each_image_cleaned_at_its_own_size(denoiser_dir, noisy, tmp_path, capsys):
    out = tmp_path / "clean"
    inputs = [noisy / "photo.png", noisy / "other" / "photo.png", noisy / "broken.jpg"]
    code = cli_main(["denoise", "--model", str(denoiser_dir), *map(str, inputs), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "2 cleaned, 1 failed" in captured.out
    assert "broken.jpg" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["photo-2.png", "photo.png"]
    for src, name in ((inputs[0], "photo.png"), (inputs[1], "photo-2.png")):
        before, after = decode_rgb(src.read_bytes()), decode_rgb((out / name).read_bytes())
        assert after.shape == before.shape and not np.array_equal(after, before)
        # exactly what the library returns for these pixels
        assert np.array_equal(after, Denoiser.load(str(denoiser_dir)).clean(before))


def test_denoise_refuses_overwriting_inputs_and_folders_that_are_not_denoisers(denoiser_dir, noisy, tmp_path,
                                                                            capsys):
    code = cli_main(["denoise", "--model", str(denoiser_dir), str(noisy / "photo.png"), "--output", str(noisy)])
    assert code == 2 and "would overwrite" in capsys.readouterr().err
    plain = tmp_path / "plain"
    shutil.copytree(denoiser_dir, plain)
    manifest = json.loads((plain / "MANIFEST.json").read_text())
    (plain / "MANIFEST.json").write_text(json.dumps({**manifest, "model_kind": "autoencoder"}))
    with pytest.raises(ValueError, match="trained without --noise"):
        Denoiser.load(str(plain))
    changed = tmp_path / "changed"
    shutil.copytree(denoiser_dir, changed)
    np.save(changed / "weights" / "reconstruction.1.npy", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"reconstruction\.1\.npy"):
        Denoiser.load(str(changed))
    with pytest.raises(FileNotFoundError, match="not a cbir train-autoencoder output"):
        Denoiser.load(str(tmp_path))


def test_query_denoise_embeds_the_cleaned_image(denoiser_dir, flowers_index, weights_dir, noisy, tmp_path):
    idx = str(flowers_index[0])
    cleaned = tmp_path / "cleaned.png"
    cleaned.write_bytes(Denoiser.load(str(denoiser_dir)).clean_bytes((noisy / "photo.png").read_bytes()))
    opts = SearchOptions(k=5, method="exact")
    queries = [str(noisy / "photo.png"), str(noisy / "broken.jpg")]
    with_denoise, failures, _ = run_query(idx, queries, opts, weights_dir=weights_dir, denoise=str(denoiser_dir))
    plain, _, _ = run_query(idx, [queries[0], str(cleaned)], opts, weights_dir=weights_dir)
    assert [f["query"] for f in failures] == [queries[1]]  # still reported, with or without --denoise

    def hits(row):
        return [(r["image_id"], round(r["score"], 5)) for r in row["results"]]

    # --denoise embeds exactly what cbir denoise writes, and not the noisy image
    assert hits(with_denoise[0]) == hits(plain[1]) and hits(with_denoise[0]) != hits(plain[0])

