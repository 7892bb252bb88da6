"""Pretrained weights that torchvision and timm serve, through their own
loading code and caches: ``weights: torchvision:<Enum>.<member>`` (torch hub's
cache, ``$TORCH_HOME/hub/checkpoints``) and ``timm/<name>`` with
``pretrained: true`` (the Hugging Face cache, ``$HF_HOME/hub``; timm's older
URL weights in torch hub's cache).

Validation only checks the names (no file needed). A run fetches weights that
are not cached yet before anything is written (:meth:`HubWeights.fetch`); when
that fails, offline for instance, the error names the file to place and the
folder to place it in.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from ..models import timm_model
from .checkpoints import CheckpointError

TORCHVISION = "torchvision:"
# Our registry names built by torchvision's own builders (same keys as torchvision's weights).
_TV_ARCHS = ("resnet18", "resnet50", "resnet101")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm tries when its config names none


@dataclass(frozen=True)
class HubWeights:
    """One library's pretrained weights: what they are and where its cache keeps them."""

    library: str  # 'torchvision' | 'timm'
    name: str  # 'ResNet18_Weights.IMAGENET1K_V1' | 'resnet18.a1_in1k'
    outputs: int  # classes of the pretrained head
    url: str  # where the library downloads them from
    folder: Path  # the cache folder they live in
    filename: str  # the file in it
    env: str  # the environment variable that moves the cache
    hf_repo: str = ""  # timm on the Hugging Face hub: the repository

    @property
    def label(self) -> str:
        return f"{self.library} weights {self.name}"

    def cached(self) -> Path | None:
        """The cached file, or None when it is not there yet."""
        if self.hf_repo:
            from huggingface_hub import try_to_load_from_cache

            for filename in self._hf_files():
                found = try_to_load_from_cache(self.hf_repo, filename, cache_dir=str(_hf_cache()))
                if isinstance(found, str):
                    return Path(found)
            return None
        path = self.folder / self.filename
        return path if path.is_file() else None

    def _hf_files(self) -> tuple[str, ...]:
        return (self.filename,) if self.filename not in _HF_FILES else _HF_FILES

    def missing(self, cause: str = "") -> str:
        """What to do when the weights are not cached and cannot be fetched."""
        why = f" and could not be downloaded ({cause})" if cause else ""
        if self.hf_repo:
            return (f"{self.label} are not in the Hugging Face cache {self.folder.parent}{why}: on a machine with "
                    f"network run `huggingface-cli download {self.hf_repo}` and copy its folder {self.folder.name} "
                    f"into {self.folder.parent} (or point {self.env} at a cache that has it)")
        return (f"{self.label} are not cached{why}: place {self.filename} (from {self.url}) in {self.folder} "
                f"(the folder moves with {self.env})")

    def fetch(self) -> Path:
        """The cached file, downloaded through the library's own code first when
        it is missing (CheckpointError naming the file and folder when that fails)."""
        found = self.cached()
        if found is not None:
            return found
        try:
            if self.hf_repo:
                from huggingface_hub import hf_hub_download
                from huggingface_hub.utils import EntryNotFoundError

                for filename in self._hf_files():
                    try:
                        return Path(hf_hub_download(self.hf_repo, filename, cache_dir=str(_hf_cache())))
                    except EntryNotFoundError:
                        continue
                raise FileNotFoundError(f"{self.hf_repo} has none of {', '.join(self._hf_files())}")
            from torch.hub import HASH_REGEX, download_url_to_file

            self.folder.mkdir(parents=True, exist_ok=True)
            match = HASH_REGEX.search(self.filename)
            target = self.folder / self.filename
            download_url_to_file(self.url, str(target), match.group(1) if match else None, progress=False)
            return target
        except Exception as exc:  # noqa: BLE001 - offline, refused, a proxy page: one clear message
            raise CheckpointError(self.missing(f"{type(exc).__name__}: {str(exc).strip()[:200]}")) from None


def _hf_cache() -> Path:
    # Read at call time, not when huggingface_hub was imported, so HF_HOME set by
    # a test or a job's environment is honoured.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def torchvision_name(arch: str) -> str | None:
    """The torchvision model an architecture is built by, or None."""
    if arch in _TV_ARCHS:
        return arch
    return arch[3:] if arch.startswith("tv/") else None


@functools.lru_cache(maxsize=32)
def _torchvision_enum(name: str):
    from torchvision.models import get_weight

    return get_weight(name)


def torchvision_problem(weights: str, arch: str) -> str | None:
    """What is wrong with ``weights: <weights>`` for ``arch``, or None."""
    if not weights.startswith(TORCHVISION):
        return f"expected 'torchvision:<WeightsEnum>.<member>' (e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1), " \
               f"got {weights!r}"
    name = weights[len(TORCHVISION):]
    try:
        member = _torchvision_enum(name)
    except (KeyError, ValueError, AttributeError):
        return f"torchvision has no weights {name!r} (e.g. ResNet18_Weights.IMAGENET1K_V1)"
    model = torchvision_name(arch)
    if model is None:
        return (f"torchvision weights need an architecture torchvision builds ({', '.join(_TV_ARCHS)} or "
                f"tv/<name>), not {arch!r}")
    from torchvision.models import get_model_weights

    try:
        fits = isinstance(member, get_model_weights(model))
    except (KeyError, ValueError):
        fits = False
    if not fits:
        return f"{name} are not weights of torchvision's {model!r} (arch {arch!r})"
    return None


def torchvision_weights(weights: str) -> HubWeights:
    import torch.hub

    member = _torchvision_enum(weights[len(TORCHVISION):])
    # The member's own name, so that an alias (DEFAULT) is recorded as the weights it stands for.
    name = f"{type(member).__name__}.{member.name}"
    return HubWeights("torchvision", name, len(member.meta.get("categories") or ()), member.url,
                      Path(torch.hub.get_dir()) / "checkpoints", os.path.basename(urlparse(member.url).path),
                      "TORCH_HOME")


def timm_problem(arch: str) -> str | None:
    if not arch.startswith("timm/"):
        return f"pretrained: true loads timm's pretrained weights: arch must be timm/<name>, not {arch!r}"
    import timm

    if timm.is_model(arch[5:]) and not timm.models.is_model_pretrained(arch[5:]):
        return f"timm {timm.__version__} has no pretrained weights for {arch[5:]!r}"
    return None


def timm_weights(arch: str) -> HubWeights:
    """``arch`` is ``timm/<name>`` or ``timm/<name>.<tag>``; without a tag, timm's
    default tag, resolved here so that the recorded name says which weights ran."""
    import torch.hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch[5:])
    name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        return HubWeights("timm", name, cfg.num_classes, f"https://huggingface.co/{repo}",
                          _hf_cache() / f"models--{repo.replace('/', '--')}", cfg.hf_hub_filename or _HF_FILES[0],
                          "HF_HOME", hf_repo=repo)
    return HubWeights("timm", name, cfg.num_classes, cfg.url, Path(torch.hub.get_dir()) / "checkpoints",
                      os.path.basename(urlparse(cfg.url).path), "TORCH_HOME")


def torchvision_state_dict(hub: HubWeights) -> tuple[dict, Path]:
    """The weights as torchvision loads them (its own code and cache), and the file."""
    path = hub.fetch()
    try:
        return _torchvision_enum(hub.name).get_state_dict(progress=False, weights_only=True,
                                                          map_location="cpu"), path
    except Exception as exc:  # noqa: BLE001 - a damaged cached file
        raise CheckpointError(f"{path}: the cached {hub.label} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).strip()[:200]}): delete it and run again") from None


def timm_pretrained(arch: str, num_classes: int, channels: int, size: int) -> tuple[nn.Module, Path]:
    """timm's model with its pretrained weights, loaded by timm from the cached file."""
    hub = timm_weights(arch)
    path = hub.fetch()
    try:
        model = timm_model(hub.name, num_classes, channels, size, pretrained=True,
                           pretrained_cfg_overlay={"file": str(path)})
    except Exception as exc:  # noqa: BLE001 - a damaged cached file, or one for another model
        raise CheckpointError(f"{path}: timm cannot load it as {hub.label} ({type(exc).__name__}: "
                              f"{str(exc).strip()[:200]})") from None
    return model, path
