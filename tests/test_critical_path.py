"""No core idles while work waits: a shared-stage job that every remaining
result depends on (the critical path) gets every CPU of a node
(orchestrator.execution.runner.critical, widen); other jobs, post-evaluations above all,
keep what they asked for, and the choice reads only the plan, so the Ray and the
local executor still give identical numbers. Checked on the driver loop with a
recording executor, and on a real Ray run of a small study."""
import json

import pytest

from conftest import run_cli
from db.queries import results_frame
from db.session import make_engine, sqlite_url
from orchestrator.execution.plan import Node, Plan
from orchestrator.study.resources import Resources, ResourcesSpec
from orchestrator.execution.runner import Outcome, critical, execute, widen


class Recording:
    """Finishes jobs in submission order; records what each was given."""

    def __init__(self, capacity):
        self.capacity, self.queue, self.given = capacity, [], []

    def submit(self, node: Node, resources) -> None:
        self.queue.append(node)
        self.given.append((node.id, resources))

    def inflight(self) -> int:
        return len(self.queue)

    def next_outcome(self) -> Outcome:
        return Outcome(self.queue.pop(0), {"wall_s": 0.0})

    def node_capacity(self):
        return dict(self.capacity)


def pipeline(synths: int = 3, with_random: bool = False) -> Plan:
    """teacher -> synth i -> posteval i; optionally a random subset that needs no
    teacher, whose cell uses soft labels (so it needs the teacher too)."""
    plan = Plan()
    teacher = plan.add(Node("teacher", "t", (), {}))
    for i in range(synths):
        synth = plan.add(Node("synth", f"s{i}", (teacher.id,), {}))
        plan.add(Node("posteval", f"p{i}", (synth.id,), {}))
    if with_random:
        rand = plan.add(Node("synth", "r", (), {}))
        plan.add(Node("posteval", "pr", (rand.id, teacher.id), {}))
    return plan


def test_the_teacher_every_cell_needs_gets_every_cpu_and_the_rest_keep_theirs():
    executor = Recording({"CPU": 4.0, "GPU": 0.0})
    execute(pipeline(with_random=True), executor, ResourcesSpec(cpus=1), lambda o: None)
    given = {nid: r.cpus for nid, r in executor.given}
    # The random subset's synthesis is ready beside it, but no cell can finish before the teacher.
    assert given["teacher:t"] == 4.0 and given["synth:r"] == 1.0
    assert all(given[f"synth:s{i}"] == 1.0 for i in range(3))  # three of them: each is one path of several
    assert {v for k, v in given.items() if k.startswith("posteval")} == {1.0}


def test_only_a_node_every_result_needs_is_critical():
    assert critical(pipeline(with_random=True)) == {"teacher:t"}
    assert critical(pipeline(1)) == {"teacher:t", "synth:s0"}  # one method: its synthesis too
    hard = pipeline(2)
    hard.add(Node("synth", "r", (), {}))
    hard.add(Node("posteval", "pr", ("synth:r",), {}))  # a hard-label cell of a random subset
    assert critical(hard) == set()
    cached = pipeline(1)
    cached.nodes["teacher:t"].cached = True
    assert critical(cached) == {"synth:s0"}


def test_widening_respects_max_cpus_and_gpus():
    executor = Recording({"CPU": 8.0, "GPU": 0.0})
    execute(pipeline(1), executor, ResourcesSpec(cpus=1, max_cpus=3), lambda o: None)
    assert dict((n, r.cpus) for n, r in executor.given)["teacher:t"] == 3.0
    assert widen(Resources(cpus=4), {"CPU": 2.0}).cpus == 4.0  # never below what it asked for
    shared = widen(Resources(cpus=1, gpus=0.25), {"CPU": 3.0, "GPU": 1.0})
    assert (shared.cpus, shared.gpus) == (3.0, 1.0)
    assert widen(Resources(cpus=1, gpus=2.0), {"CPU": 1.0, "GPU": 4.0}).gpus == 2.0  # whole GPUs stay as asked
    none = Recording({})
    execute(pipeline(), none, ResourcesSpec(cpus=1), lambda o: None)
    assert {r.cpus for _, r in none.given} == {1.0}  # an executor that cannot say: nothing widened


STUDY = """\
name: widen
dataset: {name: digits}
teachers:
  - {arch: convnet3-w16-bn, epochs: 2, augment: {crop: pad, padding: 2, flip: false, mix: none}}
methods:
  - {name: random_real, ipc: 2}
  - {name: rded, ipc: 2, candidates_per_class: 10}
protocol:
  preset: rd3
  overrides: {student: convnet3-w16, epochs: 2, augment: {flip: false}, eval: {interval: 0}}
seeds: [0]
resources: {cpus: 1}
"""


@pytest.mark.slow
def test_a_real_run_gives_the_teacher_both_cpus_and_local_gives_the_same_numbers(tmp_path):
    study = tmp_path / "widen.yaml"
    study.write_text(STUDY)
    proc = run_cli("run", str(study), "--out", str(tmp_path / "ray"), "--num-cpus", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = json.loads((tmp_path / "ray" / "widen" / "last_run.json").read_text())["jobs"]
    threads = {j["stage"]: set() for j in jobs}
    for j in jobs:
        threads[j["stage"]].add(j["threads"])
    assert threads == {"teacher": {2}, "synth": {1}, "posteval": {1}}
    local = run_cli("run", str(study), "--out", str(tmp_path / "local"), "--executor", "local")
    assert local.returncode == 0, local.stderr[-2000:]
    # The local executor widens the same job (the rule reads the plan only): the same numbers, to the last digit.
    ray_top1, local_top1 = (results_frame(make_engine(sqlite_url(tmp_path / d / "rd3.sqlite")), "widen")
                            .set_index("cell_key")["top1"].sort_index() for d in ("ray", "local"))
    assert len(ray_top1) == 2 and ray_top1.equals(local_top1)
