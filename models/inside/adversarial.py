"""Adversarial examples against retrieval: FGSM and PGD under an L∞ budget in grey levels.

The budget ``eps`` is in grey levels of 0–255 pixels, the units a client sends, and the
attack differentiates through the model's own preprocessing and the index's transform
(:class:`models.inside.similarity.EmbeddingGraph`), so it attacks the similarity the product
computes. Two goals:

* **untargeted**: push an image's embedding away from its own clean embedding (minimise
  the cosine with it): the photo should stop retrieving itself and its neighbours;
* **targeted**: make image A retrieve as image B (maximise the cosine with B's stored vector).

FGSM takes one signed-gradient step of ``eps``. At the clean image the untargeted
objective is at its maximum (cosine 1), where the gradient vanishes, so untargeted FGSM
starts from a random signed step of ``eps / 2`` (R+FGSM, Tramèr et al. 2018). PGD takes
``steps`` signed steps of ``2.5 · eps / steps`` from a random start inside the budget,
projecting back onto it after each (Madry et al. 2018).

The result is what would be saved: pixels rounded to uint8 and clipped to the budget
*after* rounding, so ``max |adversarial − original| ≤ eps`` holds exactly on the saved
pixels (``eps`` is a whole number of grey levels), and ``eps = 0`` returns the original
unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ATTACKS = ("fgsm", "pgd")


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    steps: int = 10  # PGD steps
    step_factor: float = 2.5  # PGD step = step_factor · eps / steps
    random_start: bool = True
    seed: int = 0


def _objective(graph: Any, images: Any, anchors: Any, targeted: bool) -> Any:
    """What the attack ascends: + cosine with the target, or − cosine with the clean embedding."""
    s = graph.similarity(images, anchors)
    return s if targeted else -s


def _gradient(graph: Any, images: np.ndarray, anchors: np.ndarray, targeted: bool, batch: int) -> np.ndarray:
    import tensorflow as tf

    out = np.empty_like(images)
    for lo in range(0, len(images), batch):
        x = tf.convert_to_tensor(images[lo:lo + batch])
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(_objective(graph, x, anchors[lo:lo + batch], targeted))
        out[lo:lo + batch] = tape.gradient(loss, x).numpy()
    return out


def quantise(original: np.ndarray, perturbed: np.ndarray, eps: int) -> np.ndarray:
    """The saved adversarial image: rounded to uint8, then clipped to the budget around the original and to [0, 255]."""
    x = np.asarray(original, np.int16)
    adv = np.rint(np.asarray(perturbed, np.float32)).astype(np.int16)
    adv = np.clip(adv, x - eps, x + eps)
    return np.clip(adv, 0, 255).astype(np.uint8)


def attack(graph: Any, pixels: np.ndarray, eps: int, method: str = "pgd", targets: np.ndarray | None = None,
           anchors: np.ndarray | None = None, opts: AttackOptions = AttackOptions(), batch: int = 32) -> np.ndarray:
    """Adversarial uint8 pixels (n, H, W, 3) for uint8 ``pixels`` under an L∞ budget of ``eps`` grey levels.

    ``targets`` (n, D): make each image retrieve as its target vector. Without targets the
    attack is untargeted: away from ``anchors`` (default: the images' own clean embeddings).
    """
    if method not in ATTACKS:
        raise ValueError(f"unknown attack {method!r}: choose from {', '.join(ATTACKS)}")
    if int(eps) != eps or eps < 0:
        raise ValueError(f"eps is a whole number of grey levels ≥ 0, not {eps!r}")
    eps = int(eps)
    x0 = np.asarray(pixels)
    if x0.dtype != np.uint8 or x0.ndim != 4:
        raise ValueError("attack takes uint8 pixels (n, H, W, 3)")
    if eps == 0:
        return x0.copy()
    targeted = targets is not None
    goal = np.asarray(targets if targeted else (anchors if anchors is not None else graph.embed_numpy(x0)),
                      np.float32)
    if len(goal) != len(x0):
        raise ValueError(f"{len(goal)} target vectors for {len(x0)} images")
    rng = np.random.default_rng(opts.seed)
    x = x0.astype(np.float32)
    lo, hi = np.maximum(x - eps, 0.0), np.minimum(x + eps, 255.0)
    if method == "fgsm":
        start = x
        step = float(eps)
        if not targeted:  # R+FGSM: the untargeted objective has no gradient at the clean image
            start = np.clip(x + (eps / 2) * np.sign(rng.standard_normal(x.shape)).astype(np.float32), lo, hi)
            step = eps / 2
        adv = np.clip(start + step * np.sign(_gradient(graph, start, goal, targeted, batch)), lo, hi)
        return quantise(x0, adv, eps)
    adv = x.copy()
    if opts.random_start:
        adv = np.clip(adv + rng.uniform(-eps, eps, size=x.shape).astype(np.float32), lo, hi)
    alpha = opts.step_factor * eps / max(1, opts.steps)
    for _ in range(opts.steps):
        adv = np.clip(adv + alpha * np.sign(_gradient(graph, adv, goal, targeted, batch)), lo, hi)
    return quantise(x0, adv, eps)
