"""Teachers with weights made elsewhere, seen from a study: what is wrong with
them for the study's dataset (validation reads checkpoint files; hub weights
need only their names), and the hub weights a run fetches before it writes
anything (a dry run only says which are missing)."""
from __future__ import annotations

from rd3core.config import Problem, build
from rd3core.data import load_dataset
from rd3core.registry import UnknownName
from rd3core.teachers import CheckpointError, TeacherSpec, source_problems

from .spec import DatasetSpec, Study, StudyError, render

HUB = ("torchvision", "timm")


class TeacherChecks:
    """Checks of teachers against one dataset; the dataset's facts are read
    once, and its class names only when a teacher lists its classes."""

    def __init__(self, dataset: DatasetSpec):
        self.dataset = dataset
        self._classes: tuple[str, ...] | None = None

    def problems(self, teacher: TeacherSpec, where: str) -> list[Problem]:
        """Problems at ``where.<key>``; none for a trained teacher, or when the
        dataset itself is unusable (reported at dataset)."""
        if not teacher.loaded:
            return []
        try:
            info = self.dataset.info
            classes = self.classes() if teacher.classes is not None else None
        except (FileNotFoundError, ValueError, UnknownName):
            return []
        return [Problem(f"{where}.{key}", message) for key, message in source_problems(teacher, info, classes)]

    def classes(self) -> tuple[str, ...]:
        if self._classes is None:
            self._classes = load_dataset(self.dataset.name, self.dataset.root).classes
        return self._classes


def teacher_problems(study_spec) -> list[Problem]:
    """The declared teachers (``teachers[i]``) against the study's dataset."""
    checks = TeacherChecks(study_spec.dataset)
    return [p for i, t in enumerate(study_spec.teachers) for p in checks.problems(t, f"teachers[{i}]")]


def _where(study: Study, teacher: TeacherSpec) -> str:
    for i, declared in enumerate(study.spec.teachers):
        if declared == teacher:
            return f"teachers[{i}]"
    return f"teacher[{teacher.arch}]"  # changed by a factor level


def uses_hub_weights(cells) -> bool:
    return any(t.source in HUB for cell in cells for t in cell.teachers)


def hub_teachers(study: Study, plan) -> dict[TeacherSpec, str]:
    """Teachers of ``plan`` (orchestrator.execution.plan.Plan) not in the artifact store
    yet whose weights come from torchvision or timm -> their key path."""
    found: dict[TeacherSpec, str] = {}
    for node in plan.nodes.values():
        if node.stage == "teacher" and not node.cached and node.payload.get("source", {}).get("kind") in HUB:
            teacher = build(TeacherSpec, node.payload["teacher"])
            found.setdefault(teacher, _where(study, teacher))
    return found


def fetch_hub_weights(study: Study, plan) -> None:
    """Before a run writes anything: every hub weight file its teachers need is
    in the library's cache, downloaded through the library when missing; a
    StudyError naming the file and folder otherwise (offline, say)."""
    problems = []
    for teacher, where in hub_teachers(study, plan).items():
        key = "weights" if teacher.source == "torchvision" else "pretrained"
        try:
            teacher.hub_weights().fetch()
        except CheckpointError as exc:
            problems.append(Problem(f"{where}.{key}", str(exc)))
    if problems:
        raise StudyError(render(study.source, problems))


def missing_hub_weights(study: Study, plan) -> list[str]:
    """For a dry run: one line per hub weight file not cached yet (nothing is downloaded)."""
    lines = []
    for teacher, where in hub_teachers(study, plan).items():
        found = teacher.hub_weights()
        if found.cached() is None:
            lines.append(f"{where}: {found.missing()}; a run downloads them first (network needed)")
    return lines
