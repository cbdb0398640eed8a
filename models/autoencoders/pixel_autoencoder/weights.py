"""The trained weights as data: ``layers.json`` and one ``.npy`` per variable (no pickle), their digests,
and the fingerprint an encoder's codes carry. The denoiser rebuilds the network from these files."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from artefacts.manifests import fingerprint
from models.autoencoders.pixel_autoencoder.config import LAYERS_FILE, PixelAutoencoderConfig


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_weights_data(model: Any, cfg: PixelAutoencoderConfig, folder: str) -> dict[str, str]:
    """``layers.json`` (config, layer names, files and shapes) and one ``.npy`` per variable; returns
    {file name: sha256}. The bytes depend on the weights only, so equal weights give equal digests."""
    os.makedirs(folder, exist_ok=True)
    digests: dict[str, str] = {}
    layers = []
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        names = []
        for j, w in enumerate(weights):
            name = f"{layer.name}.{j}.npy"
            buf = io.BytesIO()
            np.save(buf, np.asarray(w, np.float32), allow_pickle=False)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(buf.getvalue())
            digests[name] = _sha256(buf.getvalue())
            names.append(name)
        layers.append({"name": layer.name, "files": names, "shapes": [list(np.shape(w)) for w in weights]})
    spec = json.dumps({"config": cfg.to_dict(), "layers": layers}, indent=2, sort_keys=True).encode() + b"\n"
    with open(os.path.join(folder, LAYERS_FILE), "wb") as f:
        f.write(spec)
    digests[LAYERS_FILE] = _sha256(spec)
    return dict(sorted(digests.items()))


def weights_digest(file_digests: dict[str, str]) -> str:
    """One sha256 over the weights files' names and digests (sorted)."""
    h = hashlib.sha256()
    for name, digest in sorted(file_digests.items()):
        h.update(name.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def load_weights_data(folder: str, read: Callable[[str], bytes] | None = None
                      ) -> tuple[PixelAutoencoderConfig, dict[str, list[np.ndarray]], dict[str, str]]:
    """(config, {layer: arrays}, {file: sha256}) from a weights folder (local, or through ``read(path)``)."""
    read = read or (lambda p: open(p, "rb").read())
    raw = read(os.path.join(folder, LAYERS_FILE))
    spec = json.loads(raw)
    digests = {LAYERS_FILE: _sha256(raw)}
    weights = {}
    for layer in spec["layers"]:
        arrays = []
        for name, shape in zip(layer["files"], layer["shapes"], strict=True):
            if "/" in name or name.startswith("."):
                raise ValueError(f"{folder}/{LAYERS_FILE} names {name!r}, not a file of the folder")
            data = read(os.path.join(folder, name))
            digests[name] = _sha256(data)
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if list(array.shape) != list(shape):
                raise ValueError(f"{folder}/{name} holds {array.shape}, {LAYERS_FILE} says {tuple(shape)}")
            arrays.append(array.astype(np.float32, copy=False))
        weights[layer["name"]] = arrays
    return PixelAutoencoderConfig.from_dict(spec["config"]), weights, dict(sorted(digests.items()))


def set_weights(model: Any, weights: dict[str, list[np.ndarray]]) -> None:
    """Loads {layer: arrays} into ``model``; every layer with variables must be given, with matching shapes."""
    for layer in model.layers:
        expected = layer.get_weights()
        if not expected:
            continue
        given = weights.get(layer.name)
        if given is None or [np.shape(w) for w in given] != [np.shape(w) for w in expected]:
            raise ValueError(f"weights for layer {layer.name!r} are missing or of the wrong shape")
        layer.set_weights(given)


def model_fingerprint(cfg: PixelAutoencoderConfig, digest: str) -> str:
    """What an encoder's codes depend on: the network's shape and its trained weights."""
    shape = {k: v for k, v in cfg.to_dict().items() if k in ("size", "code_dim", "filters")}
    return fingerprint({"pixel_autoencoder": shape, "weights": digest})
