"""A planted learning-rate trap for the fair-tuning tests: two external sets on
``digits`` whose ranking flips when each gets its own learning rate.

- ``easy`` (A): one prototypical image per class (the training image nearest
  its class mean), repeated 50 times: an IPC-50 file holding IPC-1 information.
  Low ceiling (~82-87% test), but 500 images give 5 optimizer steps per epoch
  at batch size 100, so it is near that ceiling even at a tiny lr.
- ``diverse`` (B): 10 random real training images per class (IPC 10). Higher
  ceiling (~90-92%), but its 100 images are ONE step per epoch at batch size
  100: with a fixed epoch budget it takes 5x fewer steps than A, so under Adam
  (step size ~ lr) a small lr leaves it far from converged.

Under the unified recipe (the ``rd3`` preset with ``PROTOCOL`` and lr
``UNIFIED_LR`` = 1e-4; note the preset's own lr is 1e-3, where B already wins)
A beats B by 20+ points. Each tuned over ``LR_GRID`` or a loguniform(1e-4,
1e-1) search, B beats A by 3.5+ points (mostly 5-10) on test, the lr chosen on
held-out accuracy at the last epoch of a ``carve_heldout(digits, 5)`` split:
A peaks at 82-88% anywhere in 3e-4..3e-3, B holds 90-92% over 1e-3..3e-2.
Measured for seeds 0, 1, 2 and 1000 (any eval.interval dividing the epochs:
training does not depend on it); each post-evaluation takes 2-4 s on one CPU
thread. Only the lr may be searched: a searched batch size would also rescue B.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rd3core.data import carve_heldout, load_dataset

HELDOUT_PER_CLASS = 5
# Overrides of the ``rd3`` preset (family digits); only optim.lr varies.
PROTOCOL = {"student": "convnet3-w32", "epochs": 30, "batch_size": 100, "labels": {"mode": "hard"},
            "augment": {"flip": False, "mix": "none"}, "eval": {"interval": 1}}
UNIFIED_LR = 1e-4
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def write_planted_sets(folder: Path, heldout_per_class: int = HELDOUT_PER_CLASS) -> dict[str, dict]:
    """Write ``easy.pt`` and ``diverse.pt`` into ``folder``; return each one's
    study ``methods:`` entry, by label. Deterministic. The images come from the
    training split left after carving ``heldout_per_class`` images per class
    (the study's own carve, seed 0), so none of them is a held-out image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = carve_heldout(load_dataset("digits"), heldout_per_class).train
    gen = torch.Generator().manual_seed(0)
    easy, diverse = [], []
    for c in range(10):
        members = train.images[train.labels == c]
        nearest = ((members - members.mean(0, keepdim=True)) ** 2).flatten(1).sum(1).argmin()
        easy.append(members[nearest].expand(50, -1, -1, -1))
        diverse.append(members[torch.randperm(len(members), generator=gen)[:10]])
    entries = {}
    for label, images in (("easy", easy), ("diverse", diverse)):
        ipc = len(images[0])
        path = folder / f"{label}.pt"
        # float pixels in [0, 1], as the dataset holds them (no uint8 rounding)
        torch.save({"images": torch.cat(images).contiguous(), "labels": torch.arange(10).repeat_interleave(ipc)},
                   path)
        entries[label] = {"name": "external", "label": label, "path": str(path), "ipc": ipc}
    return entries
