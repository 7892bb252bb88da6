"""The types every dataset source builds (:class:`DatasetInfo`, :class:`Split`,
:class:`Dataset`) and what the sources share: where a dataset's path comes from,
the decoded-array cache and digests. Imports no other module of the package."""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def cache_dir() -> Path:
    root = os.environ.get("RD3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rd3bench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_env_var(name: str) -> str:
    """The environment variable that says where dataset ``name`` is."""
    return f"RD3_DATA_{name.upper()}"


def root_from_env(name: str, root: str | None) -> str:
    """A dataset path comes from the study (root) or RD3_DATA_<NAME>."""
    env = data_env_var(name)
    found = root or os.environ.get(env)
    if not found:
        raise FileNotFoundError(
            f"dataset {name!r} needs a path: set 'dataset.root' in the study or the environment variable {env}")
    return found


def family_for_size(size: int) -> str:
    """The preset family of a user's dataset, by input side, as the presets
    expect: <= 32 cifar, <= 64 tiny, larger imagenet."""
    return "cifar" if size <= 32 else "tiny" if size <= 64 else "imagenet"


# --------------------------------------------------------------------------------------
# Files: the digest that keys the caches, and the cache of decoded arrays
# --------------------------------------------------------------------------------------

def source_digest(path: Path) -> str:
    """Names, sizes and mtimes of a tree's files (cheap: no file is read; an
    image rewritten in place is seen), or the bytes of an archive (hashed once
    per process while its size and mtime stay the same). Keys the caches."""
    if not path.is_dir():
        stat = path.stat()
        return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            full = Path(folder) / f
            h.update(str(full.relative_to(path)).encode())
            stat = full.stat()
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cached_arrays(info: DatasetInfo, digest: str, build) -> dict[str, np.ndarray]:
    """The decoded arrays of a source (``build()``, run once), cached as .npz under
    :func:`cache_dir` by dataset, input side and ``digest``."""
    resize = f"-r{info.resize}" if info.resize and info.resize != info.size else ""
    cached = cache_dir() / f"{info.name}-{info.size}{resize}-{digest}.npz"
    if cached.exists():
        z = np.load(cached, allow_pickle=False)
        return {k: z[k] for k in z.files}
    arrays = build()
    tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cached)  # atomic: concurrent loaders never see half a file
    return arrays


def from_arrays(info: DatasetInfo, arrays: dict[str, np.ndarray], record: dict) -> Dataset:
    """A resident :class:`Dataset` of decoded arrays (classes, train/test x and y)."""
    classes = tuple(str(c) for c in arrays["classes"])
    if len(classes) != info.num_classes:
        raise ValueError(f"dataset {info.name!r}: {record['source']} has {len(classes)} classes, "
                         f"expected {info.num_classes}")
    train = Split(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
    test = Split(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))
    record["split"] = {"train": len(train), "test": len(test), "as_given": True}
    record["fingerprint"] = tensor_digest(train.labels, test.labels) + record["source_digest"][:8]
    return Dataset(info, train, test, classes, record)
