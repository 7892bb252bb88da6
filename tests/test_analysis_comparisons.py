"""Method comparisons and DD-Ranking metrics on planted studies: a planted
method x protocol crossover must show up as real ranking flips and a negative
Kendall tau; without it, rankings agree; paired tests, spreads, recipe-matched
baselines and DD-Ranking metrics equal the values computed by hand (scipy) from
the stored results; planted nulls are called significant at their nominal rate."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis_planted import centred, write_study
from db.queries import results_frame
from db.session import make_engine
from orchestrator.analysis.analyze import analyze
from orchestrator.analysis.comparisons import compare, spread_interval
from orchestrator.analysis.design import make_design
from orchestrator.analysis.inference import sign_flip_p

METHODS = ["sre2l", "cda", "rded", "edc"]
FACTORS = {"method": METHODS, "protocol": ["native", "rd3"], "protocol.batch_size": [50, 100]}
QUALITY = dict(zip(METHODS, [-0.06, -0.02, 0.02, 0.06]))


def effects(crossover: bool):
    """Under native presets the methods are ordered sre2l < cda < rded < edc; with
    the crossover, the shared protocol reverses that order."""
    inter = {(m, p): (-q if p == "rd3" else 0.0) * 2 * crossover for m, q in QUALITY.items()
             for p in ("native", "rd3")}
    return {("method",): centred({(m,): q for m, q in QUALITY.items()}),
            ("protocol",): {("native",): -0.05, ("rd3",): 0.05},
            ("protocol.batch_size",): {(50,): 0.01, (100,): -0.01},
            ("method", "protocol"): inter}


def test_planted_crossover_gives_flips_and_negative_tau(tmp_path):
    url = write_study(tmp_path / "x.sqlite", "cross", FACTORS, list(range(6)), effects(True), 0.005)
    result = analyze(make_engine(url), "cross")
    comp = result["comparisons"]
    by_setting = {s["setting"]: s for s in comp["settings"]}
    native = by_setting["protocol=native, protocol.batch_size=50"]
    shared = by_setting["protocol=rd3, protocol.batch_size=50"]
    assert [m for m, _ in sorted(native["ranks"].items(), key=lambda kv: kv[1])] == METHODS[::-1]
    assert [m for m, _ in sorted(shared["ranks"].items(), key=lambda kv: kv[1])] == METHODS
    taus = {(k["a"], k["b"]): k for k in comp["kendall"]}
    across = taus["protocol=native, protocol.batch_size=50", "protocol=rd3, protocol.batch_size=50"]
    assert across["tau"] == pytest.approx(-1.0) and across["flips"] == across["significant_flips"] == 6
    within = taus["protocol=native, protocol.batch_size=50", "protocol=native, protocol.batch_size=100"]
    assert within["tau"] == pytest.approx(1.0) and within["flips"] == 0
    flips = [f for f in comp["flips"] if f["settings"] == [native["setting"], shared["setting"]]]
    assert {(f["a"], f["b"]) for f in flips} == set(itertools.combinations(METHODS, 2))
    assert all(f["significant"] for f in flips)
    assert result["shares"]["method_x_protocol"] > 0.3
    assert any("flips" in h for h in result["headlines"])


def test_without_interaction_rankings_agree(tmp_path):
    url = write_study(tmp_path / "n.sqlite", "nocross", FACTORS, list(range(6)), effects(False), 0.005)
    result = analyze(make_engine(url), "nocross")
    comp = result["comparisons"]
    assert all(k["tau"] == pytest.approx(1.0) for k in comp["kendall"])
    assert comp["flips"] == []
    assert result["shares"]["method_x_protocol"] < 0.02


def test_paired_differences_and_spread_match_hand_computation(tmp_path):
    url = write_study(tmp_path / "p.sqlite", "paired", FACTORS, list(range(5)), effects(True), 0.01, rng_seed=4)
    engine = make_engine(url)
    result = analyze(engine, "paired")
    frame = results_frame(engine, "paired")
    cell = frame[(frame["protocol"] == "rd3") & (frame["protocol.batch_size"] == 100)]
    a = cell[cell["method"] == "sre2l"].set_index("seed")["top1"]
    b = cell[cell["method"] == "edc"].set_index("seed")["top1"]
    paired = next(p for p in result["comparisons"]["paired"]
                  if p["setting"] == "protocol=rd3, protocol.batch_size=100" and (p["a"], p["b"]) == ("sre2l", "edc"))
    d = (a - b).to_numpy()
    test = stats.ttest_1samp(d, 0.0)
    assert paired["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert paired["ci"] == pytest.approx(list(test.confidence_interval(0.95)), abs=1e-12)
    assert paired["p_t"] == pytest.approx(test.pvalue, rel=1e-9)
    assert paired["p_sign_flip"] == pytest.approx(2 / 32) and paired["min_p_sign_flip"] == pytest.approx(2 / 32)
    pvalues = [p["p_t"] for p in result["comparisons"]["paired"]]
    holm = dict(zip(pvalues, __import__("statsmodels.stats.multitest", fromlist=["x"]).multipletests(
        pvalues, method="holm")[1]))
    assert paired["p_adjusted"] == pytest.approx(holm[paired["p_t"]]) and paired["significant"]
    assert paired["family"] == len(pvalues) == 4 * 6
    means = cell.groupby("method")["top1"].mean()
    spread = next(s for s in result["comparisons"]["spread"] if s["setting"] == paired["setting"])
    assert spread["spread"] == pytest.approx(means.max() - means.min(), abs=1e-12)
    assert (spread["best"], spread["worst"]) == (means.idxmax(), means.idxmin())
    assert spread["ci"][0] <= spread["spread"] <= spread["ci"][1]
    native = frame[(frame["protocol"] == "native") & (frame["protocol.batch_size"] == 100)]
    nmeans = native.groupby("method")["top1"].mean()
    row = next(r for r in result["comparisons"]["native_vs_shared"]["rows"]
               if r["others"] == {"protocol.batch_size": "100"})
    assert row["spread_native"] == pytest.approx(nmeans.max() - nmeans.min(), abs=1e-12)
    assert row["reduction"] == pytest.approx(row["spread_native"] - row["spread_shared"], abs=1e-12)
    assert row["reduction_ci"][0] <= row["reduction"] <= row["reduction_ci"][1]


def test_sign_flip_p_is_the_exact_permutation_share():
    assert sign_flip_p(np.array([0.01, 0.02, 0.03])) == pytest.approx(0.25)  # the floor at 3 seeds: 2 of 8
    assert sign_flip_p(np.array([0.03, -0.01, 0.02])) == pytest.approx(0.5)  # |mean| reached by 4 of 8 patterns
    d = np.array([0.5, -0.2, 0.9, 0.1, 0.4, -0.3])
    flips = [abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-15 for s in itertools.product((1, -1), repeat=6)]
    assert sign_flip_p(d) == pytest.approx(np.mean(flips))


def null_study(seeds: int, rng: np.random.Generator, methods=("sre2l", "cda", "rded", "edc")):
    """Methods that do not differ, a protocol effect, cell noise and a per-seed shift."""
    shift = rng.normal(0, 0.01, seeds)
    rows = [{"cell_key": f"{m}{p}{s}", "seed": s, "method": m, "protocol": p,
             "top1": 0.6 + 0.05 * (p == "rd3") + shift[s] + rng.normal(0, 0.01)}
            for m in methods for p in ("native", "rd3") for s in range(seeds)]
    results = pd.DataFrame(rows)
    return make_design("null", results, results.drop(columns="top1").assign(status="done"))


@pytest.mark.parametrize("seeds", [3, 10])
def test_planted_nulls_are_called_significant_at_their_nominal_rate(seeds):
    """Before correction each null paired comparison is significant 5% of the time
    (the t test is exact under normal noise; 300 studies x 12 comparisons: within
    0.035-0.065); after Holm the family-wise rate is at most 5% (+ 2.5 binomial sd)."""
    rng = np.random.default_rng(seeds)
    raw = called = families = 0
    n = 0
    for _ in range(300):
        paired = compare(null_study(seeds, rng))["paired"]
        n += len(paired)
        raw += sum(p["p_t"] < 0.05 for p in paired)
        hits = sum(p["significant"] for p in paired)
        called += hits
        families += hits > 0
    assert 0.035 <= raw / n <= 0.065, raw / n
    assert families / 300 <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / 300), families
    assert called / n <= 0.06


def test_spread_interval_covers_the_true_spread():
    """The simultaneous spread interval covers max - min of the true method means
    at least 95% of the time, also where a max of noisy means is biased upward
    (four methods, two of them tied for best)."""
    rng = np.random.default_rng(5)
    truth = np.array([0.60, 0.62, 0.65, 0.65])
    hits = 0
    for _ in range(400):
        y = truth[:, None] + rng.normal(0, 0.01, 3)[None, :] + rng.normal(0, 0.01, (4, 3))
        lo, hi = spread_interval(y, 0.95)
        hits += lo <= 0.05 <= hi
    assert hits / 400 >= 0.95 - 2 * np.sqrt(0.05 * 0.95 / 400), hits


AUG_ON = {"crop": "rrc", "flip": True, "mix": "cutmix"}
AUG_OFF = {"crop": "none", "flip": False, "mix": "none"}
DD_FACTORS = {"method": ["full_real", "random_real", "sre2l", "rded"], "protocol.labels.mode": ["hard", "epochwise"],
              "protocol.augment": [AUG_ON, AUG_OFF]}


def test_ddranking_metrics_match_their_formulas(tmp_path):
    quality = {("full_real",): 0.3, ("random_real",): 0.0, ("sre2l",): -0.04, ("rded",): 0.03}
    effects = {("method",): quality, ("protocol.labels.mode",): {("hard",): -0.08, ("epochwise",): 0.08}}
    url = write_study(tmp_path / "dd.sqlite", "dd", DD_FACTORS, list(range(4)), effects, 0.01)
    engine = make_engine(url)
    result = analyze(engine, "dd")
    dd = result["ddranking"]
    frame = results_frame(engine, "dd")
    frame["aug"] = frame["protocol.augment"].map(lambda a: "off" if a == AUG_OFF else "on")
    acc = frame.groupby(["method", "protocol.labels.mode", "aug"])["top1"].mean()
    norm = lambda x: (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))  # noqa: E731

    def value(metric, method, mode, aug):
        rows = [r for r in dd[metric]["rows"] if r["method"] == method and f"protocol.labels.mode={mode}" in
                r["setting"] and ('"crop":"none"' in r["setting"]) == (aug == "off")]
        assert len(rows) == 1, (metric, method, mode, aug, dd[metric])
        return rows[0]["value"]

    for m in ("sre2l", "rded"):
        for aug in ("on", "off"):
            hlr = acc["full_real", "hard", aug] - acc[m, "hard", aug]
            assert value("hlr", m, "hard", aug) == pytest.approx(hlr, abs=1e-12)
            ior = acc[m, "epochwise", aug] - acc["random_real", "epochwise", aug]
            assert value("ior", m, "epochwise", aug) == pytest.approx(ior, abs=1e-12)
            assert value("lrs", m, "epochwise", aug) == pytest.approx(norm(0.5 * ior - 0.5 * hlr), abs=1e-12)
        for mode in ("hard", "epochwise"):
            b = 0.5 * (acc[m, mode, "on"] - acc["random_real", mode, "on"]) + \
                0.5 * (acc[m, mode, "off"] - acc["random_real", mode, "off"])
            assert value("ars", m, mode, "on") == pytest.approx(norm(b), abs=1e-12)
    assert {r["method"] for r in dd["ior"]["rows"]} == {"sre2l", "rded"}  # baselines are not scored


def test_ddranking_says_what_is_missing(tmp_path):
    factors = {"method": ["random_real", "sre2l"], "protocol.labels.mode": ["hard", "epochwise"]}
    url = write_study(tmp_path / "m.sqlite", "nofull", factors, [0, 1], {}, 0.01)
    dd = analyze(make_engine(url), "nofull")["ddranking"]
    assert "full_real" in dd["hlr"]["absent"]
    assert "rows" in dd["ior"]
    assert "absent" in dd["lrs"] and "protocol.augment" in dd["ars"]["absent"]
