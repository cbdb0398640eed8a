"""Export for TensorBoard's Embedding Projector: vectors, labels, thumbnails sprite, config.

Open with ``tensorboard --logdir DIR`` (Projector tab) or load ``vectors.tsv`` and
``metadata.tsv`` at projector.tensorflow.org.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from models.backbone.imaging import decode_and_resize

SPRITE_LIMIT = 8192  # the projector reads sprites up to 8192 px on a side


def write_projector(
    out_dir: str,
    vectors: np.ndarray,
    metadata: list[dict[str, str]],
    read_bytes: Callable[[str], bytes | None] | None = None,
    thumb: int = 48,
) -> dict[str, str]:
    """Writes ``vectors.tsv``, ``metadata.tsv``, optionally ``sprite.png``, and ``projector_config.pbtxt``."""
    os.makedirs(out_dir, exist_ok=True)
    n = len(vectors)
    if n != len(metadata):
        raise ValueError("one metadata row per vector")
    np.savetxt(os.path.join(out_dir, "vectors.tsv"), np.asarray(vectors, np.float32), delimiter="\t", fmt="%.6f")
    columns = list(metadata[0]) if metadata else ["image_id"]
    with open(os.path.join(out_dir, "metadata.tsv"), "w") as f:
        f.write("\t".join(columns) + "\n")
        for row in metadata:
            f.write("\t".join(str(row.get(c) or "").replace("\t", " ").replace("\n", " ") for c in columns) + "\n")
    config = [
        "embeddings {",
        '  tensor_path: "vectors.tsv"',
        '  metadata_path: "metadata.tsv"',
    ]
    per_side = math.ceil(math.sqrt(n)) if n else 1
    if read_bytes is not None and per_side * thumb <= SPRITE_LIMIT:
        sprite = Image.new("RGB", (per_side * thumb, per_side * thumb), (255, 255, 255))
        for i, row in enumerate(metadata):
            data = read_bytes(row["uri"])
            try:
                tile = Image.fromarray(decode_and_resize(data, thumb).pixels) if data else None
            except Exception:
                tile = None
            if tile is not None:
                r, c = divmod(i, per_side)
                sprite.paste(tile, (c * thumb, r * thumb))
        sprite.save(os.path.join(out_dir, "sprite.png"))
        config += ["  sprite {", '    image_path: "sprite.png"', f"    single_image_dim: {thumb}",
                   f"    single_image_dim: {thumb}", "  }"]
    config.append("}")
    with open(os.path.join(out_dir, "projector_config.pbtxt"), "w") as f:
        f.write("\n".join(config) + "\n")
    return {"vectors": "vectors.tsv", "metadata": "metadata.tsv", "config": "projector_config.pbtxt"}
