"""The stage graph: teacher -> synth -> posteval, every stage keyed by content
so that cells share what they have in common. A teacher used by forty cells is
one node; a distilled set shared by every protocol variant of a (method, seed)
is one node.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from rd3core.artifacts import ArtifactStore, stage_key
from rd3core.config import to_dict
from rd3core.synth import METHODS

from .expand import Cell
from .resources import Resources, ResourcesSpec

STAGES = ("teacher", "synth", "posteval")
# Bump when a stage's output for the same params changes (invalidates its cache).
STAGE_VERSIONS = {"teacher": 1, "posteval": 1}


@dataclass
class Node:
    stage: str
    key: str
    deps: tuple[str, ...]  # ids of nodes that must finish first
    payload: dict[str, Any]  # plain data: everything the job needs
    cached: bool = False
    resources: Resources | None = None  # what its job asks the scheduler for (see assign_resources)

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
        plan.add(Node("posteval", cell.key, (synth.id, *teacher_ids.values()),
                      {"dataset": dataset, "synth_key": skey, "teachers": label_teachers,
                       "protocol": cell.config["protocol"], "seed": cell.seed,
                       "ipc": cell.config["method"].get("ipc")}))
    return plan


def assign_resources(plan: Plan, spec: ResourcesSpec) -> Plan:
    """Give every node its stage's resources from the study's ``resources:`` block."""
    per_stage: dict[str, Resources] = {}
    for node in plan.nodes.values():
        if node.stage not in per_stage:
            per_stage[node.stage] = spec.for_stage(node.stage)
        node.resources = per_stage[node.stage]
    return plan
