"""Attribution on planted studies: results generated from effects of known size
plus seed noise, written through db.records into a real SQLite file; the
analysis must recover each share, give intervals that cover the planted
population shares at three seeds, handle unbalanced and missing cells, and
agree with statsmodels."""
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from analysis_planted import cell_id, centred, expected_shares, terms_of, true_shares, write_study
from conftest import run_cli
from db.session import make_engine
from orchestrator.analysis import attribution as at
from orchestrator.analysis.analyze import analyze
from orchestrator.analysis.design import load_design, make_design

METHODS = ["cda", "sre2l", "rded"]  # methods proper: baselines stay out of the ANOVA
FACTORS = {"method": METHODS, "protocol": ["native", "rd3"], "protocol.epochs": [50, 150]}
GROUP = {("method",): "method", ("protocol",): "protocol", ("protocol.epochs",): "protocol",
         ("method", "protocol"): "method_x_protocol", ("method", "protocol.epochs"): "method_x_protocol",
         ("protocol", "protocol.epochs"): "protocol", ("method", "protocol", "protocol.epochs"): "method_x_protocol",
         "residual": "residual"}
SEEDS = 40


def tolerance(true: float) -> float:
    """Per share: within 25% of its true value, never tighter than 0.01 (for terms
    planted at 0) nor looser than 0.04 (for the dominant ones). With SEEDS seeds
    every planted term has at least 1.7x the noise variance, so this is at least
    3.5 sampling standard deviations of each share (measured over 120 noise draws
    per scenario: the largest error was 0.75 of its tolerance); a share planted
    at 0.05 estimated as 0 or as 0.07 fails."""
    return max(0.01, min(0.25 * true, 0.04))


def planted(method, protocol, interaction, epochs):
    return {("method",): centred({(m,): v * method for m, v in zip(METHODS, [0, -1, 1])}),
            ("protocol",): {("native",): -protocol, ("rd3",): protocol},
            ("protocol.epochs",): {(50,): -epochs, (150,): epochs},
            ("method", "protocol"): {(m, p): interaction * s * (1 if p == "rd3" else -1)
                                     for m, s in zip(METHODS, [0, 1, -1]) for p in ("native", "rd3")}}


SCENARIOS = {  # name: (effects, noise sd); the smallest planted share is 0.05, two terms are planted at 0
    "protocol_dominates": (planted(0.02, 0.06, 0.02, 0.03), 0.01),  # .05 .70 .18 .05 | residual .02
    "method_dominates": (planted(0.06, 0.02, 0.025, 0.0), 0.015),  # .70 .12 0 .12 | .065
    "interaction_dominates": (planted(0.02, 0.0, 0.05, 0.02), 0.01),  # .11 0 .16 .68 | .04
}


def grouped(shares):
    out = {}
    for term, value in shares.items():
        out[GROUP[term]] = out.get(GROUP[term], 0.0) + value
    return out


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("noise_seed", [0, 1])
def test_planted_shares_are_recovered(scenario, noise_seed, tmp_path):
    """Every term's eta^2 against what it estimates (the planted share plus the
    df_t sigma^2 of noise any term soaks up, computed from the planted effects),
    and its omega^2 against the planted population share itself."""
    effects, sd = SCENARIOS[scenario]
    url = write_study(tmp_path / "r.sqlite", scenario, FACTORS, list(range(SEEDS)), effects, sd, rng_seed=noise_seed)
    result = analyze(make_engine(url), scenario)
    expected, population = expected_shares(effects, FACTORS, sd, SEEDS), true_shares(effects, FACTORS, sd)
    att = result["attribution"]
    assert att["anova_type"] == 2 and result["design"]["balanced"] and att["max_order"] == 3
    terms = {tuple(t["factors"]): t for t in att["terms"]}
    assert set(terms) == set(terms_of(FACTORS))
    for t in terms_of(FACTORS):
        assert terms[t]["eta2"] == pytest.approx(expected[t], abs=tolerance(expected[t])), (t, terms[t], expected)
        assert terms[t]["omega2"] == pytest.approx(population[t], abs=tolerance(population[t])), (t, terms[t])
    assert att["residual"]["share"] == pytest.approx(expected["residual"], abs=tolerance(expected["residual"]))

    shares, truth = result["shares"], grouped(expected)
    assert set(shares) == {"method", "protocol", "budget", "method_x_protocol", "budget_x", "residual"}
    assert shares["budget"] == shares["budget_x"] == 0.0 and att["empty_groups"] == ["budget", "budget_x", "other"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert att["residual_name"] == "seed noise"  # the full model: nothing pooled into the residual
    for key, value in truth.items():
        assert shares[key] == pytest.approx(value, abs=tolerance(value)), (key, shares, truth)
    assert att["shares_all"]["main:protocol.epochs"] == pytest.approx(
        expected[("protocol.epochs",)], abs=tolerance(expected[("protocol.epochs",)]))
    for key in shares:
        lo, hi = att["shares_ci"][key]
        assert lo - 1e-12 <= shares[key] <= hi + 1e-12


COVERAGE_SEEDS, REPLICATES = 3, 40


def in_memory_study(effects, sd, seeds, rng):
    """A planted study as results_frame / cells_frame tables (no database: many replicates)."""
    from analysis_planted import expand, planted_value

    rows = [{"cell_key": f"{combo}-{seed}", "seed": seed, **combo,
             "top1": planted_value(effects, combo) + rng.normal(0.0, sd)} for combo, seed in expand(FACTORS, seeds)]
    results = pd.DataFrame(rows)
    return make_design("cov", results, results.drop(columns="top1").assign(status="done"))


def test_share_intervals_cover_the_planted_shares_at_three_seeds():
    """At the 3 seeds studies use, the 95% intervals of the grouped shares cover the
    planted population shares (lambda_g / (lambda_model + N), what eta^2 and omega^2
    estimate) in at least 34 of 40 replicates each (P(<= 33 | 0.95) < 1.5%), while
    staying informative: the median width of the method share is at most twice a
    normal-theory interval (3.92 sampling sd, the sd measured as the spread of the
    estimate over the replicates). A constant interval such as [0, 1] covers but is
    too wide."""
    effects, sd = SCENARIOS["interaction_dominates"]
    population = true_shares(effects, FACTORS, sd)
    truth = {g: sum(v for t, v in population.items() if t != "residual" and GROUP[t] == g)
             for g in ("method", "protocol", "method_x_protocol")}
    truth["residual"] = population["residual"]
    covered = {g: 0 for g in truth}
    widths, estimates = [], []
    rng = np.random.default_rng(11)
    for _ in range(REPLICATES):
        att = at.attribute(in_memory_study(effects, sd, list(range(COVERAGE_SEEDS)), rng))
        for g, value in truth.items():
            lo, hi = att["shares_ci"][g]
            assert 0.0 <= lo <= att["shares_all"][g] <= hi <= 1.0
            covered[g] += lo <= value <= hi
        widths.append(att["shares_ci"]["method"][1] - att["shares_ci"]["method"][0])
        estimates.append(att["shares_all"]["method"])
    assert all(c >= 34 for c in covered.values()), (covered, truth)
    assert np.median(widths) <= 2 * 3.92 * float(np.std(estimates, ddof=1)), (widths, estimates)


def anova_by_hand(frame: pd.DataFrame, factors: list[str]):
    """Balanced full-factorial ANOVA from cell means: each term's effect by
    inclusion-exclusion over the marginal means of its factors' subsets."""
    y = frame["top1"].to_numpy(float)
    means = {(): np.full(len(y), y.mean())}
    for k in range(1, len(factors) + 1):
        for s in itertools.combinations(factors, k):
            means[s] = frame.groupby(list(s), observed=True)["top1"].transform("mean").to_numpy(float)
    ss, df = {}, {}
    for s in (s for s in means if s):
        effect = sum((-1) ** (len(s) - k) * means[sub] for k in range(len(s) + 1)
                     for sub in itertools.combinations(s, k))
        ss[s] = float(np.sum(effect ** 2))
        df[s] = int(np.prod([frame[f].nunique() - 1 for f in s]))
    rss = float(np.sum((y - means[tuple(factors)]) ** 2))
    df_resid = len(y) - int(np.prod([frame[f].nunique() for f in factors]))
    total = float(np.sum((y - y.mean()) ** 2))
    return ss, df, rss, df_resid, total


@pytest.mark.parametrize("scenario", ["method_dominates", "interaction_dominates"])
def test_effect_sizes_match_sums_of_squares_by_hand(scenario, tmp_path):
    """eta^2, partial eta^2 and omega^2 per term from sums of squares computed here
    without statsmodels or the closed form, on a balanced study with 3 seeds (few
    seeds, so null terms have visibly negative omega^2 and partial eta^2 differs
    from eta^2)."""
    effects, sd = SCENARIOS[scenario]
    url = write_study(tmp_path / "h.sqlite", scenario, FACTORS, [0, 1, 2], effects, sd, rng_seed=7)
    att = analyze(make_engine(url), scenario)["attribution"]
    frame = load_design(make_engine(url), scenario).frame
    ss, df, rss, df_resid, total = anova_by_hand(frame, list(FACTORS))
    assert sum(ss.values()) + rss == pytest.approx(total, rel=1e-9)  # balanced: the SS add up
    ms_resid = rss / df_resid
    terms = {tuple(t["factors"]): t for t in att["terms"]}
    assert set(terms) == set(ss)
    close = dict(rel=1e-7, abs=1e-12)
    for t, mine in terms.items():
        assert mine["df"] == df[t] and mine["ss"] == pytest.approx(ss[t], **close)
        assert mine["eta2"] == pytest.approx(ss[t] / total, **close)
        assert mine["partial_eta2"] == pytest.approx(ss[t] / (ss[t] + rss), **close), t
        assert mine["omega2"] == pytest.approx((ss[t] - df[t] * ms_resid) / (total + ms_resid), **close), t
    assert att["residual"]["df"] == df_resid and att["residual"]["ss"] == pytest.approx(rss, **close)
    assert att["residual"]["share"] == pytest.approx(rss / total, **close)
    assert att["ss_total"] == pytest.approx(total, **close)
    assert any(terms[t]["omega2"] < 0 for t in terms if t not in SCENARIOS[scenario][0])
    assert all(terms[t]["partial_eta2"] > terms[t]["eta2"] for t in terms)


def test_shares_follow_the_planted_dominant_source(tmp_path):
    """Guard against a grouping that is right only by accident: the largest share
    must move with the planted effect."""
    biggest = {}
    for name, (effects, sd) in SCENARIOS.items():
        url = write_study(tmp_path / f"{name}.sqlite", name, FACTORS, list(range(6)), effects, sd)
        shares = analyze(make_engine(url), name)["shares"]
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
def test_closed_form_model_matches_statsmodels(drop, typ):
    """The model fits through per-combination sufficient statistics; it must give
    statsmodels' sums of squares, degrees of freedom, F and p exactly."""
    results, cells = _frames(np.random.default_rng(3), drop)
    design = make_design("s", results, cells)
    order, _ = at.choose_model(design)
    terms = at.hierarchical_terms(design.factors, order)
    table = at.statsmodels_table(design, order, typ)
    model = at.Model(design, terms)
    sizes = at._Sizes(model, typ, 0.95)
    for t in terms:
        row = table.loc[at.term_name(t)]
        assert model.ss([t], typ) == pytest.approx(row["sum_sq"], rel=1e-8, abs=1e-12)
        assert model.df([t]) == row["df"]
        part = sizes.part([t])
        assert part["F"] == pytest.approx(row["F"], rel=1e-7) and part["p"] == pytest.approx(row["PR(>F)"], rel=1e-6)
    assert model.rss(terms) == pytest.approx(table.loc["Residual", "sum_sq"], rel=1e-8)
    assert model.df_resid == table.loc["Residual", "df"]
    if drop and len(drop) == 4:  # a whole combination is gone: the 3-way term is not estimable
        assert order == 2


def test_unbalanced_and_missing_cells_are_reported(tmp_path):
    effects, sd = SCENARIOS["protocol_dominates"]
    key = cell_id
    gone = {"method": "rded", "protocol": "rd3", "protocol.epochs": 150}
    failed = {key(gone, s) for s in range(4)} | {key({"method": "sre2l", "protocol": "native",
                                                      "protocol.epochs": 50}, 1)}
    pending = {key({"method": "cda", "protocol": "rd3", "protocol.epochs": 50}, 2)}
    url = write_study(tmp_path / "u.sqlite", "holes", FACTORS, list(range(4)), effects, sd, fail=failed, drop=pending)
    result = analyze(make_engine(url), "holes")
    design = result["design"]
    assert not design["balanced"] and design["combinations_missing"] == 1
    assert design["missing"] == [{k: str(v) for k, v in gone.items()}]
    att = result["attribution"]
    assert att["anova_type"] == 3
    assert att["max_order"] == 2 and any("order > 2" in n for n in att["notes"])
    not_analysed = result["cells"]["not_analysed"]
    assert sorted(c["status"] for c in not_analysed) == ["failed"] * 5 + ["pending"]
    assert result["cells"]["stored"] == 48 and result["cells"]["analysed"] == 42
    # Type III sums of squares do not add up: every share is still a fraction of the total, and a note says so.
    total = sum(result["shares"].values())
    assert total != pytest.approx(1.0, abs=1e-6) and att["ss_sum"] / att["ss_total"] == pytest.approx(total)
    assert any("do not sum to 1" in n for n in att["notes"])
    assert att["residual_name"] == "seed noise + interactions of order > 2 (pooled)"
    assert any("unbalanced" in h for h in result["headlines"])
    assert any("not analysed" in h for h in result["headlines"])


@pytest.mark.slow
def test_analyze_cli_json_and_table(tmp_path):
    effects, sd = SCENARIOS["method_dominates"]
    url = write_study(tmp_path / "c.sqlite", "cli", FACTORS, list(range(3)), effects, sd,
                      fail={cell_id({"method": "sre2l", "protocol": "rd3", "protocol.epochs": 50}, 0)})
    proc = run_cli("analyze", "cli", "--db", url, "--format", "json", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert set(result["shares"]) == {"method", "protocol", "budget", "method_x_protocol", "budget_x", "residual"}
    assert result["inference"]["correction"] == "Holm"
    assert {t["term"] for t in result["attribution"]["terms"]} >= {"method", "protocol", "method x protocol"}
    assert all({"eta2", "partial_eta2", "omega2", "eta2_ci"} <= set(t) for t in result["attribution"]["terms"])
    assert [c["status"] for c in result["cells"]["not_analysed"]] == ["failed"]
    assert (tmp_path / "cli" / "analysis.json").is_file()

    table = run_cli("analyze", "cli", "--db", url, "--correction", "bonferroni", "--out", str(tmp_path))
    assert table.returncode == 0, table.stderr
    for text in ("Variance shares", "ANOVA on final top-1", "Kendall tau", "Cells not analysed", "Headlines",
                 "p adjusted by Bonferroni"):
        assert text in table.stdout
    wrong = run_cli("analyze", "cli", "--db", url, "--correction", "tukey", "--out", str(tmp_path))
    assert wrong.returncode == 2 and "--correction" in wrong.stderr and "holm" in wrong.stderr

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
