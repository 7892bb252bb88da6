"""torchvision's CIFAR format: cifar-10-batches-py/ or cifar-100-python/, or their
tarballs, as torchvision downloads them."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from .base import Dataset, DatasetInfo, cached_arrays, from_arrays, source_digest


CIFAR_PICKLES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


def torchvision_cifar_source(path: Path, name: str) -> Path | None:
    """The folder or tarball holding torchvision's pickles for ``name``, if ``path`` is one."""
    folder = CIFAR_PICKLES[name][0]
    for candidate in (path, path / folder):
        if candidate.is_dir() and (candidate / CIFAR_PICKLES[name][3]).is_file():
            return candidate
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            first = tar.next()
            if first is not None and PurePosixPath(first.name).parts[0] == folder:
                return path
    return None


def load_torchvision_cifar(path: Path, info: DatasetInfo) -> Dataset:
    folder, train_files, test_files, meta_file, label_key, names_key = CIFAR_PICKLES[info.name]
    if path.is_dir():
        files = {f: (path / f).read_bytes() for f in (*train_files, *test_files, meta_file)}
    else:
        with tarfile.open(path) as tar:
            files = {PurePosixPath(m.name).name: tar.extractfile(m).read() for m in tar
                     if m.isfile() and PurePosixPath(m.name).parent.name == folder}
    digest = source_digest(path)

    def build() -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for split, names in (("train", train_files), ("test", test_files)):
            batches = [pickle.loads(files[n], encoding="bytes") for n in names]
            arrays[f"{split}_x"] = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
            arrays[f"{split}_y"] = np.concatenate([b[label_key] for b in batches]).astype(np.int64)
        meta = pickle.loads(files[meta_file], encoding="bytes")
        arrays["classes"] = np.array([n.decode() for n in meta[names_key]])
        return arrays

    record = {"dataset": info.name, "source": str(path), "source_digest": digest, "format": "torchvision-pickle"}
    return from_arrays(info, cached_arrays(info, digest, build), record)
