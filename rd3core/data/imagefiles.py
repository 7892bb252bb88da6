"""Datasets stored as image files: ImageFolder trees (a directory or a .tar(.gz)
of one), and streaming of ImageNet-scale sets.

Small sets are decoded once, cached as .npz under the cache folder and held as
tensors. Large sets (``DatasetInfo.stream``) stay on disk: a :class:`StreamSplit`
lists the files, and DataLoader workers decode batches (short side resized,
centre crop) that are augmented on the device like any other batch. Every
decode goes through :func:`decode`, so a streamed test split and a resident one
of the same files give the same pixels.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np
import torch

from .base import Dataset, DatasetInfo, cached_arrays, from_arrays, source_digest, tensor_digest

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".ppm", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


def decode(source: bytes | str, side: int, channels: int, resize: int | None = None) -> np.ndarray:
    """[C, side, side] uint8: short side resized to ``resize`` (default ``side``),
    then a centre crop of ``side`` (the field's test transform; a no-op for
    images already at ``side``)."""
    from PIL import Image

    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img = img.convert("L" if channels == 1 else "RGB")
    short = resize or side
    if min(img.size) != short:
        scale = short / min(img.size)
        img = img.resize((max(short, round(img.size[0] * scale)), max(short, round(img.size[1] * scale))),
                         Image.BILINEAR)
    if img.size != (side, side):
        left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
        img = img.crop((left, top, left + side, top + side))
    arr = np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


# --------------------------------------------------------------------------------------
# Listing an ImageFolder tree: split/<class>/.../<image>, or Tiny-ImageNet's
# val/images/ + val/val_annotations.txt
# --------------------------------------------------------------------------------------

def _classify(names: Iterable[str], annotations: dict[str, str]) -> list[tuple[str, str, str]]:
    """(split, class, name) for every image name; the test split is test/ when
    present, else val/."""
    out = []
    for name in names:
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).suffix.lower() not in IMAGE_EXT:
            continue
        at = next((i for i, p in enumerate(parts) if p in SPLITS), None)
        if at is None:
            continue
        split, rest = parts[at], parts[at + 1:]
        if split == "val" and annotations and rest[0] == "images":
            cls = annotations.get(rest[-1])
        else:
            cls = rest[0] if len(rest) >= 2 else None
        if cls is not None:
            out.append((split, cls, name))
    test_name = "test" if any(s == "test" for s, _, _ in out) else "val"
    return [("test" if s == test_name else s, c, n) for s, c, n in out if s in ("train", test_name)]


def _annotations(text: str) -> dict[str, str]:
    return dict(line.split("\t")[:2] for line in text.splitlines() if "\t" in line)


def list_directory(path: Path) -> list[tuple[str, str, str]]:
    names = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        rel = Path(folder).relative_to(path).as_posix()
        names += [f"{rel}/{f}" if rel != "." else f for f in sorted(files)]
    ann = next((n for n in names if n.endswith("val/val_annotations.txt")), None)
    return _classify(names, _annotations((path / ann).read_text()) if ann else {})


def _read_tar(path: Path) -> tuple[list[tuple[str, str, str]], dict[str, bytes]]:
    blobs: dict[str, bytes] = {}
    ann = ""
    with tarfile.open(path) as tar:  # one sequential pass: gzip cannot seek cheaply
        for member in tar:
            if not member.isfile():
                continue
            if member.name.endswith("val/val_annotations.txt"):
                ann = tar.extractfile(member).read().decode()
            elif PurePosixPath(member.name).suffix.lower() in IMAGE_EXT:
                blobs[member.name] = tar.extractfile(member).read()
    return _classify(sorted(blobs), _annotations(ann)), blobs


def check_splits(name: str, path: Path, entries: list) -> list[str]:
    found = sorted({s for s, _, _ in entries})
    if found != ["test", "train"]:
        raise ValueError(f"dataset {name!r}: {path} must hold train/<class>/ and test/<class>/ "
                         f"(or val/<class>/) image files (found splits {found})")
    return sorted({c for _, c, _ in entries})


def load_imagefolder(path: str | Path, info: DatasetInfo, stream: bool | None = None) -> Dataset:
    """An ImageFolder tree (directory or .tar(.gz)): train/<class>/ and test/ or
    val/<class>/. Streamed when ``stream`` (default ``info.stream``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {info.name!r}: {path} does not exist")
    stream = info.stream if stream is None else stream
    if stream:
        return _stream_imagefolder(path, info)
    digest = source_digest(path)

    def build() -> dict[str, np.ndarray]:
        entries, read = open_tree(path)
        return decode_tree(info, check_splits(info.name, path, entries), entries, read)

    record = {"dataset": info.name, "source": str(path), "source_digest": digest, "format": "imagefolder"}
    return from_arrays(info, cached_arrays(info, digest, build), record)


def open_tree(path: Path):
    """(entries, read): the tree's (split, class, name) rows and name -> bytes."""
    if path.is_dir():
        return list_directory(path), lambda name: (path / name).read_bytes()
    entries, blobs = _read_tar(path)  # one sequential pass (gzip cannot seek cheaply)
    return entries, blobs.__getitem__


def decode_tree(info: DatasetInfo, classes: list[str], entries: list, read) -> dict[str, np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split in ("train", "test"):
        rows = [(c, n) for s, c, n in entries if s == split]
        arrays[f"{split}_x"] = np.stack([decode(read(n), info.size, info.channels, info.resize) for _, n in rows])
        arrays[f"{split}_y"] = np.asarray([index[c] for c, _ in rows], dtype=np.int64)
    return arrays


# --------------------------------------------------------------------------------------
# Streaming: files on disk, decoded by DataLoader workers
# --------------------------------------------------------------------------------------

class _Files(torch.utils.data.Dataset):
    def __init__(self, files: tuple[str, ...], side: int, resize: int, channels: int):
        self.files, self.side, self.resize, self.channels = files, side, resize, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode(self.files[i], self.side, self.channels, self.resize))


class _Batches:
    """A batch sampler whose batches are set before each pass, so one loader
    (and its persistent workers) serves every epoch."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LazyImages:
    """``split.images[idx]`` for a streamed split: decodes just those files at the
    test transform (what a synthesis method that selects real images needs)."""

    def __init__(self, split: "StreamSplit"):
        self.split = split
        info = split.info
        self.shape = (len(split), info.channels, info.size, info.size)
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        info = self.split.info
        rows = torch.arange(len(self.split))[idx]
        picks = [rows] if rows.ndim == 0 else rows.tolist()
        out = torch.stack([torch.from_numpy(decode(self.split.files[int(i)], info.size, info.channels, info.resize))
                           for i in picks])
        return out[0] if rows.ndim == 0 else out


@dataclass
class StreamSplit:
    """A split that stays on disk. Train batches are decoded square at
    ``info.resize`` and cropped to ``info.size`` on the device; test batches are
    decoded at the test transform."""

    files: tuple[str, ...]
    labels: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device) -> "StreamSplit":
        return self  # stays on disk; batches move to the device as they are decoded

    def subset(self, idx: torch.Tensor) -> "StreamSplit":
        return StreamSplit(tuple(self.files[i] for i in idx.tolist()), self.labels[idx], self.info)

    @property
    def images(self) -> LazyImages:
        return LazyImages(self)

    @property
    def train_hw(self) -> tuple[int, int]:
        side = self.info.resize or self.info.size
        return side, side

    def loader(self, train: bool, workers: int, pin_memory: bool = False):
        """(DataLoader, sampler): set ``sampler.batches`` before each pass; yields
        uint8 [B, C, H, W] in the sampler's order."""
        side = self.train_hw[0] if train else self.info.size
        sampler = _Batches()
        loader = torch.utils.data.DataLoader(
            _Files(self.files, side, self.info.resize, self.info.channels), batch_sampler=sampler,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory)
        return loader, sampler


def _stream_imagefolder(path: Path, info: DatasetInfo) -> Dataset:
    if not path.is_dir():
        raise ValueError(f"dataset {info.name!r}: {path} is an archive; a streamed dataset must be an extracted "
                         "directory (train/<class>/ and val/<class>/)")
    entries = list_directory(path)
    classes = check_splits(info.name, path, entries)
    if len(classes) != info.num_classes:
        raise ValueError(f"dataset {info.name!r}: {path} has {len(classes)} classes, expected {info.num_classes}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        rows = [(c, n) for s, c, n in entries if s == split]
        splits[split] = StreamSplit(tuple(str(path / n) for _, n in rows),
                                    torch.tensor([index[c] for c, _ in rows], dtype=torch.long), info)
    listing = hashlib.sha256("\n".join(n for _, _, n in entries).encode()).hexdigest()[:16]
    record = {"dataset": info.name, "source": str(path), "source_digest": listing, "format": "imagefolder-stream",
              "split": {"train": len(splits["train"]), "test": len(splits["test"]), "as_given": True},
              "fingerprint": tensor_digest(splits["train"].labels, splits["test"].labels) + listing[:8]}
    return Dataset(info, splits["train"], splits["test"], tuple(classes), record)
