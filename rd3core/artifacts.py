"""Content-addressed stage store.

A stage result (teacher weights, a distilled set, stored labels) lives under
``root/<stage>/<key>/`` where ``key = hash(stage, stage version, the params the
stage uses, upstream keys)``. Publishing writes into a private temporary folder
and renames it into place (atomic on one file system), so readers never see a
half-written artifact and two concurrent producers of one key cannot corrupt
it: the second rename loses and its copy is dropped. Loading verifies the
payload's SHA-256 against the manifest; a corrupt or truncated artifact is moved
aside (``.corrupt-*``) and reported as missing, so the caller rebuilds it.

Folders whose names start with a dot are never artifacts: ``.tmp-*`` is a
publish in progress (or one that crashed), ``.corrupt-*`` a quarantined
artifact, ``.trash-*`` one being deleted. ``leftovers()`` lists them for gc.

Checkpoints of jobs still at work (rd3core.checkpoint) live beside the
artifacts, one file per stage key: ``root/.checkpoints/<stage>/<key>.pt``, each
save a new temporary file, fsynced and renamed over the previous one. They are
not artifacts (nothing verifies or shares them); the job removes its checkpoint
once the artifact is published, and ``checkpoints()`` lists them for gc.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import stable_hash

PAYLOAD = "payload.pt"
MANIFEST = "manifest.json"
LEFTOVER_PREFIXES = (".tmp-", ".corrupt-", ".trash-")
CHECKPOINTS = ".checkpoints"
CHECKPOINT_SUFFIX = ".pt"


def stage_key(stage: str, version: int, params: Any, upstream: dict[str, str] | None = None) -> str:
    return stable_hash({"stage": stage, "version": version, "params": params, "upstream": upstream or {}}, 24)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we looked
    return total


def folder_mtime(path: Path) -> float:
    """Newest modification time in a folder: a publish that is still writing keeps it fresh."""
    newest = 0.0
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, f) for f in files)]:
            try:
                newest = max(newest, os.lstat(name).st_mtime)
            except OSError:
                pass
    return newest


@dataclass(frozen=True)
class ArtifactInfo:
    stage: str
    key: str
    path: Path
    bytes: int
    sha256: str
    manifest: dict

    @property
    def created(self) -> float:
        return float(self.manifest.get("created", 0.0))

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})


@dataclass(frozen=True)
class Leftover:
    stage: str
    path: Path
    kind: str  # 'tmp' | 'corrupt' | 'trash'
    bytes: int
    mtime: float


@dataclass(frozen=True)
class CheckpointFile:
    """One stage key's checkpoint: the store a :class:`rd3core.checkpoint.Checkpoint` writes to."""

    path: Path

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def write(self, data: bytes | memoryview) -> None:
        # Atomic and durable: a crash at any point leaves the previous checkpoint
        # or the new one (plus, at worst, a temporary file that gc removes).
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself
        finally:
            os.close(folder)

    def remove(self) -> bool:
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False


@dataclass(frozen=True)
class CheckpointInfo:
    stage: str
    key: str
    path: Path
    bytes: int
    mtime: float


class ArtifactStore:
    """``readonly=True`` never writes: no quarantine, no publish (dry runs, listings)."""

    def __init__(self, root: str | os.PathLike, readonly: bool = False):
        self.root = Path(root)
        self.readonly = readonly
        # How this instance's saves ended: published, already there, or lost the
        # race to a concurrent producer of the same key (kept theirs).
        self.outcomes: Counter[str] = Counter()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def info(self, stage: str, key: str, verify: bool = True) -> ArtifactInfo | None:
        """The artifact's record if present and intact, else None (a damaged one is quarantined)."""
        folder = self.path(stage, key)
        if not folder.is_dir():
            return None
        manifest = None
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            payload = folder / PAYLOAD
            size = payload.stat().st_size
            if size != manifest["bytes"]:
                raise ValueError("payload size differs from the manifest (truncated?)")
            if verify and file_sha256(payload) != manifest["sha256"]:
                raise ValueError("content hash mismatch")
        except FileNotFoundError:
            if not folder.exists():  # removed or quarantined by someone else meanwhile
                return None
            self._quarantine(folder, manifest)  # a published folder always has both files
            return None
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self._quarantine(folder, manifest)
            return None
        return ArtifactInfo(stage, key, folder, size, manifest["sha256"], manifest)

    def exists(self, stage: str, key: str) -> bool:
        # Cheap check for planning (size only); load() verifies the full hash.
        return self.info(stage, key, verify=False) is not None

    def load(self, stage: str, key: str, map_location: str | torch.device = "cpu") -> Any | None:
        info = self.info(stage, key, verify=True)
        if info is None:
            return None
        try:
            return torch.load(info.path / PAYLOAD, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            return None  # quarantined or removed between the check and the read

    def save(self, stage: str, key: str, payload: Any, meta: dict | None = None) -> ArtifactInfo:
        if self.readonly:
            raise RuntimeError(f"artifact store {self.root} is read-only")
        final = self.path(stage, key)
        existing = self.info(stage, key, verify=True)
        if existing is not None:
            self.outcomes["existing"] += 1
            return existing
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            torch.save(payload, tmp / PAYLOAD)
            manifest = {"stage": stage, "key": key, "bytes": (tmp / PAYLOAD).stat().st_size,
                        "sha256": file_sha256(tmp / PAYLOAD), "created": time.time(),
                        "producer": {"host": socket.gethostname(), "pid": os.getpid()}, "meta": meta or {}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
            try:
                os.rename(tmp, final)
                self.outcomes["published"] += 1
            except OSError:
                # Another producer published the same key first; theirs is identical
                # by construction, so keep it and drop ours.
                self.outcomes["lost"] += 1
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        info = self.info(stage, key, verify=True)
        if info is None:
            raise RuntimeError(f"artifact {stage}/{key} could not be published under {self.root}")
        return info

    def remove(self, stage: str, key: str) -> bool:
        """Delete one artifact; renamed away first so no reader sees it half-deleted."""
        if self.readonly:
            raise RuntimeError(f"artifact store {self.root} is read-only")
        folder = self.path(stage, key)
        trash = folder.parent / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def checkpoint(self, stage: str, key: str) -> CheckpointFile:
        return CheckpointFile(self.root / CHECKPOINTS / stage / f"{key}{CHECKPOINT_SUFFIX}")

    def checkpoints(self) -> Iterator[CheckpointInfo]:
        area = self.root / CHECKPOINTS
        for folder in sorted(area.iterdir()) if area.is_dir() else []:
            for path in sorted(folder.glob(f"[!.]*{CHECKPOINT_SUFFIX}")):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # removed while we looked
                yield CheckpointInfo(folder.name, path.name[:-len(CHECKPOINT_SUFFIX)], path, stat.st_size,
                                     stat.st_mtime)

    def _quarantine(self, folder: Path, judged: dict | None) -> None:
        if self.readonly:
            return
        # Only move what we judged: if a producer republished the key meanwhile,
        # its manifest differs and the fresh artifact stays.
        try:
            current = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            current = None
        if current != judged:
            return
        target = folder.parent / f".corrupt-{folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, target)
        except OSError:
            pass  # already moved by someone else

    def stages(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def entries(self, verify: bool = False) -> Iterator[ArtifactInfo]:
        for stage in self.stages():
            for folder in sorted((self.root / stage).iterdir()):
                if folder.name.startswith(".") or not folder.is_dir():
                    continue
                info = self.info(stage, folder.name, verify=verify)
                if info is not None:
                    yield info

    def leftovers(self) -> Iterator[Leftover]:
        """Leftover folders of artifacts, and temporary files of checkpoint saves."""
        for stage in self.stages():
            for folder in sorted((self.root / stage).iterdir()):
                for prefix in LEFTOVER_PREFIXES:
                    if folder.name.startswith(prefix):
                        yield Leftover(stage, folder, prefix.strip(".-"), folder_bytes(folder), folder_mtime(folder))
        area = self.root / CHECKPOINTS
        for folder in sorted(area.iterdir()) if area.is_dir() else []:
            for path in sorted(folder.glob(".tmp-*")):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                yield Leftover(folder.name, path, "tmp", stat.st_size, stat.st_mtime)
