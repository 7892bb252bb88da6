"""Method comparisons and DD-Ranking metrics on planted studies: a planted
method x protocol crossover must show up as ranking flips and a negative Kendall
tau; without it, rankings agree; spreads and DD-Ranking metrics equal the values
computed by hand from the stored results."""
import itertools
import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from analysis_planted import centred, write_study
from db.queries import results_frame
from db.session import make_engine
from orchestrator.analysis.analyze import analyze
from orchestrator.analysis.comparisons import tau_matrix

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
    result = analyze(make_engine(url), "cross", draws=300)
    comp = result["comparisons"]
    by_setting = {s["setting"]: s for s in comp["settings"]}
    native = by_setting["protocol=native, protocol.batch_size=50"]
    shared = by_setting["protocol=rd3, protocol.batch_size=50"]
    assert [m for m, _ in sorted(native["ranks"].items(), key=lambda kv: kv[1])] == METHODS[::-1]
    assert [m for m, _ in sorted(shared["ranks"].items(), key=lambda kv: kv[1])] == METHODS
    taus = {(k["a"], k["b"]): k for k in comp["kendall"]}
    across = taus["protocol=native, protocol.batch_size=50", "protocol=rd3, protocol.batch_size=50"]
    assert across["tau"] == pytest.approx(-1.0) and across["flips"] == 6 and across["ci"][1] < 0
    within = taus["protocol=native, protocol.batch_size=50", "protocol=native, protocol.batch_size=100"]
    assert within["tau"] == pytest.approx(1.0) and within["flips"] == 0
    flips = [f for f in comp["flips"] if f["settings"] == [native["setting"], shared["setting"]]]
    assert {(f["a"], f["b"]) for f in flips} == set(itertools.combinations(METHODS, 2))
    assert all(f["significant"] for f in flips)
    assert result["shares"]["method_x_protocol"] > 0.3
    assert any("flips" in h for h in result["headlines"])


def test_without_interaction_rankings_agree(tmp_path):
    url = write_study(tmp_path / "n.sqlite", "nocross", FACTORS, list(range(6)), effects(False), 0.005)
    result = analyze(make_engine(url), "nocross", draws=200)
    comp = result["comparisons"]
    assert all(k["tau"] == pytest.approx(1.0) for k in comp["kendall"])
    assert comp["flips"] == []
    assert result["shares"]["method_x_protocol"] < 0.02


def test_paired_differences_and_spread_match_hand_computation(tmp_path):
    url = write_study(tmp_path / "p.sqlite", "paired", FACTORS, list(range(5)), effects(True), 0.01, rng_seed=4)
    engine = make_engine(url)
    result = analyze(engine, "paired", draws=300)
    frame = results_frame(engine, "paired")
    cell = frame[(frame["protocol"] == "rd3") & (frame["protocol.batch_size"] == 100)]
    a = cell[cell["method"] == "sre2l"].set_index("seed")["top1"]
    b = cell[cell["method"] == "edc"].set_index("seed")["top1"]
    paired = next(p for p in result["comparisons"]["paired"]
                  if p["setting"] == "protocol=rd3, protocol.batch_size=100" and (p["a"], p["b"]) == ("sre2l", "edc"))
    assert paired["diff"] == pytest.approx((a - b).mean(), abs=1e-12)
    assert paired["ci"][0] < paired["diff"] < paired["ci"][1] and paired["excludes_zero"]
    means = cell.groupby("method")["top1"].mean()
    spread = next(s for s in result["comparisons"]["spread"] if s["setting"] == paired["setting"])
    assert spread["spread"] == pytest.approx(means.max() - means.min(), abs=1e-12)
    assert (spread["best"], spread["worst"]) == (means.idxmax(), means.idxmin())
    native = frame[(frame["protocol"] == "native") & (frame["protocol.batch_size"] == 100)]
    nmeans = native.groupby("method")["top1"].mean()
    row = next(r for r in result["comparisons"]["native_vs_shared"]["rows"]
               if r["others"] == {"protocol.batch_size": "100"})
    assert row["spread_native"] == pytest.approx(nmeans.max() - nmeans.min(), abs=1e-12)
    assert row["reduction"] == pytest.approx(row["spread_native"] - row["spread_shared"], abs=1e-12)


def test_tau_matrix_matches_scipy_with_missing_methods():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(5, 7))
    means[1, 2] = means[3, 5] = means[3, 0] = np.nan
    taus = tau_matrix(means)
    for g, h in itertools.product(range(5), repeat=2):
        ok = ~np.isnan(means[g]) & ~np.isnan(means[h])
        assert taus[g, h] == pytest.approx(kendalltau(means[g, ok], means[h, ok]).statistic, abs=1e-12)


AUG_ON = {"crop": "rrc", "flip": True, "mix": "cutmix"}
AUG_OFF = {"crop": "none", "flip": False, "mix": "none"}
DD_FACTORS = {"method": ["full_real", "random_real", "sre2l", "rded"], "protocol.labels.mode": ["hard", "epochwise"],
              "protocol.augment": [AUG_ON, AUG_OFF]}


def test_ddranking_metrics_match_their_formulas(tmp_path):
    quality = {("full_real",): 0.3, ("random_real",): 0.0, ("sre2l",): -0.04, ("rded",): 0.03}
    effects = {("method",): quality, ("protocol.labels.mode",): {("hard",): -0.08, ("epochwise",): 0.08}}
    url = write_study(tmp_path / "dd.sqlite", "dd", DD_FACTORS, list(range(4)), effects, 0.01)
    engine = make_engine(url)
    result = analyze(engine, "dd", draws=200)
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
    dd = analyze(make_engine(url), "nofull", draws=20)["ddranking"]
    assert "full_real" in dd["hlr"]["absent"]
    assert "rows" in dd["ior"]
    assert "absent" in dd["lrs"] and "protocol.augment" in dd["ars"]["absent"]
