"""Datasets: one registry of named datasets and the one table of their facts
(classes, input size, mean/std, family). A dataset without tabled facts (a
user's own ImageFolder tree, ``imagefolder``) has them read from the data by
:func:`dataset_info`. Loaders return tensors that stay resident on the device
for small sets, airbench-style; ImageNet-scale sets stream from disk
(:class:`imagefiles.StreamSplit`).

Images are kept as uint8 (real data) or float32 in [0, 1] (synthetic data);
:func:`as_float` turns either into [0, 1] floats for a batch, and
:meth:`DatasetInfo.normalize` applies mean/std right before the model.

Modules: ``base`` (the types and what every source shares), one per source kind
(``digits``, ``imagefiles``: ImageFolder trees and tarballs, ``cifar_pickles``:
torchvision's CIFAR format, ``userfolder``: a tree whose facts come from its
data) and ``heldout``. Sources import ``base`` (``userfolder`` also
``imagefiles``); only this module imports them all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..registry import Registry
from . import cifar_pickles, digits, imagefiles, userfolder
from .base import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, Dataset, DatasetInfo, Split, as_float,
                   cache_dir, data_env_var, family_for_size, root_from_env, tensor_digest)
from .heldout import HELDOUT_SEED, carve_heldout, heldout_problem, train_class_counts
from .imagefiles import load_imagefolder

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "DATASETS", "FACTS", "HELDOUT_SEED", "IMAGENET_MEAN", "IMAGENET_STD", "Dataset",
    "DatasetInfo", "Split", "as_float", "cache_dir", "carve_heldout", "check_location", "data_env_var",
    "dataset_info", "family_for_size", "heldout_problem", "list_datasets", "load_dataset", "load_imagefolder",
    "tensor_digest", "train_class_counts",
]

Loader = Callable[..., Dataset]  # (root, stream=None) -> Dataset
# (facts, loader); facts None: read from the data by ``loader.facts(root)``.
DATASETS: Registry[tuple[DatasetInfo | None, Loader]] = Registry("dataset")


def _file_loader(name: str) -> Loader:
    def load(root: str | None, stream: bool | None = None) -> Dataset:
        info = DATASETS.get(name)[0]
        path = Path(root_from_env(name, root)).expanduser()
        if name in cifar_pickles.CIFAR_PICKLES and path.exists():
            found = cifar_pickles.torchvision_cifar_source(path, name)
            if found is not None:
                return cifar_pickles.load_torchvision_cifar(found, info)
        return imagefiles.load_imagefolder(path, info, stream)
    load.needs_root = True
    return load


_FOLDER = "ImageFolder tree (train/<class>/, val/<class>/)"
_CIFAR = "ImageFolder tree or .tar.gz of one, or torchvision's cifar-*-python folder/tarball"
# The one place for per-dataset facts: classes, channels, input side, mean/std,
# family (selects per-family preset blocks), the test transform (short side
# resized to `resize`, centre crop of `size`) and whether the set streams.
FACTS = (
    DatasetInfo("cifar10", 10, 3, 32, CIFAR_MEAN, CIFAR_STD, "cifar", _CIFAR),
    DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar", _CIFAR),
    DatasetInfo("tinyimagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), "tiny",
                _FOLDER + " or the original val/images + val_annotations.txt"),
    DatasetInfo("imagenet1k", 1000, 3, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet", _FOLDER, resize=256,
                stream=True),
    DatasetInfo("imagenette", 10, 3, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet",
                _FOLDER + " (fast.ai imagenette2)", resize=256, stream=True),
    DatasetInfo("imagewoof", 10, 3, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet",
                _FOLDER + " (fast.ai imagewoof2)", resize=256, stream=True),
)
DATASETS.add("digits", (digits.DIGITS, digits.load_digits))
for _info in FACTS:
    DATASETS.add(_info.name, (_info, _file_loader(_info.name)))
# No tabled facts (None): dataset_info reads them from the data at `root`.
DATASETS.add(userfolder.NAME, (None, userfolder.load))


def check_location(name: str, root: str | None) -> None:
    """Raise FileNotFoundError (with what to do) when a dataset that needs a path
    has none or the path does not exist; a no-op for bundled datasets."""
    _, loader = DATASETS.get(name)
    if getattr(loader, "needs_root", False):
        path = Path(root_from_env(name, root)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset {name!r}: {path} does not exist")


def dataset_info(name: str, root: str | None = None) -> DatasetInfo:
    """The facts of dataset ``name``: from the table, or for a dataset described
    by its own data (``imagefolder``) read from ``root`` / RD3_DATA_<NAME>
    (FileNotFoundError when it is missing, ValueError when the tree breaks the
    rules; cached, so cheap after the first call)."""
    info, loader = DATASETS.get(name)
    return loader.facts(root) if info is None else info


def load_dataset(name: str, root: str | None = None, stream: bool | None = None) -> Dataset:
    """Load a registered dataset. ``stream`` overrides the dataset's default
    (ImageNet-scale sets stream from disk; small sets are held as tensors)."""
    _, loader = DATASETS.get(name)
    return loader(root) if stream is None else loader(root, stream)


def list_datasets() -> list[str]:
    return DATASETS.names()
