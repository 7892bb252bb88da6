"""Plots and the report: a real small study run through the CLI (digits, local
executor), then `plot` and `report`; and every figure kind on a planted
multi-method study (rank bump chart and costs need several methods)."""
import base64
import json
import re

import numpy as np
import pytest
from matplotlib.image import imread

from analysis_planted import cell_id, centred, write_study
from conftest import run_cli
from db.queries import epoch_frame
from db.session import make_engine
from orchestrator.analysis.analyze import analyze_design
from orchestrator.analysis.curves import plot_all
from orchestrator.analysis.design import load_design

SMALL_STUDY = """\
name: small
dataset: {name: digits}
teachers:
  - arch: convnet3-w16
    epochs: 4
    augment: {crop: pad, padding: 2, flip: false, mix: none}
methods:
  - {name: random_real, ipc: 5}
protocol:
  preset: rd3
  overrides:
    student: convnet3-w16
    epochs: 20
    augment: {flip: false}
    loss: {temperature: 4}
    eval: {interval: 5}
factors:
  protocol.labels.mode: [hard, epochwise]
  method.ipc: [2, 5]
seeds: [0, 1]
"""


def assert_figure(path_png):
    image = imread(path_png)
    assert image.shape[0] > 250 and image.shape[1] > 400, image.shape
    assert float(np.std(image[..., :3])) > 0.02  # not blank
    pdf = path_png.with_suffix(".pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000


@pytest.mark.slow
def test_real_study_run_plot_report(tmp_path):
    study = tmp_path / "small.yaml"
    study.write_text(SMALL_STUDY)
    out = tmp_path / "out"
    proc = run_cli("run", str(study), "--out", str(out), "--executor", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # `run` still ends with the mean/std tables and at least one plot, now with the attribution.
    assert "mean" in proc.stdout and "std" in proc.stdout and "protocol.labels.mode" in proc.stdout
    assert "Of the variance in final top-1" in proc.stdout
    folder = out / "small"
    assert_figure(folder / "main_effects.png")
    assert json.loads((folder / "analysis.json").read_text())["shares"]

    plot = run_cli("plot", str(study), "--out", str(out))
    assert plot.returncode == 0, plot.stderr
    for name in ("main_effects", "interactions", "variance_shares", "learning_curves", "accuracy_vs_cost"):
        assert f"{name}.png" in plot.stdout
        assert_figure(folder / f"{name}.png")
    assert not (folder / "rank_bump.png").exists()  # one method: no ranking to draw

    report = run_cli("report", "small", "--out", str(out))
    assert report.returncode == 0, report.stderr
    md = (folder / "report.md").read_text()
    page = (folder / "report.html").read_text()
    assert "protocol factors (protocol.labels.mode)" in md and "budget factors (method.ipc)" in md
    assert "protocol.labels.mode: [hard, epochwise]" in md  # the study definition, from the DB
    assert "## Provenance" in md and "Recorded with each attempt" in md and "git_commit" in md
    assert "(variance_shares.png)" in md
    # Self-contained: every image is inline, none is fetched from a path or URL.
    sources = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table" in page and "Headlines" in page


def test_every_figure_on_a_planted_multi_method_study(tmp_path):
    methods = ["cda", "sre2l", "rded"]
    factors = {"method": methods, "protocol": ["native", "rd3"], "protocol.labels.mode": ["hard", "epochwise"]}
    effects = {("method",): centred({("cda",): 0.0, ("sre2l",): -0.03, ("rded",): 0.04}),
               ("method", "protocol"): {(m, "rd3"): d for m, d in zip(methods, [0.0, 0.05, -0.03])}}

    def costs(combo, seed):
        return {"synth_wall_s": {"cda": 0.1, "sre2l": 500.0, "rded": 30.0}[combo["method"]] + seed,
                "time_train_s": 60.0 + seed}

    url = write_study(tmp_path / "p.sqlite", "multi", factors, [0, 1, 2], effects, 0.01, metrics=costs, epochs=10,
                      fail={cell_id({"method": "rded", "protocol": "rd3", "protocol.labels.mode": "hard"}, 1)})
    engine = make_engine(url)
    design = load_design(engine, "multi")
    result = analyze_design(design)
    paths = plot_all(design, result, epoch_frame(engine, "multi"), tmp_path / "figs")
    names = {p.stem for p in paths if p.suffix == ".png"}
    assert names == {"main_effects", "interactions", "variance_shares", "rank_bump", "learning_curves",
                     "accuracy_vs_cost"}
    for p in paths:
        if p.suffix == ".png":
            assert_figure(p)
