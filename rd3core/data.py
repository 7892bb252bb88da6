"""Dataset registry. Every per-dataset fact (classes, input size, mean/std,
family) lives in one :class:`DatasetInfo`; loaders return tensors that stay
resident on the device for small sets, airbench-style.

Images are kept as uint8 (real data) or float32 in [0, 1] (synthetic data);
:func:`as_float` turns either into [0, 1] floats for a batch, and
:meth:`DatasetInfo.normalize` applies mean/std right before the model.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .registry import Registry


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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return x * std + mean


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
    train: Split
    test: Split
    classes: tuple[str, ...]
    # How the data was obtained and split, stored with every result.
    record: dict = field(default_factory=dict)

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


# --------------------------------------------------------------------------------------
# Registry: name -> loader(root, info) -> Dataset
# --------------------------------------------------------------------------------------

Loader = Callable[[str | None], Dataset]
DATASETS: Registry[tuple[DatasetInfo, Loader]] = Registry("dataset")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
DIGITS_SIZE = 16


def _load_digits(root: str | None) -> Dataset:
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
# ImageFolder trees (directory or .tar.gz), decoded once and cached as .npz
# --------------------------------------------------------------------------------------

def cache_dir() -> Path:
    root = os.environ.get("RD3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rd3bench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _decode(data: bytes, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        # Small-image sets are stored at their native size; the short side is
        # resized and centre-cropped, as the field's test transforms do.
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))), Image.BILINEAR)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _iter_imagefolder(path: Path):
    """Yield (split, class_name, bytes) from a directory or a .tar(.gz) holding
    train/<class>/<file> and test/<class>/<file>."""
    if path.is_dir():
        for file in sorted(path.glob("*/*/*")):
            if file.is_file():
                yield file.parts[-3], file.parts[-2], file.read_bytes()
        return
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = Path(member.name).parts
            parts = parts[parts.index("train") if "train" in parts else parts.index("test") if "test" in parts else 0:]
            if len(parts) != 3 or parts[0] not in ("train", "test", "val"):
                continue
            yield parts[0], parts[1], tar.extractfile(member).read()


def _file_digest(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for file in sorted(path.glob("*/*/*")):
            h.update(str(file.relative_to(path)).encode())
            h.update(str(file.stat().st_size).encode())
        return h.hexdigest()[:16]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_imagefolder(path: str | Path, info: DatasetInfo) -> Dataset:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {info.name!r}: {path} does not exist")
    digest = _file_digest(path)
    cached = cache_dir() / f"{info.name}-{info.size}-{digest}.npz"
    if cached.exists():
        z = np.load(cached, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    else:
        buckets: dict[str, tuple[list, list]] = {}
        raw = list(_iter_imagefolder(path))
        classes = sorted({c for _, c, _ in raw})
        index = {c: i for i, c in enumerate(classes)}
        for split, cls, data in raw:
            split = "test" if split == "val" else split
            xs, ys = buckets.setdefault(split, ([], []))
            xs.append(_decode(data, info.size, info.channels))
            ys.append(index[cls])
        if set(buckets) != {"train", "test"}:
            raise ValueError(f"dataset {info.name!r}: {path} must hold train/<class>/ and test/<class>/ (found {sorted(buckets)})")
        arrays = {"classes": np.array(classes)}
        for split, (xs, ys) in buckets.items():
            arrays[f"{split}_x"] = np.stack(xs)
            arrays[f"{split}_y"] = np.asarray(ys, dtype=np.int64)
        tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cached)  # atomic: concurrent loaders never see half a file
    classes = tuple(str(c) for c in arrays["classes"])
    if len(classes) != info.num_classes:
        raise ValueError(f"dataset {info.name!r}: {path} has {len(classes)} classes, expected {info.num_classes}")
    train = Split(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
    test = Split(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))
    record = {"dataset": info.name, "source": str(path), "source_digest": digest,
              "split": {"train": len(train), "test": len(test), "as_given": True},
              "fingerprint": tensor_digest(train.labels, test.labels) + digest[:8]}
    return Dataset(info, train, test, classes, record)


def _root_from_env(name: str, root: str | None) -> str:
    """A dataset path comes from the study (root) or RD3_DATA_<NAME>."""
    env = f"RD3_DATA_{name.upper()}"
    found = root or os.environ.get(env)
    if not found:
        raise FileNotFoundError(
            f"dataset {name!r} needs a path: set 'dataset.root' in the study or the environment variable {env}")
    return found


def _folder_loader(name: str) -> Loader:
    def load(root: str | None) -> Dataset:
        return load_imagefolder(_root_from_env(name, root), DATASETS.get(name)[0])
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


for _info in (
    DatasetInfo("cifar10", 10, 3, 32, CIFAR_MEAN, CIFAR_STD, "cifar", "ImageFolder tree or .tar.gz of one"),
    DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar",
                "ImageFolder tree or .tar.gz of one"),
    DatasetInfo("tinyimagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), "tiny",
                "ImageFolder tree (train/, test/ or val/)"),
):
    DATASETS.add(_info.name, (_info, _folder_loader(_info.name)))


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)[0]


def load_dataset(name: str, root: str | None = None) -> Dataset:
    info, loader = DATASETS.get(name)
    return loader(root)


def list_datasets() -> list[str]:
    return DATASETS.names()
