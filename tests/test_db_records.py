"""Writes (db.records) and reads (db.queries) on SQLite and PostgreSQL:
typed factors, attempts, provenance, artifacts, metric naming, results_frame."""
import math

import pandas as pd
import pytest
from sqlalchemy import func, select

from db import records
from db.models import (Artifact, ArtifactUse, Attempt, AttemptStatus, Cell, CellFactor, EpochMetric, Metric,
                       Provenance)
from db.queries import (QueryError, attempts_frame, cell_status, list_studies, metrics_frame, results_frame,
                        status_counts, studies_frame)
from db.session import session_scope
from db_helpers import cell_dicts, epochs, finish_cell, make_study

GRID = {"method": ["sre2l", "rded"], "protocol.epochs": [50, 300], "protocol.optim.lr": [0.1, 1],
        "protocol.ema": [True, False]}


def test_sync_cells_is_idempotent_and_stores_typed_factors(db_engine):
    cells = cell_dicts({"a": [1], "b": [0.5], "c": ["x"], "d": [False], "e": [None], "f": [[1, "two"]],
                        "big": [2 ** 70]}, seeds=[3])
    ids = make_study(db_engine, "typed", cells)
    assert make_study(db_engine, "typed", cells) == ids  # a rerun inserts nothing
    with session_scope(db_engine) as s:
        rows = {f.name: f for f in s.scalars(select(CellFactor))}
        assert s.scalar(select(func.count()).select_from(Cell)) == 1
    assert {n: r.kind.value for n, r in rows.items()} == {"a": "int", "b": "float", "c": "str", "d": "bool",
                                                           "e": "null", "f": "json", "big": "json"}
    assert (rows["a"].value_int, rows["b"].value_float, rows["c"].value_str, rows["d"].value_bool) == (
        1, 0.5, "x", False)
    assert rows["a"].value_float is None and rows["d"].value_int is None  # one value column per kind


def test_sync_cells_gives_stored_cells_the_labels_the_study_now_names(db_engine):
    """A study that gains a factor column (e.g. native_vs_unified's `recipe`) keeps
    its stored cells and their results, with the new labels, typed, on each."""
    cells = cell_dicts({"method": ["rded", "sre2l"]}, seeds=[0])
    ids = make_study(db_engine, "relabel", cells)
    finish_cell(db_engine, ids[cells[0]["cell_key"]], 0.61)
    again = [{**c, "factors": {**c["factors"], "recipe": c["factors"]["method"], "epochs": 3}} for c in cells]
    assert make_study(db_engine, "relabel", again) == ids  # same cells, nothing inserted
    frame = results_frame(db_engine, "relabel")
    assert frame[["method", "recipe", "epochs", "top1"]].to_dict("records") == [
        {"method": "rded", "recipe": "rded", "epochs": 3, "top1": 0.61}]
    with session_scope(db_engine) as s:
        assert s.scalar(select(func.count()).select_from(CellFactor)) == 2 * 3
        assert {tuple(sorted(f)) for f in s.scalars(select(Cell.factors))} == {("epochs", "method", "recipe")}


def test_results_frame_has_typed_factor_columns_and_metrics(db_engine):
    ids = make_study(db_engine, "grid", cell_dicts(GRID, seeds=[0, 1]))
    for i, cell_id in enumerate(sorted(ids.values())):
        finish_cell(db_engine, cell_id, 0.5 + i / 100, final_loss=1.0 + i)
    frame = results_frame(db_engine, "grid")
    assert len(frame) == 32 and frame.cell_key.is_unique
    assert list(frame.columns[:7]) == ["cell_key", "seed", *GRID, "top1"]  # study order, then top1 first
    assert frame["seed"].dtype == "int64"
    assert frame["protocol.epochs"].dtype == "int64"
    assert frame["protocol.optim.lr"].dtype == "float64"  # levels 0.1 and 1 (an int): one float column
    assert frame["protocol.ema"].dtype == bool
    assert pd.api.types.is_string_dtype(frame["method"])
    assert sorted(frame["protocol.optim.lr"].unique()) == [0.1, 1.0]
    assert frame.top1.between(0.5, 0.82).all() and (frame.final_loss >= 1).all()
    # Values line up with their cells.
    with session_scope(db_engine) as s:
        truth = dict(s.execute(select(Cell.cell_key, Metric.value).join(Metric).where(Metric.name == "top1")).all())
    assert dict(zip(frame.cell_key, frame.top1)) == truth
    # The historical positional call still works; unknown study: empty frame.
    pd.testing.assert_frame_equal(results_frame(db_engine, "grid"), frame)
    assert results_frame(db_engine, "nope").empty


def test_results_frame_where_filters_typed_levels(db_engine):
    ids = make_study(db_engine, "grid", cell_dicts(GRID, seeds=[0, 1]))
    for cell_id in ids.values():
        finish_cell(db_engine, cell_id, 0.6)
    assert len(results_frame(db_engine, "grid", where={"protocol.epochs": 50})) == 16
    assert len(results_frame(db_engine, "grid", where={"protocol.epochs": "50"})) == 16  # text typed by the factor
    assert len(results_frame(db_engine, "grid", where={"protocol.ema": "false", "method": "rded"})) == 8
    assert len(results_frame(db_engine, "grid", where={"protocol.optim.lr": ["1", 0.1], "seed": 1})) == 16
    with pytest.raises(QueryError, match="not a factor.*protocol.epochs"):
        results_frame(db_engine, "grid", where={"epochs": 50})
    with pytest.raises(QueryError, match="levels: 50, 300"):
        results_frame(db_engine, "grid", where={"protocol.epochs": 51})
    with pytest.raises(QueryError, match="holds an integer, not .fifty"):
        results_frame(db_engine, "grid", where={"protocol.epochs": "fifty"})


def test_results_frame_keeps_only_finished_cells_of_its_study(db_engine):
    cells_a = cell_dicts({"x": [1, 2, 3]}, seeds=[0])
    a = make_study(db_engine, "a", cells_a)
    b = make_study(db_engine, "b", cell_dicts({"x": [1, 2, 3], "y": ["q"]}, seeds=[0]))
    cell_4 = cell_dicts({"x": [4]}, seeds=[0])
    a = make_study(db_engine, "a", cells_a + cell_4)  # added after study b: the ids interleave
    finished = [a[c["cell_key"]] for c in cells_a + cell_4 if c["factors"]["x"] != 3]
    for cell_id in finished + list(b.values()):
        finish_cell(db_engine, cell_id, 0.7)
    frame = results_frame(db_engine, "a")
    assert sorted(frame["x"]) == [1, 2, 4] and "y" not in frame
    assert len(results_frame(db_engine, "b")) == 3
    assert list_studies(db_engine) == ["a", "b"]
    counts = studies_frame(db_engine).set_index("study")
    assert counts.loc["a", "done"] == 3 and counts.loc["a", "pending"] == 1 and counts.loc["b", "done"] == 3


def test_a_factor_some_cells_lack_keeps_its_type(db_engine):
    cells = cell_dicts({"x": [1, 2]}, seeds=[0]) + cell_dicts({"x": [3], "only_some": [7]}, seeds=[0])
    ids = make_study(db_engine, "ragged", cells)
    for cell_id in ids.values():
        finish_cell(db_engine, cell_id, 0.5)
    frame = results_frame(db_engine, "ragged")
    assert str(frame["only_some"].dtype) == "Int64" and frame["only_some"].isna().sum() == 2
    assert frame["x"].dtype == "int64"


def test_attempt_lifecycle_and_cell_status(db_engine):
    ids = make_study(db_engine, "life", cell_dicts({"x": [1, 2]}, seeds=[0]))
    first, second = sorted(ids.values())
    with session_scope(db_engine) as s:
        attempt = records.start_attempt(s, first)
    assert status_counts(db_engine, "life") == {"pending": 1, "running": 1, "done": 0, "failed": 0}
    with session_scope(db_engine) as s:
        records.finish_attempt(s, attempt, AttemptStatus.failed, error_type="RuntimeError",
                               error_message="boom", traceback="Traceback ...\nRuntimeError: boom",
                               host="node7", device="cuda:0")
    again = finish_cell(db_engine, first, 0.9)
    with session_scope(db_engine) as s:
        rows = list(s.scalars(select(Attempt).where(Attempt.cell_id == first).order_by(Attempt.number)))
        assert [(a.number, a.status) for a in rows] == [(1, AttemptStatus.failed), (2, AttemptStatus.done)]
        assert rows[0].error_type == "RuntimeError" and "boom" in rows[0].traceback
        assert rows[0].host == "node7" and rows[0].device == "cuda:0"
        assert rows[0].ended_at >= rows[0].started_at and rows[1].id == again
        assert rows[1].error_type is None and rows[1].heartbeat_at == rows[1].ended_at
        metric_attempts = set(s.scalars(select(Metric.attempt_id).where(Metric.cell_id == first)))
    assert metric_attempts == {again}
    assert cell_status(db_engine, "life") == {k: v for k, v in zip(
        sorted(ids, key=ids.get), ["done", "pending"])}
    latest = attempts_frame(db_engine, "life")
    assert latest.number.tolist() == [2] and latest.status.tolist() == ["done"]
    assert len(attempts_frame(db_engine, "life", latest_only=False)) == 2
    with pytest.raises(ValueError, match="done or failed"):
        with session_scope(db_engine) as s:
            records.finish_attempt(s, again, AttemptStatus.running)


def test_abandoned_attempts_are_marked_failed(db_engine):
    ids = make_study(db_engine, "crash", cell_dicts({"x": [1, 2]}, seeds=[0]))
    with session_scope(db_engine) as s:
        for cell_id in ids.values():
            records.start_attempt(s, cell_id)
        study_id = s.scalar(select(Cell.study_id))
    with session_scope(db_engine) as s:
        assert records.abandon_attempts(s, study_id, "driver gone") == 2
    with session_scope(db_engine) as s:
        assert {(a.status, a.error_type) for a in s.scalars(select(Attempt))} == {
            (AttemptStatus.failed, "DriverStopped")}
    assert status_counts(db_engine, "crash")["failed"] == 2


def test_provenance_and_artifacts(db_engine):
    ids = make_study(db_engine, "prov", cell_dicts({"x": [1]}, seeds=[5]))
    cell_id = next(iter(ids.values()))
    with session_scope(db_engine) as s:
        attempt = records.start_attempt(s, cell_id)
        records.record_provenance(s, attempt, git_commit="a" * 40, git_dirty=True, torch="2.14.1", seed=5,
                                  dataset_fingerprint="fp", gpu=None, env={"host": "h", "nan": math.nan})
        teacher = records.record_artifact(s, "teacher", "k1", "/store/teacher/k1", 123, "f" * 64, {"arch": "r18"})
        synth = records.record_artifact(s, "synth", "k2", "/store/synth/k2", 2 ** 40, "e" * 64, {"ipc": 10})
        assert records.record_artifact(s, "teacher", "k1", "/store/teacher/k1", 123, "f" * 64, {}) == teacher
        records.use_artifacts(s, attempt, [teacher, synth, teacher])
    with session_scope(db_engine) as s:
        prov = s.get(Provenance, attempt)
        assert (prov.git_commit, prov.git_dirty, prov.torch, prov.seed, prov.dataset_fingerprint) == (
            "a" * 40, True, "2.14.1", 5, "fp")
        assert prov.gpu is None and prov.env["host"] == "h" and math.isnan(prov.env["nan"])
        assert s.scalar(select(func.count()).select_from(Artifact)) == 2
        assert s.get(Artifact, synth).bytes == 2 ** 40
        assert {u.artifact_id for u in s.scalars(select(ArtifactUse))} == {teacher, synth}
    with pytest.raises(ValueError, match="unknown provenance fields.*'branch'"):
        with session_scope(db_engine) as s:
            records.record_provenance(s, attempt, branch="main")


def test_a_rerun_replaces_metrics_never_duplicates(db_engine):
    ids = make_study(db_engine, "rerun", cell_dicts({"x": [1]}, seeds=[0]))
    cell_id = next(iter(ids.values()))
    finish_cell(db_engine, cell_id, 0.5, n_epochs=5, old_only=1.0)
    finish_cell(db_engine, cell_id, 0.6, n_epochs=3)
    long = metrics_frame(db_engine, "rerun")
    assert sorted(long.name) == ["top1"] and long.value.tolist() == [0.6] and long.attempt.tolist() == [2]


def test_results_frame_metrics_are_the_metric_rows(db_engine):
    """results_frame reads the packed copy on each cell row: it must say what
    the metric rows say, whatever the cells reported (sets of names that
    differ, NaN, infinities, a rerun that drops a metric, a bulk import)."""
    ids = sorted(make_study(db_engine, "packed", cell_dicts({"x": [1, 2, 3, 4]}, seeds=[0])).values())
    finish_cell(db_engine, ids[0], 0.5, final_loss=math.nan, dropped=1.0)
    finish_cell(db_engine, ids[0], 0.51, final_loss=math.nan)  # the rerun no longer reports 'dropped'
    finish_cell(db_engine, ids[1], 0.25, final_loss=math.inf, only_here=-math.inf)
    finish_cell(db_engine, ids[2], 1 / 3)
    with db_engine.begin() as tx:
        records.import_results(tx, [{"cell_id": ids[3], "metrics": {"top1": 0.125, "final_loss": 2.5},
                                     "epochs": []}])
    frame = results_frame(db_engine, "packed").set_index("cell_key")
    long = metrics_frame(db_engine, "packed").pivot(index="cell_key", columns="name", values="value")
    assert sorted(frame.columns.drop(["seed", "x"])) == sorted(long.columns) == ["final_loss", "only_here", "top1"]
    pd.testing.assert_frame_equal(frame[long.columns].sort_index(), long.sort_index(), check_names=False)
    assert frame.final_loss.isna().sum() == 2 and frame.only_here.tolist().count(-math.inf) == 1


@pytest.mark.parametrize("name,ok", [("top1", True), ("top1_best_on_test", True), ("top1_heldout_selected", True),
                                     ("heldout_selected_epoch", True), ("time_peak_memory_bytes", True),
                                     ("top1_best", False), ("max_acc", False), ("top5_selected", False)])
def test_selected_accuracies_must_name_their_split(name, ok):
    if ok:
        assert records.check_metric_name(name) == name
    else:
        with pytest.raises(ValueError, match="selection split"):
            records.check_metric_name(name)


def test_bulk_import_stores_what_the_per_result_path_stores(db_engine):
    cells = cell_dicts({"x": [1, 2, 3]}, seeds=[0])
    ids = make_study(db_engine, "bulk", cells)
    by_x = {c["factors"]["x"]: ids[c["cell_key"]] for c in cells}
    finish_cell(db_engine, by_x[1], 0.1)  # an earlier result: replaced, attempt numbered after it
    batch = [{"cell_id": by_x[x], "metrics": {"top1": x / 10, "odd": math.nan}, "epochs": epochs(4, x / 10),
              "host": "importer", "provenance": {"git_commit": "c" * 40, "seed": 0}} for x in (1, 2, 3)]
    with db_engine.begin() as tx:
        attempt_ids = records.import_results(tx, batch)
    frame = results_frame(db_engine, "bulk")
    assert sorted(frame.top1) == [0.1, 0.2, 0.3] and frame.odd.isna().all()
    long = metrics_frame(db_engine, "bulk")
    assert sorted(long[long.name == "top1"].attempt) == [1, 1, 2]
    with session_scope(db_engine) as s:
        attempts = [s.get(Attempt, a) for a in attempt_ids]
        assert all(a.status == AttemptStatus.done and a.host == "importer" for a in attempts)
        assert {s.get(Provenance, a).git_commit for a in attempt_ids} == {"c" * 40}
        assert all(m.is_nan for m in s.scalars(select(Metric).where(Metric.name == "odd")))
        assert s.scalar(select(func.count()).select_from(EpochMetric)) == 12
    assert status_counts(db_engine, "bulk")["done"] == 3
    with pytest.raises(ValueError, match="twice"):
        with db_engine.begin() as tx:
            records.import_results(tx, batch[:1] * 2)


def test_epoch_rows_of_a_running_cell_are_written_as_they_arrive_and_never_duplicated(db_engine):
    from db.queries import epoch_frame

    ids = make_study(db_engine, "live", cell_dicts({"x": [1]}, seeds=[0]))
    cell_id = next(iter(ids.values()))
    key = next(iter(ids))

    def stored():
        """(epoch, loss, attempt) of the cell's rows, as epoch_frame and the table hold them."""
        frame = epoch_frame(db_engine, "live", unfinished=True)
        with session_scope(db_engine) as s:
            owners = s.scalars(select(EpochMetric.attempt_id).where(EpochMetric.cell_id == cell_id)
                               .order_by(EpochMetric.epoch)).all()
        return list(zip(frame.epoch.tolist(), frame.loss.tolist(), owners))

    def attempt():
        with session_scope(db_engine) as s:
            return records.start_attempt(s, cell_id)

    def write(attempt_id, rows):
        with session_scope(db_engine) as s:
            records.record_epochs(s, cell_id, attempt_id, rows)

    def fail(attempt_id):
        with session_scope(db_engine) as s:
            records.finish_attempt(s, attempt_id, AttemptStatus.failed, error_type="WorkerLost")

    first = attempt()
    write(first, epochs(3))
    assert [e for e, _, _ in stored()] == [1, 2, 3]
    assert epoch_frame(db_engine, "live").empty  # the default reads finished cells only
    write(first, [{**row, "loss": 9.0} for row in epochs(5)[1:]])  # epochs sent again, and new ones
    assert [(e, loss) for e, loss, _ in stored()] == [(1, 2.0), (2, 9.0), (3, 9.0), (4, 9.0), (5, 9.0)]
    fail(first)  # the attempt crashes: what it measured stays
    assert len(stored()) == 5
    resumed = attempt()  # resumed from a checkpoint after epoch 3: the epochs before it stay
    write(resumed, epochs(6)[3:])
    assert [(e, a) for e, _, a in stored()] == [(1, first), (2, first), (3, first), (4, resumed), (5, resumed),
                                               (6, resumed)]
    fail(resumed)
    fresh = attempt()  # a rerun from scratch: its first rows replace the earlier curve
    write(fresh, epochs(2))
    assert stored() == [(1, 2.0, fresh), (2, 1.0, fresh)]
    with session_scope(db_engine) as s:  # the result at the end: the full history, each epoch once
        records.record_result(s, cell_id, {"top1": 0.5}, epochs(6), attempt_id=fresh)
        records.finish_attempt(s, fresh, AttemptStatus.done)
    assert [(e, a) for e, _, a in stored()] == [(e, fresh) for e in range(1, 7)]
    assert epoch_frame(db_engine, "live").cell_key.tolist() == [key] * 6
