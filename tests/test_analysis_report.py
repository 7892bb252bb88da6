"""The report's content: headline numbers come from the analysis, tables and
figures are present, provenance is read when the database has it and said to be
missing when not."""
import sqlite3

import numpy as np

from analysis_planted import centred, write_study
from db.session import make_engine
from orchestrator.analysis.analyze import analyze_design
from orchestrator.analysis.curves import plot_all
from orchestrator.analysis.design import load_design, seed_counts
from orchestrator.analysis.report import build_blocks, to_html, to_markdown, write_report

FACTORS = {"method": ["random_real", "sre2l", "rded"], "protocol": ["native", "rd3"]}
EFFECTS = {("method",): centred({("random_real",): 0.0, ("sre2l",): -0.04, ("rded",): 0.03}),
           ("method", "protocol"): {("sre2l", "rd3"): 0.06, ("rded", "rd3"): -0.02}}


def make(tmp_path, name="rep"):
    url = write_study(tmp_path / "r.sqlite", name, FACTORS, [0, 1, 2, 3], EFFECTS, 0.01)
    engine = make_engine(url)
    design = load_design(engine, name)
    return engine, design, analyze_design(design, draws=100)


def test_report_without_provenance_says_so(tmp_path):
    engine, design, result = make(tmp_path)
    figures = plot_all(design, result, None, seed_counts(design.seeds, 100, np.random.default_rng(0)), tmp_path)
    md_path, html_path = write_report(engine, result, figures, tmp_path / "out")
    md = md_path.read_text()
    share = 100 * result["shares"]["protocol"]
    assert f"explain {share:.1f}%" in md  # the headline carries the computed number
    assert "Not recorded" in md
    for title in ("Variance shares", "ANOVA on final top-1", "Method means per setting", "Kendall tau",
                  "native preset vs under one shared protocol"):
        assert title in md
    assert "# planted test study" in md  # the stored study text
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == sum(p.suffix == ".png" for p in figures)


def test_report_reads_a_provenance_table(tmp_path):
    engine, design, result = make(tmp_path, "prov")
    with sqlite3.connect(tmp_path / "r.sqlite") as con:
        con.execute("CREATE TABLE provenance (id INTEGER PRIMARY KEY, cell_id INTEGER REFERENCES cell(id), "
                    "git_commit TEXT, torch TEXT, gpu TEXT)")
        ids = [r[0] for r in con.execute("SELECT id FROM cell")]
        con.executemany("INSERT INTO provenance (cell_id, git_commit, torch, gpu) VALUES (?, ?, ?, ?)",
                        [(i, "abc1234", "2.14.1", "H200" if i % 2 else "none") for i in ids])
    blocks = build_blocks(engine, result, [])
    md = to_markdown(blocks)
    assert "abc1234" in md and "2.14.1" in md and "H200" in md
    assert "Not recorded" not in md
    assert "<table" in to_html(blocks, "t")
