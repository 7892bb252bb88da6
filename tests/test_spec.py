"""The study's resources block, how it reaches the executors, and problems
reported together."""
import textwrap
from collections import deque

import pytest
import yaml

import plaintree
from orchestrator.study.expand import expand
from orchestrator.execution.plan import Node, Plan, assign_resources, build_plan
from orchestrator.study.resources import Resources, ResourcesSpec, parse_memory
from orchestrator.execution.runner import Outcome, RayExecutor, execute
from orchestrator.study.spec import StudyError, load_study
from rd3core.artifacts import ArtifactStore
from rd3core.config import build


def test_stage_resources_inherit_the_study_defaults():
    spec = build(ResourcesSpec, {"cpus": 2, "memory": "1GiB", "teacher": {"gpus": 1},
                                 "posteval": {"cpus": 1, "gpus": 0.25, "memory": "512MB"}})
    assert spec.for_stage("teacher") == Resources(cpus=2, gpus=1, memory=2**30)
    assert spec.for_stage("synth") == Resources(cpus=2, gpus=0, memory=2**30)
    assert spec.for_stage("posteval") == Resources(cpus=1, gpus=0.25, memory=512 * 10**6)
    assert spec.for_stage("some_future_stage") == Resources(cpus=2, gpus=0, memory=2**30)


@pytest.mark.parametrize("text,expected", [(1024, 1024), ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20),
                                           ("2.5G", 2_500_000_000), ("100", 100), (None, None)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "8 parsecs", 0, -5])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_memory(text)


def test_whole_gpus_above_one_are_fine_and_limits_bound_every_stage():
    build(ResourcesSpec, {"gpus": 2, "max_gpus": 2, "synth": {"gpus": 0.5}})
    with pytest.raises(Exception) as exc:
        build(ResourcesSpec, {"max_cpus": 4, "cpus": 8, "labels": {"cpus": 6}})
    problems = {p.path for p in exc.value.problems}
    assert problems == {"cpus", "labels.cpus"}


def _plan(tiny_study, tmp_path, resources: str) -> tuple[Plan, object]:
    study = load_study(tiny_study("r", tiny_study().read_text() + textwrap.dedent(resources)))
    plan = build_plan(expand(study), ArtifactStore(tmp_path / "artifacts"))
    return assign_resources(plan, study.spec.resources), study


def test_plan_nodes_carry_their_stage_resources(tiny_study, tmp_path):
    plan, _ = _plan(tiny_study, tmp_path, """\
        resources:
          cpus: 2
          teacher: {gpus: 1, memory: 2GB}
          posteval: {gpus: 0.5}
        """)
    by_stage = {n.stage: n.resources for n in plan.nodes.values()}
    assert by_stage["teacher"] == Resources(cpus=2, gpus=1, memory=2 * 10**9)
    assert by_stage["synth"] == Resources(cpus=2, gpus=0)
    assert by_stage["posteval"] == Resources(cpus=2, gpus=0.5)


class FakeExecutor:
    """Finishes jobs in submission order; records what each asked for and how
    many were in flight at once."""

    def __init__(self):
        self.queue, self.asked, self.most = [], [], 0

    def submit(self, node: Node, resources: Resources) -> None:
        self.queue.append(node)
        self.asked.append((node.stage, resources))
        self.most = max(self.most, len(self.queue))

    def inflight(self) -> int:
        return len(self.queue)

    def next_outcome(self) -> Outcome:
        return Outcome(self.queue.pop(0), {"wall_s": 0.0})


def test_execute_submits_with_node_resources_and_respects_the_cap(tiny_study, tmp_path):
    plan, study = _plan(tiny_study, tmp_path, """\
        resources:
          max_concurrent: 2
          synth: {cpus: 2}
          posteval: {gpus: 0.25}
        """)
    executor, seen = FakeExecutor(), []
    execute(plan, executor, study.spec.resources, seen.append)
    assert len(seen) == len(plan.nodes) and executor.most == 2
    assert {(s, r.cpus, r.gpus) for s, r in executor.asked} == {("teacher", 1, 0), ("synth", 2, 0),
                                                                 ("posteval", 1, 0.25)}
    uncapped = FakeExecutor()
    for node in plan.nodes.values():
        node.resources = None  # falls back to the study's per-stage resources
    execute(plan, uncapped, build(ResourcesSpec, {}), [].append)
    assert uncapped.most == 4  # the four post-evaluations, released together


def test_ray_executor_submits_with_the_resources(monkeypatch):
    calls = []

    class Remote:
        def options(self, **kw):
            calls.append(kw)
            return self

        def remote(self, *args):
            return object()

    executor = RayExecutor.__new__(RayExecutor)  # no Ray instance needed to check what is asked
    executor.remote, executor.pending, executor.store_root = Remote(), {}, "/tmp/none"
    executor.board, executor.serial, executor.heartbeat_s = None, iter(range(9)), 5.0
    node = Node("posteval", "k", (), {})
    executor.submit(node, Resources(cpus=2, gpus=0.5, memory=3 * 2**30))
    executor.submit(node, Resources(cpus=1.5))
    assert calls == [{"num_cpus": 2, "num_gpus": 0.5, "memory": 3 * 2**30, "name": "rd3:posteval"},
                     {"num_cpus": 1.5, "num_gpus": 0.0, "name": "rd3:posteval"}]


def test_a_job_whose_beat_count_stops_changing_or_whose_node_leaves_is_lost(monkeypatch):
    """RayExecutor.check against a board and cluster it reads (no Ray instance):
    a job is judged by when the driver last saw its beat count change."""
    import orchestrator.execution.runner as runner

    class Cluster:
        def nodes(self):
            return [{"NodeID": "n1", "Alive": True}, {"NodeID": "n2", "Alive": False}]

        def cancel(self, ref, force):
            cancelled.append(ref)

    class Board:
        def __init__(self):
            self.beats, self.cleared = {}, []

        def read(self):
            return dict(self.beats)

        def clear(self, tokens):
            self.cleared += tokens

    cancelled, ticks, seen, clock = [], [], [], [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    nodes = {t: Node("posteval", t, (), {}) for t in ("beating", "frozen", "queued", "elsewhere")}
    executor = RayExecutor.__new__(RayExecutor)
    executor.ray, executor.board, executor.beats, executor.lost = Cluster(), Board(), {}, deque()
    executor.heartbeat_s, executor.on_tick, executor.on_progress = 1.0, ticks.append, seen.append
    executor.pending = {f"ref-{t}": (node, t) for t, node in nodes.items()}
    executor.board.beats = {"beating": (1, "n1", 11, "h"), "frozen": (1, "n1", 12, "h")}  # "queued": no beat yet
    executor.check()
    assert ticks[-1] == [nodes["beating"], nodes["frozen"]] and not executor.lost
    for second in range(1, 14):  # "beating" beats on; "frozen" keeps count 1
        clock[0] = 100.0 + second
        executor.board.beats["beating"] = (1 + second, "n1", 11, "h")
        executor.check()
    assert [o.node for o in executor.lost] == [nodes["frozen"]] and cancelled == ["ref-frozen"]
    assert "no heartbeat for 13 s from pid 12 on h" in executor.lost[0].error
    assert ticks[-1] == [nodes["beating"]] and executor.board.cleared == ["frozen"]
    assert seen[-1] == [(nodes["beating"], None)]  # a board without progress records: liveness as before
    executor.board.beats["elsewhere"] = (1, "n2", 13, "gone-host")  # its node is no longer alive
    executor.check()
    assert executor.lost[-1].node == nodes["elsewhere"] and "left the cluster" in executor.lost[-1].error
    assert set(executor.pending) == {"ref-beating", "ref-queued"}


def test_mistakes_in_independent_parts_are_reported_together(tiny_study):
    text = tiny_study().read_text().replace("{name: digits}", "{name: mnist}").replace(
        "seeds: [0, 1]", "seeds: [0, 1]\ncolour: blue\nexclude:\n  - {protocol.labels.mode: nope}")
    with pytest.raises(StudyError) as exc:
        load_study(tiny_study("many", text))
    text = str(exc.value)
    assert "unknown dataset 'mnist'" in text and "colour: unknown key" in text and "matches no cell" in text


def test_preset_factor_levels_use_common_overrides_but_not_the_base_overrides(tiny_study):
    text = tiny_study().read_text().replace(
        "factors:\n", "  common_overrides: {batch_size: 20}\nfactors:\n  preset: [rd3, sre2l]\n")
    cells = expand(load_study(tiny_study("p", text)))
    for c in cells:
        assert c.protocol.batch_size == 20
        assert (c.protocol.epochs == 150) == (c.factors["preset"] == "rd3")
        assert (c.protocol.student == "convnet3-w32") == (c.factors["preset"] == "rd3")


FULL = {"name": "f", "dataset": {"name": "digits"},
        "teachers": [{"arch": "convnet3-w32", "epochs": 2}, {"arch": "convnet3-w16"}],
        "methods": [{"name": "random_real", "ipc": 5, "native_preset": "rded"},
                    {"name": "random_real", "label": "sre2l", "ipc": 3}],
        "protocol": {"preset": "rd3", "overrides": {"epochs": 3}, "common_overrides": {"student": "convnet3-w32"}},
        "design": {"kind": "native_vs_unified", "unified": ["rd3", "cda"],
                   "zip": [["protocol.batch_size", "teacher[convnet3-w16].epochs"]]},
        "factors": {"method": ["random_real", "sre2l"], "protocol.batch_size": [8, 16],
                    "teacher[convnet3-w16].epochs": [1, 2], "teacher.epochs": [1]},
        "exclude": [{"method": "sre2l", "protocol": "native", "seed": 1}], "seeds": [0, 1],
        "resources": {"cpus": 1, "max_cpus": 2, "posteval": {"gpus": 0.5, "memory": "1GB"}}}
ODD = [None, [], {}, -1, 1.5, "x", [None], [{}], {"a": 1}, True, "native", [[1]]]


def test_any_odd_value_anywhere_is_a_study_error_not_a_crash(tmp_path):
    assert len(expand(load_study(tmp_path / "f.yaml", yaml.safe_dump(FULL)))) > 0  # the base is valid
    crashes = []
    for path in plaintree.paths(FULL):
        for odd in ODD:
            text = yaml.safe_dump(plaintree.replaced(FULL, path, odd))
            try:
                expand(load_study(tmp_path / "f.yaml", text))
            except StudyError:
                pass
            except Exception as exc:  # noqa: BLE001  (any other exception is the bug)
                crashes.append(f"{path} = {odd!r}: {type(exc).__name__}: {exc}")
    assert not crashes, "\n".join(crashes[:10])
