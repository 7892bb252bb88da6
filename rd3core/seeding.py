"""Explicit seeds everywhere: every random draw comes from a recorded integer
seed, never from the clock. ``derive_seed`` gives independent streams (init,
data order, augmentation, synthesis) from one cell seed."""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *tags: object) -> int:
    text = ":".join([str(seed), *map(str, tags)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def generator(seed: int, *tags: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (model initialisation draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
