"""The pixel autoencoder's shape and training settings, and the names its files and signatures use."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from models.autoencoders.pixel_noise import Noise, parse_noise

PIXELS_KEY = "pixels"  # the pixel records' raw uint8 (S, S, 3) bytes, and the signatures' input name
ID_KEY = "image_id"
SIGNATURE = "pixels"
WEIGHTS_DIR = "weights"
LAYERS_FILE = "layers.json"
EXPORT_CARD = os.path.join("assets.extra", "cbir_export.json")  # where models.backbone.network reads the input size
# Default convolutions: three for a dense code (a 16x16x128 map at 128 px goes into the dense layer); two for
# the convolutional bottleneck, which keeps detail a denoiser needs (on 200 flowers photos at 64 px, 10 epochs,
# gaussian:0.1: held-out PSNR 20.4 dB with two, 17.4 dB with three).
DENSE_FILTERS = (32, 64, 128)
CONV_FILTERS = (32, 64)


def default_filters(code_dim: int) -> tuple[int, ...]:
    return DENSE_FILTERS if code_dim > 0 else CONV_FILTERS


@dataclasses.dataclass(frozen=True)
class PixelAutoencoderConfig:
    """The network and its training. Defaults keep a CPU run short (128 px, 5 epochs)."""

    size: int = 128  # images are decoded and squashed to size x size (models.backbone.imaging)
    code_dim: int = 128  # 0: convolutional bottleneck (no dense code), fully convolutional
    filters: tuple[int, ...] = DENSE_FILTERS  # one stride-2 convolution per entry (default_filters(code_dim))
    noise: tuple[Noise, ...] = ()  # denoising: each training input gets one of these
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 2e-3
    validation_fraction: float = 0.1
    seed: int = 1234
    shuffle_buffer: int = 2048  # training examples shuffled in a window this large (streamed, not all in memory)

    def __post_init__(self) -> None:
        step = 2 ** len(self.filters)
        if not self.filters or any(int(f) < 1 for f in self.filters):
            raise ValueError(f"filters must be positive channel counts, not {self.filters}")
        if self.size < 2 * step or self.size % step:
            raise ValueError(f"--size must be a multiple of {step} and at least {2 * step} (the encoder halves it "
                             f"{len(self.filters)} times), not {self.size}")
        if self.code_dim < 0:
            raise ValueError(f"--code-dim must be 0 (convolutional bottleneck) or positive, not {self.code_dim}")
        for name in ("epochs", "batch_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation fraction must be between 0 and 1, not {self.validation_fraction}")

    @property
    def denoising(self) -> bool:
        return bool(self.noise)

    @property
    def dense(self) -> bool:
        return self.code_dim > 0

    @property
    def grid(self) -> int:
        """Side of the last feature map."""
        return self.size // 2 ** len(self.filters)

    @property
    def code_size(self) -> int:
        """Numbers in one code: the dense width, or the flattened feature map."""
        return self.code_dim if self.dense else self.grid * self.grid * self.filters[-1]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["filters"] = list(self.filters)
        d["noise"] = [str(n) for n in self.noise]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PixelAutoencoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["filters"] = tuple(int(f) for f in kwargs.get("filters", cls.filters))
        kwargs["noise"] = parse_noise(",".join(kwargs.get("noise", [])))
        return cls(**kwargs)
