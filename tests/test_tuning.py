"""The tuned design: its validation, the seeded searcher and the choice, trial
cells that never see the test split, and (slow) whole runs through Ray Tune: a
planted method that needs a higher learning rate is found within the budget and
the ranking changes; a crashed search resumes from the database; the search's
choices are the same when the test labels are permuted."""
from __future__ import annotations

import json
import re
import sqlite3
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from orchestrator.cli import main
from orchestrator.execution.plan import build_plan
from orchestrator.execution.search import searcher_class
from orchestrator.study.expand import expand, trial_cell, tuned_cells
from orchestrator.study.spec import load_study
from orchestrator.study.tuning import Budget, Domain, Scheduler, Search, choose, parse_domain, rungs
from planted_lr import HELDOUT_PER_CLASS, PROTOCOL, UNIFIED_LR, write_planted_sets
from rd3core.artifacts import ArtifactStore

TUNED = """\
name: {name}
dataset: {dataset}
methods:
{methods}
protocol:
  preset: rd3
  overrides: {{optim: {{lr: {unified_lr}}}}}   # the shared recipe's lr: the planted trap
  common_overrides: {common}
design:
  kind: tuned
  space: {space}
  budget: {{trials: {trials}}}
  search: {{algorithm: {algorithm}, seed: 1000}}
  scheduler: {{grace_period: {grace}, reduction_factor: 3}}
seeds: [0, 1, 2]
resources: {{cpus: 1}}
"""
COMMON = {**PROTOCOL, "eval": {"interval": 5}}


def study_text(name="tuned", dataset=f"{{name: digits, heldout_per_class: {HELDOUT_PER_CLASS}}}", methods=None,
               space="{protocol.optim.lr: 'loguniform(1e-4, 1e-1)'}", trials=8, grace=10, common=None,
               algorithm="random", **extra) -> str:
    methods = methods or [{"name": "random_real", "ipc": 10, "native_preset": "rd3"}]
    return TUNED.format(name=name, dataset=dataset, methods="\n".join(f"  - {json.dumps(m)}" for m in methods),
                        unified_lr=UNIFIED_LR, common=json.dumps(common or COMMON), space=space, trials=trials,
                        grace=grace, algorithm=algorithm, **extra)


def write(tmp_path: Path, text: str, name: str = "tuned") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# --- the study language ----------------------------------------------------------


def test_a_tuned_study_validates_into_native_and_unified_cells(tmp_path, capsys):
    study = load_study(write(tmp_path, study_text()))
    cells = expand(study)
    assert {c.factors["protocol"] for c in cells} == {"native", "rd3"}  # the tuned arm comes from the search
    assert main(["validate", str(write(tmp_path, study_text()))]) == 0
    assert "design tuned" in capsys.readouterr().out


@pytest.mark.parametrize("change, where, expected", [
    (dict(dataset="{name: digits}"), "design", "dataset.heldout_per_class"),
    (dict(space="{protocol.epochs: [10, 20]}"), "design.space.protocol.epochs", "cannot be searched"),
    (dict(space="{protocol.eval.interval: [1, 5]}"), "design.space.protocol.eval.interval", "cannot be searched"),
    (dict(space="{optim.lr: 'loguniform(1e-4, 1e-1)'}"), "design.space.optim.lr", "unknown factor"),
    (dict(space="{method.ipc: [1, 10]}"), "design.space.method.ipc", "expected a protocol field"),
    (dict(space="{protocol.optim.lr: 'loguniform(0, 1)'}"), "design.space.protocol.optim.lr", "low > 0"),
    (dict(space="{protocol.optim.lr: 'uniform(1, 1)'}"), "design.space.protocol.optim.lr", "low < high"),
    (dict(space="{protocol.optim.lr: 'loguniform(1e-4, 1e5)'}"), "design.space.protocol.optim.lr", "1000"),
    (dict(space="{protocol.optim.lr: 'normal(0, 1)'}"), "design.space.protocol.optim.lr", "expected loguniform"),
    (dict(space="{protocol.optim.lr: 0.1}"), "design.space.protocol.optim.lr", "expected a domain"),
    (dict(space="{protocol.batch_size: []}"), "design.space.protocol.batch_size", "non-empty list"),
    (dict(space="{protocol.batch_size: [0, 50]}"), "design.space.protocol.batch_size", ""),
    (dict(space="{protocol.optim.lr: 'randint(1, x)'}"), "design.space.protocol.optim.lr", "two integers"),
    (dict(space="{}"), "design.space", "expected the search space"),
    (dict(space="{protocol.optim.lr: loguniform(1e-4, 1e-1)}"), "design.space.protocol.optim.lr", "quote the domain"),
    (dict(trials=0), "design.budget.trials", ">= 1"),
    (dict(algorithm="random, startup: 3"), "design.search.algorithm", "only the tpe searcher"),
    (dict(algorithm="bayes"), "design.search.algorithm", "random"),
    (dict(trials="4, cpu_hours: 1"), "design.budget.cpu_hours", "a budget is one of trials, cpu_hours, gpu_hours"),
    (dict(trials="null, gpu_hours: -1"), "design.budget.gpu_hours", "> 0"),
    (dict(grace=0), "design.scheduler.grace_period", ">= 1"),
])
def test_a_bad_tuned_design_is_refused_at_its_key(tmp_path, capsys, change, where, expected):
    path = write(tmp_path, study_text(**change))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(path))}:\d+: {re.escape(where)}", err), err
    assert expected in err and "Traceback" not in err


def test_the_search_seed_must_not_be_a_study_seed(tmp_path, capsys):
    path = write(tmp_path, study_text().replace("seeds: [0, 1, 2]", "seeds: [0, 1000]"))
    assert main(["validate", str(path)]) == 2
    assert "design.search.seed: seed 1000 trains the search's trials" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("design: {kind: factorial, space: {protocol.optim.lr: [0.1]}}", "only the 'tuned' design takes a search space"),
    ("design: {kind: tuned, space: {protocol.optim.lr: [0.1]}}\nfactors: {protocol.epochs: [5, 10]}",
     "it crosses no factors"),
    ("design: {kind: tuned, unified: [rd3, sre2l], space: {protocol.optim.lr: [0.1]}}", "tunes one shared protocol"),
])
def test_the_search_belongs_to_the_tuned_design(tmp_path, capsys, text, expected):
    base = study_text().split("design:")[0]
    path = write(tmp_path, base + text + "\nseeds: [0]\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_a_dry_run_says_the_search_comes_first(tmp_path, capsys):
    assert main(["run", str(write(tmp_path, study_text())), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert "and first the search: 8 trials per method for each of 1 method, then" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_refused_tuned_study_writes_nothing(tmp_path):
    path = write(tmp_path, study_text(dataset="{name: digits}"))
    proc = run_cli("run", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "never on the test set" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_held_out_carve_of_an_unreadable_tree_is_a_study_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RD3_DATA_CIFAR10", str(tmp_path))  # exists, but holds no train/ or test/
    path = write(tmp_path, study_text(dataset="{name: cifar10, heldout_per_class: 10}"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: dataset.root:" in err and "must hold train/<class>/" in err
    assert "heldout_per_class" not in err  # the carve is not reported missing: the dataset entry has one


def test_domains_parse_as_tune_writes_them():
    assert parse_domain("loguniform(1e-4, 1e-1)") == (Domain("loguniform", (1e-4, 1e-1)), None)
    assert parse_domain(" uniform( 0.5 ,2 ) ")[0] == Domain("uniform", (0.5, 2.0))
    assert parse_domain("randint(1, 5)")[0] == Domain("randint", (1, 5))
    assert parse_domain([25, 50])[0] == Domain("choice", (25, 50))


def test_rungs_are_the_epochs_asha_compares_at():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, epochs in [(10, 3, 30), (10, 2, 40), (5, 2, 20), (3, 3, 100), (1, 4, 7), (30, 3, 30)]:
        bracket = _Bracket(grace, epochs, rf, 0)
        milestones = sorted(int(m) for m, _ in bracket._rungs)
        assert rungs(Scheduler(grace_period=grace, reduction_factor=rf), epochs) == [m for m in milestones
                                                                                     if m < epochs]


# --- the searcher and the choice ------------------------------------------------


def draws(seed: int, n: int = 6, algorithm: str = "random", startup: int | None = None) -> list[dict]:
    """The searcher's trials, each told a result that peaks at lr 1e-2 (TPE follows it)."""
    domains = {"protocol.optim.lr": Domain("loguniform", (1e-4, 1e-1)), "protocol.batch_size": Domain("choice", (25, 50))}
    searcher = searcher_class()(domains, Budget(trials=n), Search(algorithm, seed, startup),
                                lambda index, values: {"index": index, **values})
    out = []
    while (config := searcher.suggest(f"t{len(out)}")) != "FINISHED":
        out.append(config)
        score = -abs(np.log10(config["protocol.optim.lr"]) + 2)
        searcher.on_trial_complete(f"t{len(out) - 1}", {"heldout_top1": score, "epoch": 3, "trial_wall_s": 1.0})
    return out


def test_the_searcher_draws_the_budget_the_same_for_every_method_and_rerun():
    first = draws(1000)
    assert len(first) == 6 and [c["index"] for c in first] == list(range(6))
    assert draws(1000) == first  # a rerun (or the next method) draws the same trials
    assert draws(1001) != first
    assert all(1e-4 <= c["protocol.optim.lr"] < 1e-1 and type(c["protocol.optim.lr"]) is float for c in first)
    assert {type(c["protocol.batch_size"]) for c in first} == {int}  # stored and hashed as the YAML levels


def test_tpe_is_seeded_learns_from_results_and_replays_the_same():
    first = draws(1000, 12, "tpe", startup=3)
    assert draws(1000, 12, "tpe", startup=3) == first  # a rerun told the same (replayed) results draws the same
    assert draws(1001, 12, "tpe", startup=3) != first
    assert {type(c["protocol.batch_size"]) for c in first} == {int} and len(first) == 12
    near = lambda configs: np.mean([abs(np.log10(c["protocol.optim.lr"]) + 2) for c in configs[6:]])  # noqa: E731
    assert near(first) < near(draws(1000, 12))  # after its startup it draws nearer the planted optimum than random


def test_an_hours_budget_draws_until_the_recorded_hours_reach_it():
    domains = {"protocol.optim.lr": Domain("loguniform", (1e-4, 1e-1))}
    searcher = searcher_class()(domains, Budget(cpu_hours=0.01), Search(seed=0), lambda index, values: {"index": index},
                                cpus=2)
    walls = [5.0, 7.0, 6.0, 1.0]  # seconds; 2 CPUs: 10 + 14 + 12 = 36 s = 0.01 CPU-hours after the third
    suggested = []
    while (config := searcher.suggest(f"t{len(suggested)}")) != "FINISHED":
        suggested.append(config)
        searcher.on_trial_complete(f"t{len(suggested) - 1}", {"trial_wall_s": walls[len(suggested) - 1]})
    assert len(suggested) == 3
    assert Budget(cpu_hours=0.01).progress([{"cpu_hours": 0.004}, {"cpu_hours": 0.0061}]) == \
        "0.0101/0.01 cpu-hours (2 trials)"
    assert Budget().progress([{}] * 3) == "3/8 trials" and not Budget().exhausted([{}] * 7)


def test_the_choice_is_the_best_full_trial_on_held_out_accuracy():
    trials = [{"index": 0, "status": "done", "pruned": 0.0, "heldout_top1": 0.80},
              {"index": 1, "status": "done", "pruned": 1.0, "heldout_top1": 0.99},  # stopped early: not comparable
              {"index": 2, "status": "failed"},
              {"index": 3, "status": "done", "pruned": 0.0, "heldout_top1": 0.90},
              {"index": 4, "status": "done", "pruned": 0.0, "heldout_top1": 0.90},  # a tie: the earlier trial
              {"index": 5, "status": "done", "pruned": 0.0, "heldout_top1": float("nan")}]
    assert choose(trials)["index"] == 3
    assert choose(trials[1:3]) is None


# --- trial cells -------------------------------------------------------------------


def test_a_trial_is_its_own_cell_that_withholds_the_test_split(tmp_path):
    study = load_study(write(tmp_path, study_text()))
    values = {"protocol.optim.lr": UNIFIED_LR}  # the shared recipe's own value
    trial = trial_cell(study, "random_real", 3, values)
    assert trial.seed == 1000 and trial.protocol.optim.lr == UNIFIED_LR
    assert trial.config["trial"] == {"index": 3, "search": {"algorithm": "random", "seed": 1000}}
    assert trial.factors == {"method": "random_real", "protocol": "trial", "recipe": "rd3", "trial": 3, **values}
    assert trial_cell(study, "random_real", 3, values).key == trial.key  # the same draw: the same stored cell
    assert trial_cell(study, "random_real", 4, values).key != trial.key
    [node] = [n for n in build_plan([trial], ArtifactStore(tmp_path / "a")).nodes.values() if n.stage == "posteval"]
    assert node.payload["test"] is False
    unified = [c for c in expand(study) if c.factors["protocol"] == "rd3"]
    tuned = tuned_cells(study, {"random_real": (values, trial.key)})
    assert [c.seed for c in tuned] == [0, 1, 2] and {c.factors["protocol"] for c in tuned} == {"tuned"}
    # Even when the search chose the shared recipe's values, the tuned arm is its own cells.
    assert [c.protocol for c in tuned] == [c.protocol for c in unified]
    assert not {c.key for c in tuned} & {c.key for c in unified}
    [node] = [n for n in build_plan(tuned[:1], ArtifactStore(tmp_path / "a")).nodes.values() if n.stage == "posteval"]
    assert "test" not in node.payload


def test_a_posteval_without_the_test_split_reports_held_out_accuracy_only():
    from rd3core.data import carve_heldout, load_dataset
    from rd3core.pipeline import posteval
    from rd3core.protocol import resolve_protocol
    from rd3core.synth import synthesize
    from rd3core.synth.random_real import RandomRealParams

    data = load_dataset("digits")
    carved = carve_heldout(data, 5)
    distilled = synthesize("random_real", carved, None, RandomRealParams(ipc=2), seed=0)
    protocol = resolve_protocol("rd3", "digits", {**PROTOCOL, "epochs": 4, "eval": {"interval": 2}})
    out = posteval(distilled, carved, protocol, {}, seed=0, with_test=False)
    assert "top1" not in out["metrics"] and "top1_heldout_selected" not in out["metrics"]
    assert 0 <= out["metrics"]["heldout_top1"] <= 1
    assert all("test_top1" not in r for r in out["epochs"])
    assert [r["epoch"] for r in out["epochs"] if "heldout_top1" in r] == [2, 4]
    with pytest.raises(ValueError, match="has none"):
        posteval(distilled, data, protocol, {}, seed=0, with_test=False)


# --- whole runs (Ray Tune, real SQLite) ---------------------------------------


def trial_rows(db: Path) -> list[dict]:
    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        cells = [dict(r) for r in con.execute("SELECT id, cell_key, status, factors FROM cell")]
        metrics = {}
        for cid, name, value in con.execute("SELECT cell_id, name, value FROM metric"):
            metrics.setdefault(cid, {})[name] = value
        epochs = {}
        for cid, epoch, held, test in con.execute("SELECT cell_id, epoch, heldout_top1, test_top1 FROM epoch_metric "
                                                  "ORDER BY epoch"):
            epochs.setdefault(cid, []).append((epoch, held, test))
    out = []
    for c in cells:
        factors = json.loads(c["factors"])
        if factors.get("protocol") == "trial":
            out.append({**c, "factors": factors, "metrics": metrics.get(c["id"], {}), "epochs": epochs.get(c["id"], [])})
    return sorted(out, key=lambda r: (r["factors"]["method"], r["factors"]["trial"]))


@pytest.mark.slow
def test_a_planted_method_needing_a_higher_lr_is_found_and_the_ranking_changes(tmp_path):
    sets = write_planted_sets(tmp_path / "sets")
    methods = [{**sets[label], "native_preset": "rd3"} for label in ("easy", "diverse")]
    path = write(tmp_path, study_text(name="planted", methods=methods))
    out = tmp_path / "out"
    proc = run_cli("run", str(path), "--out", str(out), "--num-cpus", "2", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    analysis = json.loads((out / "planted" / "analysis.json").read_text())
    tuning = analysis["tuning"]

    # Equal budgets, checked and recorded: 8 trials each, the same draws, the same scheduler.
    assert tuning["equal_budget"] and {m: s["trials"] for m, s in tuning["searches"].items()} == \
        {"easy": 8, "diverse": 8}
    trials = trial_rows(out / "rd3.sqlite")
    assert len(trials) == 16 and all(t["status"] == "done" for t in trials)
    draws_of = {m: [t["factors"]["protocol.optim.lr"] for t in trials if t["factors"]["method"] == m]
                for m in ("easy", "diverse")}
    assert draws_of["easy"] == draws_of["diverse"]
    # Pruned trials are in the database (stopped at the rung, epoch 10 of 30) and in `status`.
    pruned = [t for t in trials if t["metrics"]["pruned"] == 1]
    assert pruned and all(t["metrics"]["trial_epochs"] == 10 and t["epochs"][-1][0] == 10 for t in pruned)
    assert all(t["metrics"]["trial_epochs"] == 30 for t in trials if t["metrics"]["pruned"] == 0)
    # No trial saw the test split: no test accuracy in its metrics or its curve.
    assert all("top1" not in t["metrics"] and all(test is None for _, _, test in t["epochs"]) for t in trials)
    with sqlite3.connect(out / "rd3.sqlite") as con:  # plain SQL sees them too (docs/DATABASE.md)
        rows = con.execute('SELECT trial, "protocol.optim.lr", heldout_top1, pruned, top1 FROM results_planted '
                           "WHERE protocol = 'trial'").fetchall()
    assert len(rows) == 16 and all(r[2] is not None and r[3] in (0, 1) and r[4] is None for r in rows)
    status = run_cli("status", "planted", "--out", str(out))
    for m in ("easy", "diverse"):
        n = sum(t["factors"]["method"] == m for t in pruned)
        assert re.search(rf"search {m}: 8/8 trials, {n} pruned \({n} at epoch 10\), 0 failed", status.stdout), \
            status.stdout

    # The planted method needs a higher lr than the shared 1e-4: the search gives it one...
    chosen = tuning["searches"]["diverse"]["chosen"]["values"]["protocol.optim.lr"]
    assert chosen >= 10 * UNIFIED_LR
    means = {m: {arm: v["mean"] for arm, v in arms.items()} for m, arms in tuning["methods"].items()}
    assert means["diverse"]["tuned"] > means["diverse"]["rd3"] + 0.15
    # ... and the ranking under the shared recipe does not survive equal tuning.
    assert tuning["ranking"]["order"] == {"rd3": ["easy", "diverse"], "tuned": ["diverse", "easy"]}
    assert not tuning["ranking"]["survives"]
    assert "the ranking changes under equal tuning" in " ".join(analysis["headlines"])
    report = run_cli("report", "planted", "--out", str(out))
    assert report.returncode == 0, report.stderr
    text = (out / "planted" / "report.md").read_text()
    assert "Fair tuning" in text and "tuning_budget.png" in text

    # A crash mid-search: one trial's result lost, its attempt left running.
    lost = next(t for t in trials if t["factors"]["method"] == "diverse" and t["metrics"]["pruned"] == 0)
    with sqlite3.connect(out / "rd3.sqlite") as con:
        con.execute("DELETE FROM metric WHERE cell_id = ?", (lost["id"],))
        con.execute("DELETE FROM epoch_metric WHERE cell_id = ? AND epoch > 15", (lost["id"],))
        con.execute("UPDATE cell SET status = 'running' WHERE id = ?", (lost["id"],))
        con.execute("UPDATE attempt SET status = 'running', ended_at = NULL WHERE cell_id = ?", (lost["id"],))
    again = run_cli("run", str(path), "--out", str(out), "--num-cpus", "2", timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = [ln for ln in again.stdout.splitlines() if re.match(r"\s+\[(easy|diverse) trial", ln)]
    assert len(lines) == 16 and sum("replayed from the database" in ln for ln in lines) == 15
    index = lost["factors"]["trial"]
    assert "replayed" not in next(ln for ln in lines if f"[diverse trial {index} " in ln)
    assert "0 to run" in again.stdout  # the same choices: the tuned cells are the stored ones
    redone = {t["cell_key"]: t for t in trial_rows(out / "rd3.sqlite")}[lost["cell_key"]]
    assert redone["status"] == "done" and redone["epochs"] == lost["epochs"]
    assert redone["metrics"]["heldout_top1"] == lost["metrics"]["heldout_top1"]


def tuned_top1(db: Path) -> float:
    """Mean test top-1 of the tuned cells."""
    with sqlite3.connect(db) as con:
        values = [v for (v,) in con.execute("SELECT m.value FROM metric m JOIN cell c ON c.id = m.cell_id WHERE "
                                            "m.name = 'top1' AND json_extract(c.factors, '$.protocol') = 'tuned'")]
    assert len(values) == 3
    return sum(values) / len(values)


def digits_tree(root: Path, permute_test: bool) -> Path:
    """Digits as an ImageFolder tree (40 train and 20 test images per class); with
    ``permute_test`` every test image is filed under a shuffled label."""
    from PIL import Image

    from rd3core.data import load_dataset

    data = load_dataset("digits")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        part = getattr(data, split)
        labels = part.labels.numpy()
        keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(10)])
        filed = rng.permutation(labels[keep]) if split == "test" and permute_test else labels[keep]
        for i, (index, label) in enumerate(zip(keep, filed)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (part.images[index, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(np.stack([pixels] * 3, -1)).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_the_search_never_reads_the_test_split(tmp_path, monkeypatch):
    """Permuting the test labels changes the test accuracy of every cell but
    none of the search's draws, curves, prunings or its choice."""
    monkeypatch.setenv("RD3_CACHE", str(tmp_path / "cache"))
    runs = {}
    for permuted in (False, True):
        root = digits_tree(tmp_path / f"tree{int(permuted)}", permuted)
        path = write(tmp_path, study_text(name="blind", dataset=f"{{name: imagefolder, root: {root}, "
                                          f"heldout_per_class: 5}}", trials=5, grace=5,
                                          common={**COMMON, "epochs": 15, "batch_size": 25}), f"blind{int(permuted)}")
        out = tmp_path / f"out{int(permuted)}"
        proc = run_cli("run", str(path), "--out", str(out), "--num-cpus", "2", timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        trials = trial_rows(out / "rd3.sqlite")
        analysis = json.loads((out / "blind" / "analysis.json").read_text())
        runs[permuted] = {
            "trials": [(t["factors"]["trial"], t["factors"]["protocol.optim.lr"], t["epochs"], t["metrics"]["pruned"])
                       for t in trials],
            "chosen": analysis["tuning"]["searches"]["random_real"]["chosen"],
            "tuned": tuned_top1(out / "rd3.sqlite")}
    assert len(runs[False]["trials"]) == 5
    assert runs[True]["trials"] == runs[False]["trials"]
    assert runs[True]["chosen"] == runs[False]["chosen"]
    # The permutation is real: the chosen recipe's test accuracy collapses to chance.
    assert runs[False]["tuned"] > 0.6 and runs[True]["tuned"] < 0.3


@pytest.mark.slow
def test_an_hours_budget_is_spent_equally_and_a_rerun_draws_the_same_trials(tmp_path):
    path = write(tmp_path, study_text(name="hours", trials="null, cpu_hours: 0.0015", grace=5,
                                      common={**COMMON, "epochs": 10, "batch_size": 25}))
    out = tmp_path / "out"
    proc = run_cli("run", str(path), "--out", str(out), "--num-cpus", "2", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = trial_rows(out / "rd3.sqlite")
    hours = [t["metrics"]["cpu_hours"] for t in trials]
    assert len(trials) >= 2 and sum(hours) >= 0.0015 > sum(hours[:-1])  # stopped once the budget was reached
    analysis = json.loads((out / "hours" / "analysis.json").read_text())
    assert analysis["tuning"]["equal_budget"] and analysis["tuning"]["budget"]["kind"] == "cpu_hours"
    again = run_cli("run", str(path), "--out", str(out), "--num-cpus", "2", timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [ln for ln in again.stdout.splitlines() if "[random_real trial" in ln]
    assert len(lines) == len(trials) and all("replayed from the database" in ln for ln in lines)
    assert "0 to run" in again.stdout


@pytest.mark.slow
def test_a_tpe_search_resumes_from_the_database_with_the_same_trials(tmp_path):
    path = write(tmp_path, study_text(name="tpe", algorithm="tpe, startup: 2", trials=5, grace=5,
                                      common={**COMMON, "epochs": 10, "batch_size": 25}))
    out = tmp_path / "out"
    proc = run_cli("run", str(path), "--out", str(out), "--num-cpus", "2", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = trial_rows(out / "rd3.sqlite")
    assert len(first) == 5
    with sqlite3.connect(out / "rd3.sqlite") as con:  # the last trial lost, as if the driver died in it
        con.execute("DELETE FROM metric WHERE cell_id = ?", (first[-1]["id"],))
        con.execute("UPDATE cell SET status = 'running' WHERE id = ?", (first[-1]["id"],))
        con.execute("UPDATE attempt SET status = 'running', ended_at = NULL WHERE cell_id = ?", (first[-1]["id"],))
        config = json.loads(con.execute("SELECT config FROM cell WHERE id = ?", (first[0]["id"],)).fetchone()[0])
    assert config["trial"]["search"] == {"algorithm": "tpe", "seed": 1000, "startup": 2}
    again = run_cli("run", str(path), "--out", str(out), "--num-cpus", "2", timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = [ln for ln in again.stdout.splitlines() if "[random_real trial" in ln]
    assert sum("replayed from the database" in ln for ln in lines) == 4 and len(lines) == 5
    # TPE, told the same four results, draws the same fifth trial: the same cell, trained again.
    assert [t["cell_key"] for t in trial_rows(out / "rd3.sqlite")] == [t["cell_key"] for t in first]


@pytest.mark.slow
def test_a_search_stopped_by_ctrl_c_resumes_to_the_trials_of_an_uninterrupted_one(tmp_path):
    import signal

    from procs import finish, kill_all, descendants, rows, start_cli

    path = write(tmp_path, study_text(name="stop", trials=6, grace=5, common={**COMMON, "epochs": 40, "batch_size": 25}))
    out = tmp_path / "out"
    driver = start_cli("run", str(path), "--out", str(out), "--num-cpus", "2")
    seen = []
    try:
        while sum("[random_real trial" in ln for ln in seen) < 2:
            line = driver.stdout.readline()
            assert line, "".join(seen) + driver.stderr.read()
            seen.append(line)
        started = descendants(driver.pid)
        driver.send_signal(signal.SIGINT)  # during the third trial, or between two
        code, _, err = finish(driver, timeout=300)
    finally:
        kill_all(descendants(driver.pid) if driver.poll() is None else [])
    kill_all(started)
    assert code == 130 and "Traceback" not in err, err
    assert not rows(out / "rd3.sqlite", "SELECT id FROM attempt WHERE status = 'running'")
    again = run_cli("run", str(path), "--out", str(out), "--num-cpus", "2", timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    fresh = run_cli("run", str(path), "--out", str(tmp_path / "fresh"), "--num-cpus", "2", timeout=1200)
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    def trials(db):
        return [(t["factors"]["trial"], t["cell_key"], t["status"], t["epochs"], t["metrics"]["pruned"])
                for t in trial_rows(db)]

    assert len(trials(out / "rd3.sqlite")) == 6
    assert trials(out / "rd3.sqlite") == trials(tmp_path / "fresh" / "rd3.sqlite")
