"""The stage graph: teacher -> synth -> [labels] -> posteval, every stage keyed by content
so that cells share what they have in common. A teacher used by forty cells is
one node; a distilled set shared by every protocol variant of a (method, seed)
is one node. A `labels` node (stored FKD-style labels) sits between synth and
posteval when the protocol's labels.mode is 'stored'; protocol variants that
differ only in what the labels do not depend on (student, optimiser, ...) share it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from rd3core.artifacts import ArtifactStore, stage_key
from rd3core.config import to_dict
from rd3core.stored_labels import protocol_params as stored_label_params
from rd3core.synth import METHODS

from .expand import Cell

STAGES = ("teacher", "synth", "labels", "posteval")
# Bump when a stage's output for the same params changes (invalidates its cache).
STAGE_VERSIONS = {"teacher": 1, "labels": 1, "posteval": 1}


@dataclass
class Node:
    stage: str
    key: str
    deps: tuple[str, ...]  # ids of nodes that must finish first
    payload: dict[str, Any]  # plain data: everything the job needs
    cached: bool = False

    @property
    def id(self) -> str:
        return f"{self.stage}:{self.key}"


@dataclass
class Plan:
    nodes: dict[str, Node] = field(default_factory=dict)

    def add(self, node: Node) -> Node:
        return self.nodes.setdefault(node.id, node)

    def counts(self) -> dict[str, tuple[int, int]]:
        """stage -> (runs needed, cached)."""
        need = Counter(n.stage for n in self.nodes.values() if not n.cached)
        cached = Counter(n.stage for n in self.nodes.values() if n.cached)
        return {s: (need[s], cached[s]) for s in STAGES}


def teacher_key(dataset: dict, teacher: dict) -> str:
    return stage_key("teacher", STAGE_VERSIONS["teacher"], {"dataset": dataset, "teacher": teacher})


def synth_key(cell: Cell, teacher: str | None) -> str:
    method = METHODS.get(cell.method.name)
    params = {"dataset": to_dict(cell.dataset), "method": cell.config["method"], "seed": cell.seed}
    return stage_key("synth", method.version, params, {"teacher": teacher} if teacher else None)


def labels_key(cell: Cell, synth: str, teachers: dict[str, str]) -> str:
    """Key of a cell's stored labels: the protocol fields they depend on, the
    seed and IPC (RDED's batch rule), upstream synth and labelling teacher keys."""
    params = {"dataset": to_dict(cell.dataset), "protocol": stored_label_params(cell.protocol), "seed": cell.seed,
              "ipc": cell.config["method"].get("ipc")}
    return stage_key("labels", STAGE_VERSIONS["labels"], params, {"synth": synth, "teachers": teachers})


def build_plan(cells: Iterable[Cell], store: ArtifactStore) -> Plan:
    plan = Plan()
    for cell in cells:
        dataset = to_dict(cell.dataset)
        teacher_ids: dict[str, str] = {}
        for teacher in cell.teachers:
            spec = to_dict(teacher)
            key = teacher_key(dataset, spec)
            node = plan.add(Node("teacher", key, (), {"dataset": dataset, "teacher": spec},
                                 cached=store.exists("teacher", key)))
            teacher_ids[teacher.arch] = node.id
        needs_teacher = METHODS.get(cell.method.name).needs_teacher
        primary = cell.teachers[0].arch if needs_teacher else None
        tkey = plan.nodes[teacher_ids[primary]].key if primary else None
        skey = synth_key(cell, tkey)
        synth = plan.add(Node("synth", skey, (teacher_ids[primary],) if primary else (),
                              {"dataset": dataset, "method": cell.config["method"], "seed": cell.seed,
                               "teacher": {"key": tkey, "spec": to_dict(cell.teachers[0])} if primary else None},
                              cached=store.exists("synth", skey)))
        label_teachers = {arch: {"key": plan.nodes[nid].key, "spec": plan.nodes[nid].payload["teacher"]}
                          for arch, nid in teacher_ids.items()}
        payload = {"dataset": dataset, "synth_key": skey, "teachers": label_teachers,
                   "protocol": cell.config["protocol"], "seed": cell.seed, "ipc": cell.config["method"].get("ipc")}
        deps = (synth.id, *teacher_ids.values())
        if cell.protocol.labels.mode == "stored":
            names = list(cell.protocol.labels.teachers) or [cell.teachers[0].arch]
            lkey = labels_key(cell, skey, {n: label_teachers[n]["key"] for n in names})
            labels = plan.add(Node("labels", lkey, deps, dict(payload), cached=store.exists("labels", lkey)))
            payload["labels_key"] = lkey
            deps = (*deps, labels.id)
        plan.add(Node("posteval", cell.key, deps, payload))
    return plan
