"""Dataset registry. Every per-dataset fact (classes, input size, mean/std,
family) lives in one :class:`DatasetInfo`: tabled in :data:`FACTS`, or for a
user's own ImageFolder tree (``imagefolder``) read from the data by
:func:`dataset_info`. Loaders return tensors that stay resident on the device
for small sets, airbench-style.

ImageNet-scale sets stream from disk instead (:class:`rd3core.imagefiles.StreamSplit`).
Images are kept as uint8 (real data) or float32 in [0, 1] (synthetic data);
:func:`as_float` turns either into [0, 1] floats for a batch, and
:meth:`DatasetInfo.normalize` applies mean/std right before the model.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .registry import Registry
from .seeding import generator


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int  # side of the square input the models see
    mean: tuple[float, ...]
    std: tuple[float, ...]
    family: str  # 'digits' | 'cifar' | 'tiny' | 'imagenet': selects per-family preset values
    source: str  # where the data comes from, for the record
    # Test transform: short side resized to `resize` (0: to `size`), centre crop
    # of `size`. Streamed train images are decoded square at `resize` and
    # cropped to `size` on the device.
    resize: int = 0
    stream: bool = False  # ImageNet-scale: files stay on disk, DataLoader workers decode
    # Content digest of data whose facts were read from it (`imagefolder`): what
    # tells two such datasets apart in cell and stage ids. '' for fixed facts.
    digest: str = ""

    @property
    def test_transform(self) -> str:
        short = self.resize or self.size
        return f"resize short side to {short}, centre crop {self.size}"

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cached per device: building them from Python floats every step would be
        # a host-to-device copy per batch.
        key = (self.mean, self.std, str(x.device), x.dtype)
        if key not in _STATS:
            _STATS[key] = (torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1),
                           torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1))
        return _STATS[key]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return x * std + mean


_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass
class Split:
    images: torch.Tensor  # [N, C, H, W], uint8 or float32 in [0, 1]
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    info: DatasetInfo
    train: Split  # or a StreamSplit (rd3core.imagefiles) for streamed sets
    test: Split
    classes: tuple[str, ...]
    # How the data was obtained and split, stored with every result.
    record: dict = field(default_factory=dict)
    # Real training images set aside for selecting an epoch (never trained on, never
    # the test set): made by carve_heldout, None for the whole training split.
    heldout: Split | None = None

    @property
    def fingerprint(self) -> str:
        return self.record["fingerprint"]


def as_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# The held-out split is one fixed draw from this seed, the same for every cell and
# study, so that epochs selected on it compare.
HELDOUT_SEED = 0


def train_class_counts(dataset: Dataset) -> list[int]:
    """Training images per class."""
    return torch.bincount(dataset.train.labels, minlength=dataset.info.num_classes).tolist()


def heldout_problem(dataset: Dataset, per_class: int) -> str | None:
    """What is wrong with carving ``per_class`` held-out images per class out of
    ``dataset`` (every class must keep a training image), or None."""
    if per_class < 0:
        return f"expected >= 0, got {per_class}"
    counts = train_class_counts(dataset)
    smallest = min(counts)
    if per_class >= smallest:
        return (f"expected less than {smallest}, the training images of the smallest class "
                f"({dataset.info.name!r} class {counts.index(smallest)}), so every class keeps one; got {per_class}")
    return None


def carve_heldout(dataset: Dataset, per_class: int, seed: int = HELDOUT_SEED) -> Dataset:
    """``dataset`` with ``per_class`` training images of every class moved out of
    ``train`` into ``heldout`` (a class-balanced draw from ``seed``), for choosing
    an epoch without looking at the test set.

    Carve before anything sees the data: teachers, synthesis and post-evaluation
    all given the carved dataset never see a held-out image, so no distilled
    image can be one. ``record["heldout"]`` says what was carved and the
    fingerprint differs from the whole dataset's. ``per_class`` 0 returns
    ``dataset`` itself; every class must keep at least one training image."""
    if dataset.heldout is not None:
        raise ValueError(f"dataset {dataset.info.name!r} already has a held-out split: carve the whole dataset")
    problem = heldout_problem(dataset, per_class)
    if problem:
        raise ValueError(f"heldout_per_class: {problem}")
    if per_class == 0:
        return dataset
    gen = generator(seed, "heldout")
    labels = dataset.train.labels
    picks = []
    for c in range(dataset.info.num_classes):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    held = torch.cat(picks)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    indices_sha = tensor_digest(held)
    fingerprint = hashlib.sha256(f"{dataset.fingerprint}:heldout:{per_class}:{seed}:{indices_sha}".encode())
    record = {**dataset.record, "fingerprint": fingerprint.hexdigest()[:16],
              "heldout": {"per_class": per_class, "seed": seed, "images": len(held), "train": int(keep.sum()),
                          "indices_sha": indices_sha, "whole_fingerprint": dataset.fingerprint}}
    return replace(dataset, train=dataset.train.subset(torch.nonzero(keep).flatten()),
                   heldout=dataset.train.subset(held), record=record)


# --------------------------------------------------------------------------------------
# Registry: name -> loader(root, info) -> Dataset
# --------------------------------------------------------------------------------------

Loader = Callable[..., Dataset]  # (root, stream=None) -> Dataset
# (facts, loader); facts None: read from the data by ``loader.facts(root)``.
DATASETS: Registry[tuple[DatasetInfo | None, Loader]] = Registry("dataset")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
DIGITS_SIZE = 16


def _load_digits(root: str | None, stream: bool | None = None) -> Dataset:
    from sklearn.datasets import load_digits

    info = DATASETS.get("digits")[0]
    bunch = load_digits()
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


DATASETS.add("digits", (DatasetInfo(
    name="digits", num_classes=10, channels=1, size=DIGITS_SIZE, mean=(0.3,), std=(0.38,),
    family="digits", source="sklearn.datasets.load_digits (UCI optdigits test set), 8x8 upsampled to 16x16",
), _load_digits))


# --------------------------------------------------------------------------------------
# File-based datasets: every per-dataset fact in the table below
# --------------------------------------------------------------------------------------

def cache_dir() -> Path:
    root = os.environ.get("RD3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rd3bench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_imagefolder(path: str | Path, info: DatasetInfo, stream: bool | None = None) -> Dataset:
    """Any ImageFolder tree or .tar(.gz) of one (see :mod:`rd3core.imagefiles`)."""
    from .imagefiles import load_imagefolder as load
    return load(path, info, stream)


def data_env_var(name: str) -> str:
    """The environment variable that says where dataset ``name`` is."""
    return f"RD3_DATA_{name.upper()}"


def _root_from_env(name: str, root: str | None) -> str:
    """A dataset path comes from the study (root) or RD3_DATA_<NAME>."""
    env = data_env_var(name)
    found = root or os.environ.get(env)
    if not found:
        raise FileNotFoundError(
            f"dataset {name!r} needs a path: set 'dataset.root' in the study or the environment variable {env}")
    return found


def _file_loader(name: str) -> Loader:
    def load(root: str | None, stream: bool | None = None) -> Dataset:
        from . import imagefiles

        info = DATASETS.get(name)[0]
        path = Path(_root_from_env(name, root)).expanduser()
        if name in imagefiles.CIFAR_PICKLES and path.exists():
            found = imagefiles.torchvision_cifar_source(path, name)
            if found is not None:
                return imagefiles.load_torchvision_cifar(found, info)
        return imagefiles.load_imagefolder(path, info, stream)
    load.needs_root = True
    return load


def check_location(name: str, root: str | None) -> None:
    """Raise FileNotFoundError (with what to do) when a dataset that needs a path
    has none or the path does not exist; a no-op for bundled datasets."""
    _, loader = DATASETS.get(name)
    if getattr(loader, "needs_root", False):
        path = Path(_root_from_env(name, root)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset {name!r}: {path} does not exist")


# --------------------------------------------------------------------------------------
# `imagefolder`: a user's own tree, its facts read from the data
# --------------------------------------------------------------------------------------

def family_for_size(size: int) -> str:
    """The preset family of a user's dataset, by input side, as the presets
    expect: <= 32 cifar, <= 64 tiny, larger imagenet."""
    return "cifar" if size <= 32 else "tiny" if size <= 64 else "imagenet"


def _imagefolder_info(root: str | None) -> DatasetInfo:
    from .userfolder import read_facts

    path = Path(_root_from_env("imagefolder", root)).expanduser()
    facts = read_facts(path, "imagefolder")
    return DatasetInfo(
        "imagefolder", len(facts["classes"]), 3, facts["size"], tuple(facts["mean"]), tuple(facts["std"]),
        family_for_size(facts["size"]),
        f"ImageFolder tree {path}: classes, size and mean/std read from its train images", digest=facts["digest"])


def _load_user_folder(root: str | None, stream: bool | None = None) -> Dataset:
    from . import imagefiles

    info = _imagefolder_info(root)
    return imagefiles.load_imagefolder(Path(_root_from_env("imagefolder", root)).expanduser(), info, stream)


_load_user_folder.needs_root = True
_load_user_folder.facts = _imagefolder_info  # root -> DatasetInfo: facts derived, never tabled


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
for _info in FACTS:
    DATASETS.add(_info.name, (_info, _file_loader(_info.name)))
# No tabled facts (None): dataset_info reads them from the data at `root`.
DATASETS.add("imagefolder", (None, _load_user_folder))


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
