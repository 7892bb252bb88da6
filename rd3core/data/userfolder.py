"""A user's own ImageFolder tree (the ``imagefolder`` dataset): no tabled facts;
classes, input side and mean/std are read from the data itself. The tree is read
and decoded by :mod:`rd3core.data.imagefiles`, into the same cache its loader uses."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np

from .base import Dataset, DatasetInfo, cache_dir, cached_arrays, family_for_size, root_from_env, source_digest
from .imagefiles import SPLITS, check_splits, decode_tree, load_imagefolder, open_tree

NAME = "imagefolder"


def dataset_info(root: str | None) -> DatasetInfo:
    """The facts of the tree at ``root`` (or RD3_DATA_IMAGEFOLDER): never tabled."""
    path = Path(root_from_env(NAME, root)).expanduser()
    facts = read_facts(path, NAME)
    return DatasetInfo(
        NAME, len(facts["classes"]), 3, facts["size"], tuple(facts["mean"]), tuple(facts["std"]),
        family_for_size(facts["size"]),
        f"ImageFolder tree {path}: classes, size and mean/std read from its train images", digest=facts["digest"])


def load(root: str | None, stream: bool | None = None) -> Dataset:
    info = dataset_info(root)
    return load_imagefolder(Path(root_from_env(NAME, root)).expanduser(), info, stream)


load.needs_root = True
load.facts = dataset_info  # root -> DatasetInfo: facts derived, never tabled


FACTS_VERSION = 1  # bump when what read_facts derives changes: cached facts are then re-read


def read_facts(path: str | Path, name: str) -> dict:
    """What :func:`dataset_info` needs to describe a user's ImageFolder tree (or
    .tar(.gz) of one): ``classes`` (train/'s sorted subfolders; the test split
    must hold the same), ``size`` (every train image is square and of one size),
    ``mean``/``std`` (per RGB channel, over every pixel of the train images in
    [0, 1]) and ``digest`` (of the decoded pixels, labels and class names: the
    data's identity, the same for a folder and a tarball of it).

    Reading them decodes the tree once into the same .npz cache the loader then
    uses; the facts themselves are cached as JSON under the source digest, so
    later calls cost one :func:`source_digest`. A tree that breaks the rules
    raises ValueError saying what to fix."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {name!r}: {path} does not exist")
    digest = source_digest(path)
    seen = _FACTS_SEEN.get((str(path.resolve()), name, digest))
    if seen is None:
        try:
            seen = _read_facts(path, name, digest)
        except ValueError as exc:  # a bad tree: said once per process, not re-read by every check
            seen = exc
        _FACTS_SEEN[str(path.resolve()), name, digest] = seen
    if isinstance(seen, ValueError):
        raise ValueError(str(seen))
    return dict(seen)


_FACTS_SEEN: dict[tuple[str, str, str], dict | ValueError] = {}


def _read_facts(path: Path, name: str, digest: str) -> dict:
    cached = cache_dir() / f"{name}-facts-{digest}.json"
    if cached.exists():
        facts = json.loads(cached.read_text())
        if facts.get("version") == FACTS_VERSION:
            return facts
    entries, read = open_tree(path)
    classes = check_splits(name, path, entries)
    _check_same_classes(name, path, entries)
    side = _train_side(name, path, entries, read)
    info = DatasetInfo(name, len(classes), 3, side, (), (), "", str(path))  # what decoding and the cache use
    arrays = cached_arrays(info, digest, lambda: decode_tree(info, classes, entries, read))
    x = arrays["train_x"]  # [N, 3, side, side] uint8
    pixels = x.shape[0] * side * side
    total = x.sum(axis=(0, 2, 3), dtype=np.float64) / 255.0
    squares = np.einsum("nchw,nchw->c", x, x, dtype=np.float64) / 255.0 ** 2
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 0.0))
    content = hashlib.sha256(np.asarray(classes).tobytes())
    for key in ("train_x", "train_y", "test_x", "test_y"):
        content.update(np.ascontiguousarray(arrays[key]).tobytes())
    # digest: the decoded pixels, labels and class names, so the same data has one
    # identity wherever it lives (folder or tarball); source_digest keys the caches.
    facts = {"version": FACTS_VERSION, "digest": content.hexdigest()[:16], "source_digest": digest,
             "classes": classes, "size": side,
             # Rounded like the published tables; a floor keeps one-colour data finite.
             "mean": [round(float(m), 4) for m in mean], "std": [max(round(float(s), 4), 0.01) for s in std],
             "train": int(x.shape[0]), "test": int(arrays["test_x"].shape[0])}
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(facts))
    os.replace(tmp, cached)
    return facts


def _folder_of(entries: list, split: str) -> str:
    """The tree's own name for a split (test/ or val/, under any top folder)."""
    name = next(n for s, _, n in entries if s == split)
    parts = PurePosixPath(name).parts
    at = next(i for i, p in enumerate(parts) if p in SPLITS)
    return "/".join(parts[: at + 1]) + "/"


def _check_same_classes(name: str, path: Path, entries: list) -> None:
    train = {c for s, c, _ in entries if s == "train"}
    test = {c for s, c, _ in entries if s == "test"}
    if train != test:
        a, b = _folder_of(entries, "train"), _folder_of(entries, "test")
        only = "; ".join(f"only in {where}: {', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''}"
                         for where, extra in ((a, train - test), (b, test - train)) if extra)
        raise ValueError(f"dataset {name!r}: {path}: {a} and {b} must hold the same class folders ({only})")


def _train_side(name: str, path: Path, entries: list, read) -> int:
    from PIL import Image

    sizes: dict[tuple[int, int], list[str]] = {}
    for split, _, member in entries:
        if split == "train":
            source = read(member)
            with Image.open(io.BytesIO(source)) as img:  # reads the header only
                sizes.setdefault(img.size, []).append(member)
    square = [s for s in sizes if s[0] == s[1]]
    if len(sizes) == 1 and square:
        return square[0][0]
    shown = ", ".join(f"{w}x{h} ({len(sizes[w, h])}, e.g. {sizes[w, h][0]})"
                      for w, h in sorted(sizes, key=lambda s: -len(sizes[s]))[:4])
    raise ValueError(f"dataset {name!r}: {path}: every train image must be square and of one size (found {shown}); "
                     "resize them first, e.g. to 32x32, 64x64 or 224x224 (test images may be any size: they get "
                     "the test transform)")
