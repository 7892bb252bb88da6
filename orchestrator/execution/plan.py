"""The stage graph: teacher -> synth -> [labels] -> posteval, every stage keyed by content
so that cells share what they have in common. A teacher used by forty cells is
one node; a distilled set shared by every protocol variant of a (method, seed)
is one node. A `labels` node (stored FKD-style labels) sits between synth and
posteval when the protocol's labels.mode is 'stored'; protocol variants that
differ only in what the labels do not depend on (student, optimiser, ...) share it.

A stored stage's key is ``stage_key(stage, version, params, upstream keys)``
where ``params`` is only what that stage's output depends on. Every node's
payload is plain data, and upstream artifacts are passed as *refs*
(``Node.ref()``: stage, key and the producing payload), so the job that needs
an artifact can rebuild it when it is missing or corrupt.

Adding a stage: name it in ``STAGES`` (report order) and ``STAGE_VERSIONS``,
add its node with :meth:`Plan.stage` in :func:`build_plan`, and register its
producer in ``orchestrator.execution.jobs`` with ``@producer("<stage>")``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from rd3core.artifacts import ArtifactStore, stage_key
from rd3core.config import to_dict
from rd3core.stored_labels import protocol_params as stored_label_params
from rd3core.synth import METHODS
from rd3core.teachers import TeacherSpec

from ..study.expand import Cell
from ..study.resources import Resources, ResourcesSpec

STAGES = ("teacher", "synth", "labels", "posteval")
# Stages whose outputs are results in the DB, not artifacts in the store.
RESULT_STAGES = ("posteval",)
# Bump when a stage's output for the same params changes (invalidates its cache).
# A synthesis method's own version (rd3core.synth) is the synth stage's version.
STAGE_VERSIONS = {"teacher": 1, "labels": 1, "posteval": 1}


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

    def ref(self) -> dict[str, Any]:
        """What a downstream job needs to load this artifact, or rebuild it."""
        return {"stage": self.stage, "key": self.key, "payload": self.payload}


@dataclass
class Plan:
    nodes: dict[str, Node] = field(default_factory=dict)

    def add(self, node: Node) -> Node:
        return self.nodes.setdefault(node.id, node)

    def stage(self, store: ArtifactStore, stage: str, version: int, params: Any, payload: dict[str, Any],
              upstream: dict[str, Node] | None = None) -> Node:
        """The node of a stored stage, shared by every cell that asks for the same key."""
        upstream = upstream or {}
        key = stage_key(stage, version, params, {name: n.key for name, n in upstream.items()})
        node_id = f"{stage}:{key}"
        if node_id in self.nodes:
            return self.nodes[node_id]
        deps = tuple(dict.fromkeys(n.id for n in upstream.values()))
        return self.add(Node(stage, key, deps, payload, cached=store.exists(stage, key)))

    def loaded_teachers(self) -> tuple[int, int]:
        """(teachers to load from weights made elsewhere, teachers to train), of
        the teacher nodes to run."""
        todo = [n for n in self.nodes.values() if n.stage == "teacher" and not n.cached]
        loaded = sum(1 for n in todo if "source" in n.payload)
        return loaded, len(todo) - loaded

    def counts(self) -> dict[str, tuple[int, int]]:
        """stage -> (runs needed, cached), in pipeline order."""
        need = Counter(n.stage for n in self.nodes.values() if not n.cached)
        cached = Counter(n.stage for n in self.nodes.values() if n.cached)
        stages = list(STAGES) + sorted({n.stage for n in self.nodes.values()} - set(STAGES))
        return {s: (need[s], cached[s]) for s in stages}

    def artifacts(self) -> set[tuple[str, str]]:
        """(stage, key) of every stored artifact this plan uses."""
        return {(n.stage, n.key) for n in self.nodes.values() if n.stage not in RESULT_STAGES}


def teacher_node(dataset: dict, teacher: TeacherSpec) -> tuple[dict, dict]:
    """(params, payload) of a teacher node. It is keyed by the teacher's
    identity (a checkpoint by its content digest, not its path); a loaded
    teacher's payload also carries its settings as written (the file's path)
    and the source it was planned with, which the job checks the file against."""
    params = {"dataset": dataset, "teacher": teacher.identity()}
    if not teacher.loaded:
        return params, params
    return params, {"dataset": dataset, "teacher": teacher.settings(), "source": params["teacher"]["source"]}


def synth_params(cell: Cell) -> dict:
    method = METHODS.get(cell.method.name)
    return {"dataset": to_dict(cell.dataset), "method": cell.method.name,
            **method.key_inputs(cell.method.params, cell.seed)}


def labels_params(cell: Cell) -> dict:
    """What a cell's stored labels depend on: the protocol fields that shape the
    views and targets, the seed and IPC (RDED's batch rule); the synth and
    labelling teacher keys enter as upstream keys."""
    return {"dataset": to_dict(cell.dataset), "protocol": stored_label_params(cell.protocol), "seed": cell.seed,
            "ipc": cell.config["method"].get("ipc")}


def build_plan(cells: Iterable[Cell], store: ArtifactStore) -> Plan:
    plan = Plan()
    for cell in cells:
        dataset = to_dict(cell.dataset)
        teachers: dict[str, Node] = {}
        for teacher in cell.teachers:
            params, payload = teacher_node(dataset, teacher)
            teachers[teacher.arch] = plan.stage(store, "teacher", STAGE_VERSIONS["teacher"], params, payload)
        method = METHODS.get(cell.method.name)
        primary = teachers[cell.teachers[0].arch] if method.needs_teacher else None
        synth = plan.stage(store, "synth", method.version, synth_params(cell),
                           {"dataset": dataset, "method": cell.config["method"], "seed": cell.seed,
                            "teacher": primary.ref() if primary else None},
                           {"teacher": primary} if primary else None)
        payload = {"dataset": dataset, "synth": synth.ref(),
                   "teachers": {arch: n.ref() for arch, n in teachers.items()},
                   "protocol": cell.config["protocol"], "seed": cell.seed, "ipc": cell.config["method"].get("ipc")}
        if "trial" in cell.config:  # a search's trial: selected on the held-out split, never shown the test set
            payload["test"] = False
        deps = (synth.id, *(n.id for n in teachers.values()))
        if cell.protocol.labels.mode == "stored":
            names = list(cell.protocol.labels.teachers) or [cell.teachers[0].arch]
            labels = plan.stage(store, "labels", STAGE_VERSIONS["labels"], labels_params(cell), dict(payload),
                                {"synth": synth, **{f"teacher:{n}": teachers[n] for n in names}})
            payload["labels"] = labels.ref()
            deps = (*deps, labels.id)
        plan.add(Node("posteval", cell.key, tuple(dict.fromkeys(deps)), payload))
    return plan


def assign_resources(plan: Plan, spec: ResourcesSpec) -> Plan:
    """Give every node its stage's resources from the study's ``resources:`` block."""
    per_stage: dict[str, Resources] = {}
    for node in plan.nodes.values():
        if node.stage not in per_stage:
            per_stage[node.stage] = spec.for_stage(node.stage)
        node.resources = per_stage[node.stage]
    return plan
