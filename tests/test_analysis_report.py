"""The report's content: headline numbers come from the analysis, tables and
figures are present, provenance is read when the database has it and said to be
missing when not."""
from sqlalchemy import select

from analysis_planted import centred, write_study
from db import records
from db.models import Cell
from db.session import make_engine, session_scope
from orchestrator.analysis.analyze import analyze_design
from orchestrator.analysis.curves import plot_all
from orchestrator.analysis.design import load_design
from orchestrator.analysis.report import build_blocks, to_html, to_markdown, write_report

FACTORS = {"method": ["cda", "sre2l", "rded"], "protocol": ["native", "rd3"]}
EFFECTS = {("method",): centred({("cda",): 0.0, ("sre2l",): -0.04, ("rded",): 0.03}),
           ("method", "protocol"): {("sre2l", "rd3"): 0.06, ("rded", "rd3"): -0.02}}


def make(tmp_path, name="rep"):
    url = write_study(tmp_path / "r.sqlite", name, FACTORS, [0, 1, 2, 3], EFFECTS, 0.01)
    engine = make_engine(url)
    design = load_design(engine, name)
    return engine, design, analyze_design(design)


def test_report_without_provenance_says_so(tmp_path):
    engine, design, result = make(tmp_path)
    figures = plot_all(design, result, None, tmp_path)
    md_path, html_path = write_report(engine, result, figures, tmp_path / "out")
    md = md_path.read_text()
    share = 100 * result["shares"]["protocol"]
    FACTOR = "protocol"
    assert f"({FACTOR}) {share:.1f}%" in md  # the headline carries the computed number
    assert "Not recorded" in md
    for title in ("Variance shares", "ANOVA on final top-1", "Method means per setting", "Kendall tau",
                  "native preset vs under one shared protocol"):
        assert title in md
    assert "# planted test study" in md  # the stored study text
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == sum(p.suffix == ".png" for p in figures)


def test_report_reads_recorded_provenance(tmp_path):
    engine, design, result = make(tmp_path, "prov")
    with session_scope(engine) as s:
        ids = list(s.scalars(select(Cell.id)))
        for i in ids:
            attempt = records.start_attempt(s, i, host="node-1", device="cuda:0" if i % 2 else "cpu")
            records.record_provenance(s, attempt, git_commit="abc1234", torch="2.14.1",
                                      gpu="H200" if i % 2 else None, seed=0)
    blocks = build_blocks(engine, result, [])
    md = to_markdown(blocks)
    assert "abc1234" in md and "2.14.1" in md and "H200" in md
    assert "Not recorded" not in md
    assert "<table" in to_html(blocks, "t")
