"""The statistics every verdict rests on, as small pure functions.

Studies have few seeds (3 is common), so every interval here keeps its nominal
error rate at n = 3 under its stated assumption, and says so when it cannot:

- paired differences: Student t on the per-seed differences (df = n - 1), exact
  under normal seed noise, with an exact sign-flip permutation p-value beside it
  that assumes only symmetric noise;
- multiplicity: Holm (default), Bonferroni or Benjamini-Hochberg over a family;
  simultaneous intervals of a family use Bonferroni (Holm has no interval form);
- effect sizes: noncentral-F intervals for the noncentrality of an F test
  (Steiger 2004; Smithson 2003), mapped onto shares of variance;
- power: the paired t test's power from the noncentral t distribution.

docs/ANALYSIS.md explains each in words, with its source.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

CORRECTIONS = {"holm": "Holm", "bonferroni": "Bonferroni", "fdr_bh": "Benjamini-Hochberg (false discovery rate)",
               "none": "none"}
EXACT_FLIPS = 16  # up to 2^16 sign patterns enumerated; beyond, a fixed-seed Monte Carlo draw
MC_FLIPS = 1 << 16
POWER = 0.8


def nan_to_none(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class Paired:
    """A paired comparison over seeds: the mean of the per-seed differences."""

    n: int
    mean: float
    sd: float
    ci: tuple[float, float]  # Student t, df = n - 1; (nan, nan) with one seed
    p_t: float  # two-sided t test of mean 0
    p_flip: float  # exact two-sided sign-flip p (Monte Carlo beyond EXACT_FLIPS seeds)
    min_p_flip: float  # the smallest p the sign-flip test can give with n seeds: 2 / 2^n

    def as_dict(self) -> dict:
        return {"seeds": self.n, "diff": nan_to_none(self.mean), "sd": nan_to_none(self.sd),
                "ci": [nan_to_none(c) for c in self.ci], "p_t": nan_to_none(self.p_t),
                "p_sign_flip": nan_to_none(self.p_flip), "min_p_sign_flip": self.min_p_flip}


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of independent values (df = n - 1)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return (math.nan, math.nan)
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return (float(x.mean() - half), float(x.mean() + half))


def sign_flip_p(d: np.ndarray) -> float:
    """Two-sided permutation p-value of mean(d) = 0 under sign symmetry: the share of
    the 2^n sign patterns whose |mean| is at least the observed one (exact up to
    EXACT_FLIPS values; a Monte Carlo draw with a fixed seed beyond, the observed
    pattern counted once)."""
    d = np.asarray(d, dtype=float)
    n = d.size
    if n == 0:
        return math.nan
    observed = abs(d.mean()) * (1 - 1e-12)  # ties count as at least as extreme
    if n <= EXACT_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d) / n >= observed))
    signs = np.random.default_rng(0).choice((1.0, -1.0), size=(MC_FLIPS, n))
    return float((1 + np.sum(np.abs(signs @ d) / n >= observed)) / (1 + MC_FLIPS))


def paired(d, level: float = 0.95) -> Paired:
    """Paired comparison of per-seed differences ``d`` (NaNs, unshared seeds, dropped)."""
    d = np.asarray(d, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return Paired(n, mean, math.nan, (math.nan, math.nan), math.nan, math.nan, 1.0 if n else math.nan)
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # every seed gave the same difference: no noise to test against
        p = 1.0 if mean == 0 else 0.0
        return Paired(n, mean, 0.0, (mean, mean), p, sign_flip_p(d), 2.0 / 2 ** n)
    t = mean / (sd / math.sqrt(n))
    return Paired(n, mean, sd, t_interval(d, level), float(2 * stats.t.sf(abs(t), n - 1)), sign_flip_p(d),
                  min(1.0, 2.0 / 2 ** n))


def adjust(pvalues, method: str = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values over one family (NaNs stay NaN and do not
    count): Holm's step-down, Bonferroni, or Benjamini-Hochberg's step-up, as
    statsmodels' ``multipletests`` defines them (tests compare the two; this one
    avoids the garbage collection that call runs each time)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    q = p[ok]
    if method == "none":
        adj = q
    elif method == "bonferroni":
        adj = np.minimum(q * m, 1.0)
    elif method == "holm":
        order = np.argsort(q, kind="stable")
        steps = np.maximum.accumulate((m - np.arange(m)) * q[order])
        adj = np.empty(m)
        adj[order] = np.minimum(steps, 1.0)
    elif method == "fdr_bh":
        order = np.argsort(q, kind="stable")[::-1]
        steps = np.minimum.accumulate(q[order] * m / (m - np.arange(m)))
        adj = np.empty(m)
        adj[order] = np.minimum(steps, 1.0)
    else:
        raise ValueError(f"unknown correction {method!r} (known: {', '.join(CORRECTIONS)})")
    out[ok] = adj
    return out


def simultaneous_level(level: float, family: int) -> float:
    """Bonferroni: each of ``family`` intervals at this level covers all at ``level``."""
    return 1 - (1 - level) / max(family, 1)


# --- noncentral F: intervals for effect sizes --------------------------------------


def _cdf(F: float, df1: float, df2: float, lam: float) -> float:
    return float(stats.f.cdf(F, df1, df2) if lam <= 0 else stats.ncf.cdf(F, df1, df2, lam))


def noncentrality_interval(F: float, df1: float, df2: float, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval for the noncentrality lambda of an observed F(df1, df2)
    by inverting the noncentral F distribution: P(F' <= F | lambda_lo) = 1 - a/2 and
    P(F' <= F | lambda_hi) = a/2, each bound 0 where no lambda >= 0 reaches it."""
    if not (math.isfinite(F) and df1 > 0 and df2 > 0):
        return (math.nan, math.nan)
    alpha = 1 - level

    def bound(target: float) -> float:
        if _cdf(F, df1, df2, 0.0) <= target:
            return 0.0
        hi = max(10.0, 2 * F * df1)
        while _cdf(F, df1, df2, hi) > target:
            hi *= 2
            if hi > 1e12:
                return math.inf
        return float(optimize.brentq(lambda lam: _cdf(F, df1, df2, lam) - target, 0.0, hi, xtol=1e-10, rtol=1e-10))

    return (bound(1 - alpha / 2), bound(alpha / 2))


def with_estimate(ci: tuple[float, float], estimate: float | None) -> tuple[float, float]:
    """An interval widened, where needed, to contain its point estimate. A sample
    eta^2 is biased upward, so the interval for the population value can lie
    below it (small F); widening can only raise coverage."""
    lo, hi = ci
    if estimate is None or not math.isfinite(estimate) or not (math.isfinite(lo) and math.isfinite(hi)):
        return ci
    return (min(lo, estimate), max(hi, estimate))


SHARE_DRAWS = 20_000  # Monte Carlo draws per share interval (common random numbers, fixed seed)
NUISANCE_RISK = 0.005  # Berger-Boos: error rate spent on the confidence set for the total signal
NUISANCE_GRID = 9


def share_interval(eta2: float, df_part: float, df_rest: float, df_resid: float, n: float,
                   lam_total: tuple[float, float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Confidence interval for a population share s = lambda_part / (lambda_part +
    lambda_rest + N) from the sample share eta^2 = X_p / (X_p + X_r + X_e), where the
    three sums of squares over sigma^2 are independent (noncentral) chi^2 variables
    with df_part, df_rest and df_resid degrees of freedom (a balanced design).

    eta^2's distribution depends on sigma^2 only through the lambdas, but on two
    of them, so the total signal t = lambda_part + lambda_rest is a nuisance: by
    Berger and Boos (1994) s is accepted when some t in a confidence set for t
    (``lam_total``, at level 1 - NUISANCE_RISK, from the whole model's F) keeps the
    observed eta^2 inside the central 1 - (alpha - NUISANCE_RISK) of its
    distribution. That keeps the coverage at least ``level`` whatever the nuisance.
    The distribution is a Monte Carlo draw with common random numbers, so the
    bounds are smooth in s and the same on every run."""
    alpha = 1 - level - NUISANCE_RISK
    if not (math.isfinite(eta2) and df_part > 0 and df_resid > 0 and alpha > 0):
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    # X(lambda) = sum_i (Z_i + sqrt(lambda / df))^2 = A + 2 sqrt(lambda / df) S + lambda: a noncentral
    # chi^2 for every lambda from one draw of the Z's.
    zp = rng.standard_normal((SHARE_DRAWS, int(df_part)))
    ap, sp = (zp ** 2).sum(1), zp.sum(1)
    if df_rest > 0:
        zr = rng.standard_normal((SHARE_DRAWS, int(df_rest)))
        ar, sr = (zr ** 2).sum(1), zr.sum(1)
    else:
        ar = sr = np.zeros(SHARE_DRAWS)
    xe = rng.chisquare(df_resid, SHARE_DRAWS)

    def below(s: float, t: float) -> float:
        """P(eta^2 <= observed | s, t)."""
        lp = min(s * (t + n), t) if df_rest > 0 else s * n / (1 - s) if s < 1 else math.inf
        lr = max(t - lp, 0.0) if df_rest > 0 else 0.0
        xp = ap + 2 * math.sqrt(lp / df_part) * sp + lp
        xr = ar + 2 * math.sqrt(lr / max(df_rest, 1)) * sr + lr
        return float(np.mean(xp / (xp + xr + xe) <= eta2))

    lo_t, hi_t = lam_total
    if df_rest == 0:
        grid = [0.0]  # the part is the whole model: no nuisance
    else:
        hi_t = hi_t if math.isfinite(hi_t) else max(lo_t, 1.0) * 1e3
        grid = np.unique(np.concatenate([[lo_t, hi_t], np.geomspace(max(lo_t, 1e-3), max(hi_t, 1e-3),
                                                                     NUISANCE_GRID)]))

    def bound(target: float, t: float) -> float:
        """The s at which P(eta^2 <= observed) falls to ``target`` (it falls as s rises)."""
        top = t / (t + n) if df_rest > 0 else 1 - 1e-12
        if below(0.0, t) <= target:
            return 0.0
        if below(top, t) > target:
            return top
        return float(optimize.brentq(lambda s: below(s, t) - target, 0.0, top, xtol=1e-6))

    lo = min(bound(1 - alpha / 2, t) for t in grid)
    hi = max(bound(alpha / 2, t) for t in grid)
    return (lo, hi)


# --- power -------------------------------------------------------------------------------


def _power(effect: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t test from the noncentral t distribution (what
    statsmodels' TTestPower computes), for standardised effect ``effect``."""
    df, nc = n - 1, effect * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    p = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    return p if math.isfinite(p) else 1.0  # far in the tail: certain detection


def detectable(sd_diff: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """The smallest paired difference a two-sided paired t test at ``alpha`` detects
    with ``power`` from ``n`` seeds, for per-seed differences with sd ``sd_diff``."""
    if n < 2 or not math.isfinite(sd_diff):
        return math.nan
    hi = 1.0
    while _power(hi, n, alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda e: _power(e, n, alpha) - power, 0.0, hi, xtol=1e-9)) * sd_diff


def seeds_needed(diff: float, sd_diff: float, alpha: float = 0.05, power: float = POWER, cap: int = 10_000
                 ) -> int | None:
    """Seeds a paired t test needs to detect ``diff`` with ``power`` (None: more than ``cap``)."""
    if not (math.isfinite(diff) and math.isfinite(sd_diff)) or sd_diff <= 0 or diff == 0:
        return None
    effect = abs(diff) / sd_diff
    if _power(effect, cap, alpha) < power:
        return None
    lo, hi = 1, 2  # power(lo) < power <= power(hi)
    while _power(effect, hi, alpha) < power:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _power(effect, mid, alpha) >= power else (mid, hi)
    return hi
