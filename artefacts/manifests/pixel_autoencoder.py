"""``<out>/MANIFEST.json`` of ``cbir train-autoencoder``: the commit point of a training output.

It records (ARCHITECTURE.md, "Autoencoders on pixels") what was read and how it was decoded,
the accounting checked before publishing, the network's configuration, the trained weights
as data (``weights/``, their digest) and the SavedModels exported from them, the loss history
and the held-out scores, the pictures and the TensorBoard run. Everything a run determines
from its seed and its data is outside ``timings``, ``run_id`` and ``created_utc``, so two runs
with the same seed on the same data write the same manifest apart from those
(tests/pipelines/test_train_autoencoder.py).

``cbir denoise`` and ``cbir query --denoise`` read it to rebuild the network from the
weights data (never from a SavedModel), after checking the weights digest.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from artefacts.manifests.base import Accounting, FileDigest, Manifest, PartFile

KIND_AUTOENCODER = "autoencoder"
KIND_DENOISING = "denoising_autoencoder"


@dataclasses.dataclass
class PixelCounts:
    """Every input lands in exactly one of ``decoded`` and ``failed``; ``decoded`` = ``train`` + ``validation``."""

    inputs: int
    read: int
    decoded: int
    failed: int
    train: int
    validation: int


@dataclasses.dataclass
class PixelShards:
    """How the decoded pixels were staged (TFRecord shards, deleted after training).

    Images go to shard ``blake2b(image_id) mod shards``; the last ``validation`` shards are
    the held-out split, so the split depends on the image ids only, never on the runner.
    """

    shards: int
    validation_shards: list[int]
    files: int


@dataclasses.dataclass
class WeightsInfo:
    """The trained network as data: ``<folder>/layers.json`` plus one ``.npy`` per variable."""

    folder: str
    digest: str  # sha256 over the files' names and contents: what the exports and the denoiser depend on
    files: dict[str, FileDigest]


@dataclasses.dataclass
class SavedModelInfo:
    """One exported SavedModel (a folder of the output); its signatures take pixels in [0, 255]."""

    path: str
    signatures: list[str]
    input: str  # the input tensor's name, dtype and shape
    output: str  # the output key
    dimension: int | None  # encoder: the code size; None when the output is an image
    files: list[str]


@dataclasses.dataclass(kw_only=True)
class PixelAutoencoderManifest(Manifest):
    KIND: ClassVar[str] = "pixel-autoencoder"
    REBUILD: ClassVar[str] = "run cbir train-autoencoder again"

    run_id: str
    created_utc: str
    input: str
    model_kind: str  # KIND_AUTOENCODER or KIND_DENOISING
    config: dict[str, Any]  # models.autoencoders.pixel_autoencoder.PixelAutoencoderConfig.to_dict()
    fingerprint: str  # digest of config and weights: the model fingerprint of the encoder's codes
    decode: dict[str, Any]
    counts: PixelCounts
    accounting: Accounting
    weights: WeightsInfo
    savedmodels: dict[str, SavedModelInfo]
    history: dict[str, list[float]]
    validation: dict[str, float]
    files: dict[str, list[PartFile]] = dataclasses.field(default_factory=dict)  # {"failures": [...]}
    failures_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    pixel_shards: PixelShards | None = None
    pictures: dict[str, str] = dataclasses.field(default_factory=dict)
    tensorboard: str | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def denoising(self) -> bool:
        return self.model_kind == KIND_DENOISING

    def parts(self, kind: str = "failures") -> list[PartFile]:
        return list(self.files.get(kind, []))
