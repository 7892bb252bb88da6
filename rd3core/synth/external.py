"""Import a distilled set made elsewhere: how a study evaluates any method this
project does not implement, under exactly the same protocols.

Accepted (``format: auto`` guesses from the path):

- an ImageFolder directory ``<path>/<class>/<image>``, or a ``.tar``/``.tar.gz``
  of one (one folder of class folders, at any depth). Class folders are named
  by the dataset's class names or carry the class index in their name
  (``3``, ``new003``, ``00003``: SRe2L's and RDED's output layouts). Images must
  already have the dataset's input size;
- a tensor file, ``.pt``/``.pth`` (``torch.save`` of a dict) or ``.npz``, with
  ``images`` [N, C, H, W] (uint8 0-255 or float in [0, 1], unnormalised),
  ``labels`` [N] (integers in [0, classes)), optionally ``soft_labels``
  [N, classes] (stored teacher logits) and ``num_classes``. No label mode
  reads imported soft labels (every mode labels from the dataset labels or the
  study's own teachers), so they are kept on the set but flagged: a warning,
  also recorded in the set's ``meta["warnings"]``, rather than silently ignored.

Anything else is refused with the file and the problem named: wrong shapes or
dtypes, labels out of range, classes without images, a class count that does
not match the dataset, ``ipc`` given but not what the file holds. The cache key
hashes the file's content, not its path.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import bounded, to_dict
from ..data import Dataset, DatasetInfo
from .base import DistilledSet, register_method

TENSOR_KEYS = ("images", "labels", "soft_labels", "num_classes")


def unused_soft_labels_message(path: str | os.PathLike) -> str:
    return (f"soft labels in {path} are not used by any label mode (hard uses the dataset labels; static, "
            "epochwise and stored relabel with the study's teachers): they are kept on the set and counted in its "
            "size, but post-evaluation ignores them; remove key 'soft_labels' from the file to import the images "
            "and labels alone")


class ExternalSetError(ValueError):
    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"external set {path}: {problem}")


@dataclass(frozen=True)
class ExternalParams:
    path: str  # ImageFolder directory, .tar(.gz) of one, .pt/.pth or .npz
    # None: whatever the set holds; else every class must hold exactly this many.
    ipc: int | None = bounded(None, ge=1, le=100_000)
    format: Literal["auto", "imagefolder", "tar", "pt", "npz"] = "auto"

    def validate(self):
        path = Path(self.path).expanduser()
        if not path.exists():
            yield "path", f"{self.path}: no such file or directory"
        elif self.format == "auto" and detect_format(path) is None:
            yield "format", (f"cannot tell the format of {self.path} from its name: expected a directory, "
                             ".tar/.tar.gz/.tgz, .pt/.pth or .npz; or set format")


def detect_format(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir():
        return "imagefolder"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if name.endswith((".pt", ".pth")):
        return "pt"
    if name.endswith(".npz"):
        return "npz"
    return None


def _stat_signature(path: Path) -> tuple:
    if path.is_file():
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in path.rglob("*") if p.is_file()))


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file (or of every file and its relative path in a
    directory), memoised per process while sizes and mtimes are unchanged."""
    path = Path(path).expanduser().resolve()
    return _digest(str(path), _stat_signature(path))


@functools.lru_cache(maxsize=64)
def _digest(path: str, signature: tuple) -> str:
    h = hashlib.sha256()
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        if file != root:
            h.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _image_files(path: Path, fmt: str):
    """Yield (parent folders, class folder, file name, bytes)."""
    if fmt == "imagefolder":
        for file in sorted(path.rglob("*")):
            rel = file.relative_to(path).parts
            if file.is_file() and not _hidden(rel):
                yield rel[:-2], rel[-2] if len(rel) > 1 else None, rel[-1], file.read_bytes()
        return
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                rel = Path(member.name).parts
                if member.isfile() and not _hidden(rel):
                    yield rel[:-2], rel[-2] if len(rel) > 1 else None, rel[-1], tar.extractfile(member).read()
    except tarfile.TarError as exc:
        raise ExternalSetError(path, f"not a readable tar archive ({exc})") from None


def _decode(path: Path, where: str, data: bytes, info: DatasetInfo) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("L" if info.channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ExternalSetError(path, f"{where} is not a readable image ({exc})") from None
    if img.size != (info.size, info.size):
        raise ExternalSetError(path, f"{where} is {img.size[0]}x{img.size[1]} px; dataset {info.name!r} "
                                     f"needs {info.size}x{info.size} (resize the set before importing)")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if info.channels == 1 else arr.transpose(2, 0, 1)


def class_index(path: Path, names: list[str], classes: tuple[str, ...] | None, num_classes: int) -> dict | None:
    """Folder name -> class index: by the dataset's class names, else by the
    number in the name. None (validation, class names unknown yet): decide at run time."""
    if classes is not None and set(names) <= set(classes):
        return {n: classes.index(n) for n in names}
    digits = {n: re.findall(r"\d+", n) for n in names}
    mapping = {n: int(d[-1]) for n, d in digits.items() if d}
    if len(mapping) == len(names) and all(0 <= v < num_classes for v in mapping.values()):
        if len(set(mapping.values())) != len(mapping):
            raise ExternalSetError(path, f"class folders {sorted(names)} name the same class index twice")
        return mapping
    if classes is None:
        return None
    shown = ", ".join(list(classes)[:5]) + (", ..." if len(classes) > 5 else "")
    odd = sorted(n for n in names if n not in classes)[:5]
    raise ExternalSetError(path, f"class folders {odd} are neither the dataset's class names ({shown}) nor "
                                 f"class indices 0-{num_classes - 1}")


def read_imagefolder(path: Path, fmt: str, info: DatasetInfo, classes: tuple[str, ...] | None):
    items = list(_image_files(path, fmt))
    if not items:
        raise ExternalSetError(path, "holds no image files (expected <class>/<image> files)")
    loose = [name for _, cls, name, _ in items if cls is None]
    if loose:
        raise ExternalSetError(path, f"files outside a class folder: {loose[:3]} (expected <class>/<image>)")
    parents = sorted({"/".join(p) for p, _, _, _ in items})
    if len(parents) > 1:
        raise ExternalSetError(path, f"holds several folders of class folders ({', '.join(p or '.' for p in parents)}); "
                                     "import one of them")
    names = sorted({cls for _, cls, _, _ in items})
    if len(names) != info.num_classes:
        raise ExternalSetError(path, f"has {len(names)} class folders; dataset {info.name!r} has "
                                     f"{info.num_classes} classes")
    mapping = class_index(path, names, classes, info.num_classes)
    images = np.stack([_decode(path, f"{cls}/{name}", data, info) for _, cls, name, data in items])
    if mapping is None:  # validation without class names: contents are checked, labels later
        labels = np.asarray([names.index(cls) for _, cls, _, _ in items])
    else:
        labels = np.asarray([mapping[cls] for _, cls, _, _ in items])
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), None


def read_tensors(path: Path, fmt: str, info: DatasetInfo):
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: say so with the file named
        raise ExternalSetError(path, f"cannot be read as {fmt} ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ExternalSetError(path, f"expected a mapping with images and labels, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(TENSOR_KEYS))
    missing = [k for k in ("images", "labels") if k not in data]
    if unknown or missing:
        raise ExternalSetError(path, (f"missing keys {missing}; " if missing else "") +
                               (f"unknown keys {unknown}; " if unknown else "") + f"expected {list(TENSOR_KEYS)}")
    if not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ExternalSetError(path, "every entry must be a tensor or array")
    images, labels, soft = data["images"], data["labels"], data.get("soft_labels")
    c, s = info.channels, info.size
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
        raise ExternalSetError(path, f"images have shape {list(images.shape)}; dataset {info.name!r} needs "
                                     f"[N, {c}, {s}, {s}] (N, channels, height, width)")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ExternalSetError(path, f"images are {images.dtype}; expected uint8 (0-255) or float in [0, 1]")
        images = images.float()
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ExternalSetError(path, f"float images must be unnormalised pixels in [0, 1]; values span "
                                         f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ExternalSetError(path, f"labels have shape {list(labels.shape)}; expected [{len(images)}] (one per image)")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ExternalSetError(path, f"labels are {labels.dtype}; expected integer class indices")
    if "num_classes" in data and int(data["num_classes"]) != info.num_classes:
        raise ExternalSetError(path, f"num_classes is {int(data['num_classes'])}; dataset {info.name!r} has "
                                     f"{info.num_classes} classes")
    if soft is not None:
        if soft.shape != (len(images), info.num_classes) or not soft.is_floating_point():
            raise ExternalSetError(path, f"soft_labels have shape {list(soft.shape)} ({soft.dtype}); expected float "
                                         f"[{len(images)}, {info.num_classes}] (one logit per image and class)")
        soft = soft.float()
    return images, labels.long(), soft


def load_external(params: ExternalParams, info: DatasetInfo, classes: tuple[str, ...] | None) -> DistilledSet:
    path = Path(params.path).expanduser()
    if not path.exists():
        raise ExternalSetError(params.path, "no such file or directory")
    fmt = detect_format(path) if params.format == "auto" else params.format
    if fmt is None:
        raise ExternalSetError(path, "cannot tell the format from the name; set format")
    if fmt in ("imagefolder", "tar"):
        if fmt == "imagefolder" and not path.is_dir():
            raise ExternalSetError(path, "format imagefolder needs a directory")
        images, labels, soft = read_imagefolder(path, fmt, info, classes)
    else:
        images, labels, soft = read_tensors(path, fmt, info)
    bad = labels[(labels < 0) | (labels >= info.num_classes)]
    if len(bad):
        raise ExternalSetError(path, f"labels {sorted(set(bad.tolist()))[:5]} are outside 0-{info.num_classes - 1} "
                                     f"(dataset {info.name!r} has {info.num_classes} classes)")
    counts = torch.bincount(labels, minlength=info.num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ExternalSetError(path, f"classes {empty[:10]} have no images (dataset {info.name!r} has "
                                     f"{info.num_classes} classes)")
    if params.ipc is not None and (counts != params.ipc).any():
        odd = {c: int(n) for c, n in enumerate(counts) if n != params.ipc}
        raise ExternalSetError(path, f"ipc is {params.ipc} but classes hold {dict(list(odd.items())[:5])} images")
    meta = {"source": str(path), "format": fmt, "content_sha256": content_digest(path)}
    if soft is not None:
        # Shown when the study is validated and again where the set is loaded;
        # kept in the meta so the stored set says it too.
        message = unused_soft_labels_message(path)
        warnings.warn(message, UserWarning, stacklevel=2)
        meta["warnings"] = [message]
    order = torch.sort(labels, stable=True).indices
    return DistilledSet(images[order].contiguous(), labels[order].contiguous(),
                        soft_labels=soft[order].contiguous() if soft is not None else None, meta=meta)


def external_key_inputs(params: ExternalParams, seed: int) -> dict:
    # The content, not where it lies: a moved or renamed file is the same set,
    # an overwritten one is a new set.
    fields = {k: v for k, v in to_dict(params).items() if k != "path"}
    return {"params": fields, "content_sha256": content_digest(params.path)}


def check_external(params: ExternalParams, info: DatasetInfo, teacher_arch: str | None):
    try:
        _checked(params, info, content_digest(params.path))
    except ExternalSetError as exc:
        yield "path", str(exc)


@functools.lru_cache(maxsize=16)
def _checked(params: ExternalParams, info: DatasetInfo, digest: str) -> None:
    load_external(params, info, None)


@register_method("external", ExternalParams, key_inputs=external_key_inputs, check=check_external)
def external(dataset: Dataset, teacher, params: ExternalParams, seed: int, runtime) -> DistilledSet:
    return load_external(params, dataset.info, dataset.classes)
