"""Checkpoint files made by other code: read them without running any of their
code, rename their keys from that code's layout to ours, and check them
against the architecture before anything trusts them.

A file is read with ``torch.load(weights_only=True)`` (or safetensors): a pickle
that would run code is refused, never executed. The weights may sit at the top
level or under one of :data:`CONTAINERS` (RDED saves ``{"model": ...}``, SRe2L
``{"state_dict": ...}``), with DataParallel's ``module.`` or torch.compile's
``_orig_mod.`` prefix. A layout (:data:`LAYOUTS`) renames the keys; every
problem is a :class:`CheckpointError` naming the file, the key and what was
expected.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ..artifacts import file_sha256
from ..registry import Registry

CONTAINERS = ("model", "state_dict", "net", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")
SHOWN = 4  # keys listed per kind of mismatch; the rest are counted

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """Weights that cannot serve as the teacher; deterministic (a rerun fails the same way)."""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def _stamp(path: str | os.PathLike) -> tuple[str, int, int]:
    """(absolute path, size, mtime): what the caches below are keyed by, so an
    edited or replaced file is read again."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file") from None
    if not p.is_file():
        raise CheckpointError(f"{p}: not a file")
    return str(p), st.st_size, st.st_mtime_ns


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes: what identifies a checkpoint (never its path)."""
    return _digest(*_stamp(path))


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """The file's weights as a flat ``name -> tensor`` mapping (a fresh dict,
    shared tensors: do not modify them in place)."""
    return dict(_read(*_stamp(path)))


@functools.lru_cache(maxsize=4)  # validation, expansion and the job read a file once
def _read(path: str, size: int, mtime_ns: int) -> StateDict:
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any bytes at all: each becomes one clear message
        raise CheckpointError(f"{path}: {_load_problem(exc, path, size)}") from None
    return unwrap(obj, path)


def _read_safetensors(path: str) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    # torch's weights-only refusal puts what it refused on its own line
    found = next((line for line in lines if "nsupported" in line), lines[0] if lines else "")
    return f"{type(exc).__name__}: {found.strip()[:200]}" if found else type(exc).__name__


def _load_problem(exc: BaseException, path: str, size: int) -> str:
    text = str(exc)
    if size == 0:
        return "is empty (0 bytes): expected a PyTorch checkpoint (torch.save of a state dict)"
    with open(path, "rb") as fh:
        zipped = fh.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive
    found = re.search(r"GLOBAL ([\w.]+)", text)  # torch's weights-only refusal of a pickled object
    if found:
        # torch's own message is long; the cause and the fix are short.
        return (f"holds pickled Python objects beyond tensors and plain data"
                f" ({found[1]}), for example a whole model saved with torch.save(model); "
                "they are never executed here (torch.load with weights_only=True refused them): save "
                "model.state_dict() instead")
    if zipped:
        return f"a damaged or truncated PyTorch zip archive ({size} bytes; {_first_line(exc)})"
    return ("not a PyTorch checkpoint: expected a file written by torch.save of a state dict (this one is not "
            f"a zip archive, nor a pickle torch.load can read safely; nothing in it was run: {_first_line(exc)})")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj, where: str) -> StateDict:
    """The state dict inside a loaded checkpoint object, prefixes stripped."""
    found = obj if _is_state_dict(obj) else None
    if found is None and isinstance(obj, Mapping):
        found = next((obj[k] for k in CONTAINERS if k in obj and _is_state_dict(obj[k])), None)
    if found is None:
        got = (("an empty mapping" if not obj else f"a mapping with keys {sorted(map(str, obj))[:8]}")
               if isinstance(obj, Mapping) else f"a {type(obj).__name__}")
        raise CheckpointError(f"{where}: no weights found: expected a state dict (parameter names mapped to "
                              f"tensors) at the top level or under one of {', '.join(map(repr, CONTAINERS))}; "
                              f"the file holds {got}")
    sd = dict(found)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------
# Layouts: how another codebase names the keys of the same network
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    name: str
    description: str  # whose code writes it (docs/STUDIES.md tables them)
    rename: Callable[[StateDict], StateDict]  # file keys -> this project's keys


LAYOUTS: Registry[Layout] = Registry("checkpoint layout")


def _same(sd: StateDict) -> StateDict:
    return dict(sd)


# Our ConvNet's `features` holds [conv, norm, act, pool] per block (an Identity
# where there is no norm), so block d's conv is features.{4d} and its norm features.{4d+1}.
_RDED_KEY = re.compile(r"^layers\.(conv|norm)\.(\d+)\.(.+)$")
_SEQ_KEY = re.compile(r"^features\.(\d+)\.(.+)$")


def _from_rded(sd: StateDict) -> StateDict:
    out = {}
    for key, value in sd.items():
        m = _RDED_KEY.match(key)
        if m:
            key = f"features.{4 * int(m[2]) + (m[1] == 'norm')}.{m[3]}"
        out[key] = value
    return out


def _from_dc(sd: StateDict) -> StateDict:
    # DC's Sequential drops the norm slot when there is no norm ([conv, act, pool]):
    # the blocks are found where the convolutions (4-d weights) are, and a norm is
    # the module right after its convolution.
    starts = sorted(int(m[1]) for k, v in sd.items() if (m := _SEQ_KEY.match(k)) and m[2] == "weight"
                    and v.ndim == 4)
    moved = {}
    for block, start in enumerate(starts):
        moved[start], moved[start + 1] = 4 * block, 4 * block + 1
    out = {}
    for key, value in sd.items():
        m = _SEQ_KEY.match(key)
        if m and int(m[1]) in moved:
            key = f"features.{moved[int(m[1])]}.{m[2]}"
        out[key] = value
    return out


for _layout in (
    Layout("ours", "this project's own key names (a teacher artifact, or torch.save(model.state_dict()) of a "
                   "registered model)", _same),
    Layout("torchvision", "torchvision's key names: its ResNets (also with the small-image stem of SRe2L's and "
                          "RDED's CIFAR ResNet-18) and any tv/<name>", _same),
    Layout("timm", "timm's key names, for timm/<name> architectures", _same),
    Layout("rded", "RDED's ConvNet (layers.conv.<d>, layers.norm.<d>, classifier), saved as {'model': ...}",
           _from_rded),
    Layout("dc", "the DC/DSA/DM/MTT and DD-Ranking ConvNet (features.<n> of one Sequential, classifier)",
           _from_dc),
):
    LAYOUTS.add(_layout.name, _layout)


def list_layouts() -> list[str]:
    return LAYOUTS.names()


# --------------------------------------------------------------------------------------
# Fitting the weights to the architecture
# --------------------------------------------------------------------------------------

def _shown(keys: list[str]) -> str:
    more = f" (and {len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _shape(t) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def mismatches(sd: StateDict, model: nn.Module) -> list[str]:
    """What keeps ``sd`` from loading strictly into ``model`` (empty: it fits).
    ``num_batches_tracked`` may be absent (older checkpoints do not save it)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: expected shape {_shape(expected[k])}, the file has {_shape(sd[k])}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    out = []
    if missing:
        out.append(f"missing keys {_shown(missing)}")
    if unexpected:
        out.append(f"unexpected keys {_shown(unexpected)}")
    return out + shapes[:SHOWN] + ([f"{len(shapes) - SHOWN} more shapes differ"] if len(shapes) > SHOWN else [])


def hints(raw: StateDict, renamed: StateDict, model: nn.Module, layout: str) -> list[str]:
    """Likely causes of a mismatch, from what the file's keys look like."""
    out = [f"layout: {name} fits this file" for name in LAYOUTS.names()
           if name != layout and LAYOUTS.get(name).rename is not LAYOUTS.get(layout).rename
           and not mismatches(LAYOUTS.get(name).rename(raw), model)]
    expected = model.state_dict()
    stats = any(k.endswith("running_mean") for k in renamed)
    wanted = any(k.endswith("running_mean") for k in expected)
    if stats and not wanted:
        out.append("the file has BatchNorm statistics (running_mean) that the architecture has no place for: "
                   "a BatchNorm variant of the arch (e.g. convnet3-bn)")
    elif wanted and not stats:
        out.append("the file has no BatchNorm statistics: an architecture without BatchNorm (e.g. convnet3, "
                   "instance norm)")
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last:
        name = next(n for n, m in model.named_modules() if m is last[-1])
        w = renamed.get(f"{name}.weight")
        if w is not None and w.ndim == 2 and w.shape[1] != last[-1].in_features:
            out.append(f"its classifier takes {w.shape[1]} features, the architecture's {last[-1].in_features}: "
                       "trained at another input size, depth or width")
        if w is not None and w.ndim == 2 and w.shape[0] != last[-1].out_features:
            out.append(f"it has {w.shape[0]} outputs, the architecture {last[-1].out_features}: list the "
                       "file's classes in order with classes: (the dataset's are picked from them)")
    return out


def renamed(raw: StateDict, layout: str) -> StateDict:
    return LAYOUTS.get(layout).rename(raw)


def fit_problem(raw: StateDict, model: nn.Module, where: str, layout: str, what: str) -> str | None:
    """One message saying why the file's weights ``raw``, read in ``layout``,
    do not fit ``model``, or None. ``what`` names the architecture as the study does."""
    sd = renamed(raw, layout)
    found = mismatches(sd, model)
    if not found:
        return None
    tips = hints(raw, sd, model, layout)
    return (f"{where} (layout {layout}) does not fit {what}: " + "; ".join(found)
            + (". Likely: " + "; ".join(tips) if tips else ""))


def load_into(model: nn.Module, raw: StateDict, where: str, layout: str, what: str) -> nn.Module:
    """Load the file's weights ``raw``, read in ``layout``, strictly into
    ``model`` (CheckpointError when they do not fit)."""
    problem = fit_problem(raw, model, where, layout, what)
    if problem:
        raise CheckpointError(problem)
    full = renamed(raw, layout)
    for key, value in model.state_dict().items():
        full.setdefault(key, value)  # num_batches_tracked, when the file has none
    model.load_state_dict(full, strict=True)
    return model
