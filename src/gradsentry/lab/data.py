"""The lab's data: scikit-learn's bundled handwritten digits, as tensors, loaded once per process.

The digits set (Alpaydin & Kaynak 1998, UCI "Optical Recognition of Handwritten Digits"; bundled
with scikit-learn, no download) has 1,797 grey-scale 8x8 images of the digits 0-9. Pixels (0-16)
are scaled to [0, 1] and the set is split once into a stratified train/test split with a fixed seed,
so every variant of the lab sees exactly the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from gradsentry._extras import requires_extra

SPLIT_SEED = 0
"""Seed of the stratified train/test split (fixed: every run of the lab uses the same split)."""
TEST_FRACTION = 0.2
"""Fraction of the 1,797 digits held out for testing (360 test, 1,437 train examples)."""
N_FEATURES = 64
"""Input features per example: the 8x8 pixels, flattened."""
N_CLASSES = 10


@dataclass(frozen=True)
class Digits:
    """The digits split, as CPU tensors.

    Attributes:
        x_train: ``[N_train, 64]`` float32 pixels in [0, 1] (N_train = 1,437).
        y_train: ``[N_train]`` int64 labels in 0..9.
        x_test: ``[N_test, 64]`` float32 pixels in [0, 1] (N_test = 360).
        y_test: ``[N_test]`` int64 labels in 0..9.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return N_CLASSES


@lru_cache(maxsize=1)
def load_digits() -> Digits:
    """Load, scale and split the digits (cached: the files are read once per process).

    Returns:
        The fixed :class:`Digits` split. The tensors are shared between callers: do not modify
        them in place.

    Raises:
        gradsentry._extras.MissingExtraError: scikit-learn is not installed (``gradsentry[lab]``).

    Example:
        >>> d = load_digits()
        >>> tuple(d.x_train.shape), tuple(d.x_test.shape), float(d.x_train.max())
        ((1437, 64), (360, 64), 1.0)
    """
    with requires_extra("lab", "the lab"):
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = bunch.data.astype("float32") / 16.0
    y = bunch.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    return Digits(
        x_train=torch.from_numpy(x_tr),
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te),
        y_test=torch.from_numpy(y_te),
    )
