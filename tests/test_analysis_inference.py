"""The statistics under every verdict (orchestrator.analysis.inference), checked
against independent implementations (scipy, statsmodels) and by simulation:
intervals must cover at their stated rate, tests must reject at theirs."""
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from orchestrator.analysis import inference as inf


@pytest.mark.parametrize("method", ["holm", "bonferroni", "fdr_bh"])
def test_adjusted_p_values_equal_statsmodels(method):
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.uniform(size=int(rng.integers(1, 30))) ** 3
        p[int(rng.integers(0, len(p)))] = p[0]  # ties
        assert inf.adjust(p, method) == pytest.approx(multipletests(p, method=method)[1], abs=1e-12)
    with_nan = inf.adjust([0.01, math.nan, 0.04], "holm")
    assert math.isnan(with_nan[1]) and with_nan[[0, 2]] == pytest.approx([0.02, 0.04])


def test_paired_matches_scipy_and_says_what_one_seed_cannot():
    d = np.array([0.012, -0.003, 0.02, 0.007])
    r = inf.paired(d)
    t = stats.ttest_1samp(d, 0.0)
    assert r.ci == pytest.approx(tuple(t.confidence_interval(0.95)), abs=1e-14)
    assert r.p_t == pytest.approx(t.pvalue, rel=1e-12) and r.min_p_flip == pytest.approx(2 / 16)
    one = inf.paired([0.01])
    assert one.n == 1 and math.isnan(one.ci[0]) and math.isnan(one.p_t)


def test_power_equals_statsmodels():
    for n in (3, 5, 10, 30):
        d = inf.detectable(1.0, n)
        assert d == pytest.approx(TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8), rel=1e-6)
        assert TTestPower().power(d, n, 0.05) == pytest.approx(0.8, abs=1e-6)
    need = inf.seeds_needed(0.5, 1.0)
    assert TTestPower().power(0.5, need, 0.05) >= 0.8 > TTestPower().power(0.5, need - 1, 0.05)
    assert inf.seeds_needed(0.0, 1.0) is None and inf.seeds_needed(1e-5, 1.0) is None


@pytest.mark.parametrize("df1, df2, lam", [(1, 32, 0.0), (2, 8, 6.0), (1, 4, 40.0), (3, 48, 300.0)])
def test_noncentrality_interval_covers_at_its_level(df1, df2, lam):
    """Draws of F from the noncentral F with a known lambda: the inverted interval
    contains lambda 95% of the time (500 draws: within 2.5 binomial sd)."""
    rng = np.random.default_rng(int(lam) + df1)
    draws = stats.ncf.rvs(df1, df2, lam, size=500, random_state=rng) if lam > 0 else \
        stats.f.rvs(df1, df2, size=500, random_state=rng)
    hits = 0
    for F in draws:
        lo, hi = inf.noncentrality_interval(float(F), df1, df2, 0.95)
        assert 0 <= lo <= hi
        hits += lo <= lam <= hi
    assert abs(hits / 500 - 0.95) <= 2.5 * math.sqrt(0.05 * 0.95 / 500) or (lam == 0 and hits / 500 >= 0.95), hits


def test_share_interval_covers_a_planted_share_and_contains_what_it_should():
    """Simulated sums of squares of a balanced study (part, rest and residual chi^2
    with known lambdas): the share interval covers lambda_p / (lambda_p + lambda_r + N)
    at least 95% of the time (200 draws, 2.5 binomial sd), and narrows as the
    signal grows."""
    rng = np.random.default_rng(3)
    df_p, df_r, df_e, n = 2, 5, 16, 24
    for lam_p, lam_r in [(40.0, 80.0), (0.0, 30.0), (400.0, 10.0)]:
        truth = lam_p / (lam_p + lam_r + n)
        hits, widths = 0, []
        for _ in range(200):
            xp = stats.ncx2.rvs(df_p, lam_p, random_state=rng) if lam_p else stats.chi2.rvs(df_p, random_state=rng)
            xr = stats.ncx2.rvs(df_r, lam_r, random_state=rng)
            xe = stats.chi2.rvs(df_e, random_state=rng)
            f_all = ((xp + xr) / (df_p + df_r)) / (xe / df_e)
            total = inf.noncentrality_interval(f_all, df_p + df_r, df_e, 1 - inf.NUISANCE_RISK)
            lo, hi = inf.share_interval(xp / (xp + xr + xe), df_p, df_r, df_e, n, total, 0.95)
            hits += lo <= truth <= hi
            widths.append(hi - lo)
        assert hits / 200 >= 0.95 - 2.5 * math.sqrt(0.05 * 0.95 / 200), (lam_p, lam_r, hits)
        assert np.median(widths) < 0.6, widths
    assert inf.with_estimate((0.1, 0.2), 0.25) == (0.1, 0.25)


def test_sign_flip_floor_is_said_in_words_at_three_seeds(tmp_path):
    from orchestrator.analysis.analyze import seed_sentences

    three = seed_sentences({"design": {"seeds": [0, 1, 2]}, "inference": {"level": 0.95}})
    assert "p = 0.25" in three[0] and "normally distributed" in three[0]
    assert seed_sentences({"design": {"seeds": list(range(6))}, "inference": {"level": 0.95}}) == []
    assert "no interval" in seed_sentences({"design": {"seeds": [0]}, "inference": {"level": 0.95}})[0]
