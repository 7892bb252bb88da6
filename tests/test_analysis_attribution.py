"""Attribution on planted studies: results generated from effects of known size
plus seed noise, written through db.records into a real SQLite file; the
analysis must recover each share, handle unbalanced and missing cells, and
agree with statsmodels."""
import json

import numpy as np
import pandas as pd
import pytest

from analysis_planted import cell_id, centred, true_shares, write_study
from conftest import run_cli
from db.session import make_engine
from orchestrator.analysis import attribution as at
from orchestrator.analysis.analyze import analyze
from orchestrator.analysis.design import load_design, make_design

METHODS = ["random_real", "sre2l", "rded"]
FACTORS = {"method": METHODS, "protocol": ["native", "rd3"], "protocol.epochs": [50, 150]}
GROUP = {("method",): "method", ("protocol",): "protocol", ("protocol.epochs",): "protocol",
         ("method", "protocol"): "method_x_protocol", "residual": "residual"}
# Absolute tolerance on each share: with 10 seeds the largest error seen over
# 18 planted draws (3 scenarios x 6 noise seeds) was 0.025.
TOLERANCE = 0.04


def planted(method, protocol, interaction, epochs):
    return {("method",): centred({(m,): v * method for m, v in zip(METHODS, [0, -1, 1])}),
            ("protocol",): {("native",): -protocol, ("rd3",): protocol},
            ("protocol.epochs",): {(50,): -epochs, (150,): epochs},
            ("method", "protocol"): {(m, p): interaction * s * (1 if p == "rd3" else -1)
                                     for m, s in zip(METHODS, [0, 1, -1]) for p in ("native", "rd3")}}


SCENARIOS = {  # name: (effects, noise sd)
    "protocol_dominates": (planted(0.02, 0.06, 0.01, 0.03), 0.01),
    "method_dominates": (planted(0.06, 0.01, 0.02, 0.0), 0.015),
    "interaction_dominates": (planted(0.01, 0.0, 0.05, 0.02), 0.01),
}


def grouped(shares):
    out = {}
    for term, value in shares.items():
        out[GROUP[term]] = out.get(GROUP[term], 0.0) + value
    return out


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("noise_seed", [0, 1])
def test_planted_shares_are_recovered(scenario, noise_seed, tmp_path):
    effects, sd = SCENARIOS[scenario]
    url = write_study(tmp_path / "r.sqlite", scenario, FACTORS, list(range(10)), effects, sd, rng_seed=noise_seed)
    result = analyze(make_engine(url), scenario, draws=200)
    truth = grouped(true_shares(effects, FACTORS, sd))
    shares = result["shares"]
    assert set(shares) == {"method", "protocol", "method_x_protocol", "residual"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    for key, value in truth.items():
        assert shares[key] == pytest.approx(value, abs=TOLERANCE), (key, shares, truth)
    att = result["attribution"]
    assert att["anova_type"] == 2 and result["design"]["balanced"]
    # Each protocol factor on its own, and the bootstrap intervals bracket the estimates.
    epochs_truth = true_shares(effects, FACTORS, sd)[("protocol.epochs",)]
    assert att["shares_all"]["main:protocol.epochs"] == pytest.approx(epochs_truth, abs=TOLERANCE)
    for key in shares:
        lo, hi = att["shares_ci"][key]
        assert lo - 1e-12 <= shares[key] <= hi + 1e-12


def test_shares_follow_the_planted_dominant_source(tmp_path):
    """Guard against a grouping that is right only by accident: the largest share
    must move with the planted effect."""
    biggest = {}
    for name, (effects, sd) in SCENARIOS.items():
        url = write_study(tmp_path / f"{name}.sqlite", name, FACTORS, list(range(6)), effects, sd)
        shares = analyze(make_engine(url), name, draws=0)["shares"]
        biggest[name] = max(shares, key=shares.get)
    assert biggest == {"protocol_dominates": "protocol", "method_dominates": "method",
                       "interaction_dominates": "method_x_protocol"}


def _frames(rng, drop=()):
    rows, cells = [], []
    for m in ("a", "b", "c"):
        for p in ("x", "y"):
            for e in (1, 2, 3):
                for s in range(4):
                    key = f"{m}{p}{e}{s}"
                    cells.append({"cell_key": key, "seed": s, "status": "done", "method": m, "protocol": p,
                                  "protocol.e": e})
                    if key not in drop:
                        rows.append({**cells[-1], "top1": 0.5 + 0.05 * (m == "a") * (p == "y") + 0.01 * e
                                     + rng.normal(0, 0.02)})
    return pd.DataFrame(rows).drop(columns="status"), pd.DataFrame(cells)


@pytest.mark.parametrize("drop", [(), ("ax10", "bx21", "cy32"), ("ax10", "ax11", "ax12", "ax13")],
                         ids=["balanced", "unbalanced", "missing_combination"])
@pytest.mark.parametrize("typ", [2, 3])
def test_closed_form_bootstrap_model_matches_statsmodels(drop, typ):
    """The bootstrap refits through per-combination sufficient statistics; on
    the data itself it must give statsmodels' sums of squares exactly."""
    results, cells = _frames(np.random.default_rng(3), drop)
    design = make_design("s", results, cells)
    order, _ = at.choose_model(design)
    terms = at.hierarchical_terms(design.factors, order)
    table = at.statsmodels_table(design, order, typ)
    mine = at.Model(design, terms).sums_of_squares(np.ones(len(design.frame)), typ)
    for t in terms:
        assert mine["ss"][t] == pytest.approx(table.loc[at.term_name(t), "sum_sq"], rel=1e-8, abs=1e-12)
        assert mine["df"][t] == table.loc[at.term_name(t), "df"]
    assert mine["rss"] == pytest.approx(table.loc["Residual", "sum_sq"], rel=1e-8)
    assert mine["df_resid"] == table.loc["Residual", "df"]
    if drop and len(drop) == 4:  # a whole combination is gone: the 3-way term is not estimable
        assert order == 2


def test_unbalanced_and_missing_cells_are_reported(tmp_path):
    effects, sd = SCENARIOS["protocol_dominates"]
    key = cell_id
    gone = {"method": "rded", "protocol": "rd3", "protocol.epochs": 150}
    failed = {key(gone, s) for s in range(4)} | {key({"method": "sre2l", "protocol": "native",
                                                      "protocol.epochs": 50}, 1)}
    pending = {key({"method": "random_real", "protocol": "rd3", "protocol.epochs": 50}, 2)}
    url = write_study(tmp_path / "u.sqlite", "holes", FACTORS, list(range(4)), effects, sd, fail=failed, drop=pending)
    result = analyze(make_engine(url), "holes", draws=100)
    design = result["design"]
    assert not design["balanced"] and design["combinations_missing"] == 1
    assert design["missing"] == [{k: str(v) for k, v in gone.items()}]
    att = result["attribution"]
    assert att["anova_type"] == 3
    assert att["max_order"] == 2 and any("order > 2" in n for n in att["notes"])
    not_analysed = result["cells"]["not_analysed"]
    assert sorted(c["status"] for c in not_analysed) == ["failed"] * 5 + ["pending"]
    assert result["cells"]["stored"] == 48 and result["cells"]["analysed"] == 42
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert any("unbalanced" in h for h in result["headlines"])
    assert any("not analysed" in h for h in result["headlines"])


@pytest.mark.slow
def test_analyze_cli_json_and_table(tmp_path):
    effects, sd = SCENARIOS["method_dominates"]
    url = write_study(tmp_path / "c.sqlite", "cli", FACTORS, list(range(3)), effects, sd,
                      fail={cell_id({"method": "sre2l", "protocol": "rd3", "protocol.epochs": 50}, 0)})
    proc = run_cli("analyze", "cli", "--db", url, "--format", "json", "--bootstrap", "100", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert set(result["shares"]) == {"method", "protocol", "method_x_protocol", "residual"}
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert {t["term"] for t in result["attribution"]["terms"]} >= {"method", "protocol", "method x protocol"}
    assert all({"eta2", "partial_eta2", "omega2", "eta2_ci"} <= set(t) for t in result["attribution"]["terms"])
    assert [c["status"] for c in result["cells"]["not_analysed"]] == ["failed"]
    assert (tmp_path / "cli" / "analysis.json").is_file()

    table = run_cli("analyze", "cli", "--db", url, "--bootstrap", "50", "--out", str(tmp_path))
    assert table.returncode == 0, table.stderr
    for text in ("Variance shares", "ANOVA on final top-1", "Kendall tau", "Cells not analysed", "Headlines"):
        assert text in table.stdout

    bad = run_cli("analyze", "nosuch", "--db", url)
    assert bad.returncode == 2 and "nosuch" in bad.stderr and "cli" in bad.stderr and "Traceback" not in bad.stderr
    missing = tmp_path / "absent.sqlite"
    proc = run_cli("analyze", "cli", "--db", f"sqlite:///{missing}")
    assert proc.returncode == 2 and "no results database" in proc.stderr and not missing.exists()


def test_aliased_factor_is_left_out_and_said(tmp_path):
    """Under native-vs-unified, `preset` is fixed by method x protocol: it must not
    make the model singular, and the output says why it was left out."""
    rows, cells = [], []
    rng = np.random.default_rng(0)
    for m in ("sre2l", "rded"):
        for p in ("native", "rd3"):
            for s in range(3):
                preset = m if p == "native" else "rd3"
                cells.append({"cell_key": f"{m}{p}{s}", "seed": s, "status": "done", "method": m, "protocol": p,
                              "preset": preset})
                rows.append({**cells[-1], "top1": 0.4 + rng.normal(0, 0.01)})
    design = make_design("alias", pd.DataFrame(rows).drop(columns="status"), pd.DataFrame(cells))
    assert design.factors == ["method", "protocol"]
    assert "determined by" in design.dropped["preset"]


def test_design_levels_follow_study_order_not_hash_order(tmp_path):
    effects, sd = SCENARIOS["method_dominates"]
    url = write_study(tmp_path / "o.sqlite", "order", FACTORS, [0, 1], effects, sd)
    design = load_design(make_engine(url), "order")
    assert design.levels["method"] == METHODS
    assert design.levels["protocol.epochs"] == ["50", "150"]
