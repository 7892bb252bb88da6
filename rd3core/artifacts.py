"""Content-addressed stage store.

A stage result (teacher weights, a distilled set, stored labels) lives under
``root/<stage>/<key>/`` where ``key = hash(stage, stage version, the params the
stage uses, upstream keys)``. Publishing writes into a private temporary folder
and renames it into place (atomic on one file system), so readers never see a
half-written artifact and two concurrent producers of one key cannot corrupt
it: the second rename loses and its copy is dropped. Loading verifies the
payload's SHA-256 against the manifest; a corrupt or truncated artifact is moved
aside and reported as missing, so the caller rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import stable_hash

PAYLOAD = "payload.pt"
MANIFEST = "manifest.json"


def stage_key(stage: str, version: int, params: Any, upstream: dict[str, str] | None = None) -> str:
    return stable_hash({"stage": stage, "version": version, "params": params, "upstream": upstream or {}}, 24)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ArtifactInfo:
    stage: str
    key: str
    path: Path
    bytes: int
    sha256: str
    manifest: dict


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def info(self, stage: str, key: str, verify: bool = True) -> ArtifactInfo | None:
        """The artifact's record if present and intact, else None."""
        folder = self.path(stage, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            payload = folder / PAYLOAD
            size = payload.stat().st_size
            if size != manifest["bytes"] or (verify and _sha256(payload) != manifest["sha256"]):
                raise ValueError("content hash mismatch")
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, json.JSONDecodeError):
            self._quarantine(folder)
            return None
        return ArtifactInfo(stage, key, folder, size, manifest["sha256"], manifest)

    def exists(self, stage: str, key: str) -> bool:
        # Cheap check for planning (size only); load() verifies the full hash.
        return self.info(stage, key, verify=False) is not None

    def load(self, stage: str, key: str, map_location: str | torch.device = "cpu") -> Any | None:
        info = self.info(stage, key, verify=True)
        if info is None:
            return None
        return torch.load(info.path / PAYLOAD, map_location=map_location, weights_only=True)

    def save(self, stage: str, key: str, payload: Any, meta: dict | None = None) -> ArtifactInfo:
        final = self.path(stage, key)
        existing = self.info(stage, key, verify=True)
        if existing is not None:
            return existing
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            torch.save(payload, tmp / PAYLOAD)
            manifest = {"stage": stage, "key": key, "bytes": (tmp / PAYLOAD).stat().st_size,
                        "sha256": _sha256(tmp / PAYLOAD), "created": time.time(), "meta": meta or {}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
            try:
                os.rename(tmp, final)
            except OSError:
                # Another producer published the same key first; theirs is identical
                # by construction, so keep it and drop ours.
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        info = self.info(stage, key, verify=True)
        if info is None:
            raise RuntimeError(f"artifact {stage}/{key} could not be published under {self.root}")
        return info

    def _quarantine(self, folder: Path) -> None:
        target = folder.parent / f".corrupt-{folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, target)
        except OSError:
            pass  # already moved by someone else

    def entries(self) -> Iterator[ArtifactInfo]:
        if not self.root.exists():
            return
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for folder in sorted(stage_dir.iterdir()):
                if folder.name.startswith("."):
                    continue
                info = self.info(stage_dir.name, folder.name, verify=False)
                if info is not None:
                    yield info
