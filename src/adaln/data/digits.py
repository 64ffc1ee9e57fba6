"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) as diffusion training data.

The data ship inside scikit-learn (no download). Pixels are integers in [0, 16]; we scale them to
[-1, 1] like every image in this package, and split train / held-out deterministically and stratified
(every class in both splits, the same split on every call and every machine).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DIGITS_NUM_CLASSES = 10
DIGITS_IMAGE_SHAPE = (1, 8, 8)
DIGITS_MAX_PIXEL = 16.0
SPLITS = ("train", "heldout", "all")


def digits_split_indices(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: per class, a seeded permutation; the first round(fraction * n_c) go to held-out.

    Returns sorted (train_idx, heldout_idx). Rounding per class keeps every class in both splits for any
    fraction in (0, 1) as long as each class has at least two images.
    """
    rng = np.random.RandomState(seed)
    train, heldout = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_held = min(max(int(round(heldout_fraction * idx.size)), 1), idx.size - 1)
        heldout.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def load_digits(
    split: str = "train", *, heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Load the 8x8 digits: images float32 ``(N, 1, 8, 8)`` in [-1, 1], labels int64 ``(N,)``.

    ``split`` is "train" (80% by default), "heldout" (20%) or "all"; the split is stratified by class
    and fixed by ``seed``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)):
        raise TypeError(f"heldout_fraction must be a float in (0, 1), got {type(heldout_fraction).__name__}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split != "all":
        train_idx, heldout_idx = digits_split_indices(labels, heldout_fraction, seed)
        keep = train_idx if split == "train" else heldout_idx
        pixels, labels = pixels[keep], labels[keep]
    # [0, 16] -> [-1, 1]: x / 8 - 1, exact in float32 (16 levels, power-of-two divisor).
    images = (pixels / (DIGITS_MAX_PIXEL / 2) - 1.0).astype(np.float32)[:, None]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
