"""scikit-learn's 8x8 digits, bundled: the dataset of the default study and the tests."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .base import Dataset, DatasetInfo, Split, tensor_digest

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
DIGITS_SIZE = 16
DIGITS = DatasetInfo(
    name="digits", num_classes=10, channels=1, size=DIGITS_SIZE, mean=(0.3,), std=(0.38,),
    family="digits", source="sklearn.datasets.load_digits (UCI optdigits test set), 8x8 upsampled to 16x16",
)


def load_digits(root: str | None, stream: bool | None = None) -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits

    info = DIGITS
    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    # 8x8 upsampled to 16x16 so that crops, flips and patch shuffles act on more
    # than a handful of pixels; kept in float so no precision is lost.
    x = torch.nn.functional.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    # Stratified split with a fixed, recorded seed.
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_idx: list[int] = []
    for c in range(10):
        members = np.flatnonzero(bunch.target == c)
        rng.shuffle(members)
        test_idx.extend(members[: int(round(len(members) * DIGITS_TEST_FRACTION))].tolist())
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    train = Split(x[~is_test], y[~is_test])
    test = Split(x[is_test], y[is_test])
    record = {
        "dataset": "digits",
        "source": info.source,
        "split": {"seed": DIGITS_SPLIT_SEED, "test_fraction": DIGITS_TEST_FRACTION,
                  "train": len(train), "test": len(test),
                  "test_indices_sha": hashlib.sha256(np.flatnonzero(is_test).tobytes()).hexdigest()[:16]},
        "fingerprint": tensor_digest(train.images, train.labels, test.images, test.labels),
    }
    return Dataset(info, train, test, tuple(str(c) for c in range(10)), record)
