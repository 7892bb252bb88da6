"""Variance attribution: ANOVA on final top-1 over the study's factors, with
effect sizes and intervals that keep their coverage at three seeds.

The model is OLS with sum contrasts; sums of squares are Type II in a balanced
design and Type III otherwise (statsmodels' ``anova_lm`` conventions;
tests/test_analysis_attribution.py checks this closed form against it). The
design is categorical, so every fit depends on the data only through
per-combination counts, sums and sums of squares: a fit is a small solve over
combinations, cheap enough for the calibration benchmark's thousands of studies.

Intervals (orchestrator.analysis.inference): partial eta^2 inverts the
noncentral F distribution of its F test, exact for the noncentrality lambda and
so for the population partial eta^2 = lambda / (lambda + N); a share (eta^2,
omega^2) inverts the distribution of the sample share itself, which depends on
the part's and the rest's lambdas, the rest searched over a confidence set
(Berger-Boos); the residual's share N / (lambda_model + N) inverts the whole
model's F test.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.linalg import cho_factor, cho_solve

from .design import METRIC, Design, factor_group
from .inference import NUISANCE_RISK, nan_to_none, noncentrality_interval, share_interval, with_estimate

GROUP_KEYS = ("method", "protocol", "budget", "method_x_protocol", "budget_x", "other")


def term_name(term: tuple[str, ...]) -> str:
    return " x ".join(term)


def term_group(term: tuple[str, ...]) -> str:
    """other as soon as an `other` factor is in it; a single group's factors stay in
    that group; method with protocol is method_x_protocol; budget with either is
    budget_x."""
    groups = {factor_group(f) for f in term}
    if "other" in groups:
        return "other"
    if len(groups) == 1:
        return groups.pop()
    return "budget_x" if "budget" in groups else "method_x_protocol"


def hierarchical_terms(factors: list[str], order: int) -> list[tuple[str, ...]]:
    return [t for k in range(1, order + 1) for t in itertools.combinations(factors, k)]


def sum_codes(levels: list[str], values: pd.Series) -> np.ndarray:
    """Sum (deviation) contrasts: level j < L-1 -> e_j, the last level -> all -1."""
    index = values.map({lv: i for i, lv in enumerate(levels)}).to_numpy()
    basis = np.vstack([np.eye(len(levels) - 1), -np.ones(len(levels) - 1)])
    return basis[index]


def term_columns(design: Design, combos: pd.DataFrame, term: tuple[str, ...]) -> np.ndarray:
    cols = np.ones((len(combos), 1))
    for f in term:
        codes = sum_codes(design.levels[f], combos[f].astype(str))
        cols = (cols[:, :, None] * codes[:, None, :]).reshape(len(combos), -1)
    return cols


class Model:
    """The ANOVA model reduced to per-combination statistics: the residual sum of
    squares of any submodel is a Cholesky solve over the observed combinations."""

    def __init__(self, design: Design, terms: list[tuple[str, ...]]):
        self.terms = terms
        frame, factors = design.frame, design.factors
        y = frame[METRIC].to_numpy(float)
        if factors:
            keys = frame[factors].astype(str).agg("\x1f".join, axis=1)
            codes, _ = pd.factorize(keys)
            combos = frame.loc[~keys.duplicated(), factors].astype(str).reset_index(drop=True)
        else:
            codes, combos = np.zeros(len(frame), dtype=int), pd.DataFrame(index=[0])
        count = np.bincount(codes, minlength=len(combos)).astype(float)
        total = np.bincount(codes, weights=y, minlength=len(combos))
        ybar = total / count
        self.n = float(count.sum())
        self.within = float(np.sum((y - ybar[codes]) ** 2))
        self.ss_total = float(np.sum((y - y.mean()) ** 2)) if len(y) else math.nan
        blocks = [term_columns(design, combos, t) for t in terms]
        self.full = np.hstack([np.ones((len(combos), 1)), *blocks])
        edges = np.cumsum([1] + [b.shape[1] for b in blocks])
        self.cols = {t: np.arange(a, b) for t, a, b in zip(terms, edges[:-1], edges[1:])}
        self.gram = self.full.T @ (count[:, None] * self.full)
        self.moment = self.full.T @ (count * ybar)
        self.yy = float(np.sum(count * ybar ** 2))
        self.estimable = bool(np.linalg.matrix_rank(self.full) == self.full.shape[1])
        self._rss: dict[frozenset, float] = {}

    @property
    def df_resid(self) -> float:
        return self.n - self.full.shape[1]

    def rss(self, terms) -> float:
        """Residual sum of squares of the submodel with the intercept and ``terms``."""
        key = frozenset(terms)
        if key not in self._rss:
            cols = np.concatenate([[0]] + [self.cols[t] for t in terms]).astype(int)
            factor = cho_factor(self.gram[np.ix_(cols, cols)])
            fitted = float(self.moment[cols] @ cho_solve(factor, self.moment[cols]))
            self._rss[key] = self.within + max(self.yy - fitted, 0.0)
        return self._rss[key]

    def ss(self, terms: list[tuple[str, ...]], typ: int) -> float:
        """Sum of squares of a set of terms tested together: adjusted for every other
        term (Type III), or only for the terms that contain none of them (Type II)."""
        chosen = set(terms)
        if typ == 3:
            base = [u for u in self.terms if u not in chosen]
        else:
            base = [u for u in self.terms if u not in chosen and not any(set(t) <= set(u) for t in chosen)]
        return max(self.rss(base) - self.rss(base + [t for t in self.terms if t in chosen]), 0.0)

    def df(self, terms) -> float:
        return float(sum(len(self.cols[t]) for t in terms))


def choose_model(design: Design) -> tuple[int, list[str]]:
    """Highest interaction order whose model is estimable (full rank over the
    observed combinations) and leaves residual degrees of freedom; what is left
    out is pooled into the residual, and a note says so."""
    n, full = len(design.frame), len(design.factors)
    why = ""
    for order in range(full, 0, -1):
        model = Model(design, hierarchical_terms(design.factors, order))
        if model.estimable and n - model.full.shape[1] > 0:
            notes = [] if order == full else [f"interactions of order > {order} left out ({why}); they are "
                                              "pooled into the residual"]
            return order, notes
        if not why:
            why = ("not estimable: factor combinations are missing" if not model.estimable else
                   "no residual degrees of freedom: one seed per combination")
    return 0, [f"no estimable model ({why})"]


def statsmodels_table(design: Design, order: int, typ: int) -> pd.DataFrame:
    """anova_lm on ``top1 ~ (C(f1, Sum) + ...)**order``: the reference the closed form is tested against."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    safe = {f: f"f{i}" for i, f in enumerate(design.factors)}
    data = design.frame[[METRIC, *design.factors]].rename(columns=safe)
    for f, s in safe.items():
        data[s] = pd.Categorical(data[s].astype(str), categories=design.levels[f])
    rhs = " + ".join(f"C({s}, Sum)" for s in safe.values())
    formula = f"{METRIC} ~ ({rhs})**{order}" if order > 1 else f"{METRIC} ~ {rhs}"
    table = anova_lm(smf.ols(formula, data=data).fit(), typ=typ)
    back = {f"C({s}, Sum)": f for f, s in safe.items()}
    table.index = [" x ".join(back[p] for p in name.split(":")) if name not in ("Intercept", "Residual") else name
                   for name in table.index]
    return table.drop(index="Intercept", errors="ignore")


class _Sizes:
    """Effect sizes and their intervals for any set of terms, from one fitted model."""

    def __init__(self, model: Model, typ: int, level: float):
        self.model, self.typ, self.level = model, typ, level
        self.rss, self.df_e = model.rss(model.terms), model.df_resid
        self.ms_e = self.rss / self.df_e
        self.total = model.ss_total
        df_model = model.full.shape[1] - 1
        f_all = ((self.total - self.rss) / df_model) / self.ms_e if df_model else math.nan
        # The confidence set for the total signal that share intervals search over (Berger-Boos).
        self.lam_all = noncentrality_interval(f_all, df_model, self.df_e, 1 - NUISANCE_RISK) if df_model else (0, 0)
        self.f_all, self.df_model = f_all, df_model

    def part(self, terms: list[tuple[str, ...]], ss: float | None = None) -> dict[str, Any]:
        """eta^2 (SS / SS_total), partial eta^2 (SS / (SS + SS_resid)) and omega^2
        ((SS - df MS_resid) / (SS_total + MS_resid)) of ``terms`` with intervals, the
        F test of the terms together, and their SS. ``ss`` overrides the SS of the
        point estimates (a group's is the sum of its terms' SS)."""
        m, n = self.model, self.model.n
        df = m.df(terms)
        joint = m.ss(terms, self.typ)
        ss = joint if ss is None else ss
        F = (joint / df) / self.ms_e if self.ms_e > 0 else math.inf
        p = float(stats.f.sf(F, df, self.df_e)) if math.isfinite(F) else 0.0
        eta2 = ss / self.total if self.total > 0 else math.nan
        partial = ss / (ss + self.rss) if ss + self.rss > 0 else math.nan
        omega2 = (ss - df * self.ms_e) / (self.total + self.ms_e) if self.total + self.ms_e > 0 else math.nan
        lam = noncentrality_interval(F, df, self.df_e, self.level)
        share = share_interval(eta2, df, self.df_model - df, self.df_e, n, self.lam_all, self.level)
        return {"df": df, "ss": ss, "F": F, "p": p, "eta2": eta2, "partial_eta2": partial, "omega2": omega2,
                "lambda_ci": list(lam),
                "eta2_ci": list(with_estimate(share, eta2)),
                "omega2_ci": list(with_estimate(share, omega2)),
                "partial_eta2_ci": list(with_estimate((lam[0] / (lam[0] + n), lam[1] / (lam[1] + n)), partial))}

    def residual(self) -> dict[str, Any]:
        n = self.model.n
        share = self.rss / self.total if self.total > 0 else math.nan
        # The residual's population share N / (lambda_model + N): the whole level on one interval.
        lo, hi = noncentrality_interval(self.f_all, self.df_model, self.df_e, self.level) if self.df_model else (0, 0)
        return {"df": self.df_e, "ss": self.rss, "share": share,
                "share_ci": list(with_estimate((n / (hi + n), n / (lo + n)), share))}


def residual_name(order: int, factors: list[str]) -> str:
    if order >= len(factors):
        return "seed noise"
    return f"seed noise + interactions of order > {order} (pooled)"


def attribute(design: Design, level: float = 0.95) -> dict[str, Any]:
    """The attribution section of the analysis (see docs/ANALYSIS.md)."""
    balance = design.balance()
    typ = 2 if balance["balanced"] else 3
    order, notes = choose_model(design) if design.factors else (0, ["no factor varies: all variance is residual"])
    base = {"anova_type": typ, "max_order": order, "n": len(design.frame), "notes": notes, "interval_level": level}
    if order == 0:
        return {"absent": notes[-1], **base}
    terms = hierarchical_terms(design.factors, order)
    model = Model(design, terms)
    sizes = _Sizes(model, typ, level)
    if not sizes.rss > 0:
        return {"absent": "no seed noise to test against (every seed gave the same result in every cell)", **base}
    result: dict[str, Any] = {
        **base, "why_type": "balanced design" if typ == 2 else "unbalanced design or missing combinations",
        "interval": f"{100 * level:.0f}% intervals for the population values: noncentral F for partial eta^2 and "
                    "the residual (Steiger 2004), the sample share's own distribution for eta^2 and omega^2",
        "residual_name": residual_name(order, design.factors),
    }
    rows = {t: sizes.part([t]) for t in terms}
    result["terms"] = [{"term": term_name(t), "factors": list(t), "group": term_group(t),
                        **{k: _clean(v) for k, v in rows[t].items()}} for t in terms]
    result["residual"] = {**{k: _clean(v) for k, v in sizes.residual().items()}, "name": result["residual_name"]}
    result["ss_total"] = model.ss_total
    result["ss_sum"] = sum(r["ss"] for r in rows.values()) + sizes.rss
    result["additive"] = bool(abs(result["ss_sum"] - model.ss_total) <= 1e-9 * max(model.ss_total, 1e-300))
    if not result["additive"]:
        notes.append(f"unbalanced: the terms' Type III sums of squares and the residual add up to "
                     f"{result['ss_sum'] / model.ss_total:.3f} of the total sum of squares; every share is a "
                     "fraction of the total, so the shares do not sum to 1")
    groups: dict[str, list] = {g: [t for t in terms if term_group(t) == g] for g in GROUP_KEYS}
    parts = {g: sizes.part(ts, sum(rows[t]["ss"] for t in ts)) for g, ts in groups.items() if ts}
    protocol_factors = [f for f in design.factors if factor_group(f) == "protocol"]
    for f in protocol_factors:
        parts[f"main:{f}"] = rows[(f,)]
        involving = [t for t in terms if f in t]
        parts[f"involving:{f}"] = sizes.part(involving, sum(rows[t]["ss"] for t in involving))
    result["groups"] = {k: {kk: _clean(v) for kk, v in p.items()} for k, p in parts.items()}
    result["shares_all"] = {g: _clean(parts[g]["eta2"]) if g in parts else 0.0 for g in GROUP_KEYS}
    result["shares_ci"] = {g: [_clean(x) for x in parts[g]["eta2_ci"]] if g in parts else [0.0, 0.0]
                           for g in GROUP_KEYS}
    for k in parts:
        if ":" in k:
            result["shares_all"][k] = _clean(parts[k]["eta2"])
            result["shares_ci"][k] = [_clean(x) for x in parts[k]["eta2_ci"]]
    result["shares_all"]["residual"] = result["residual"]["share"]
    result["shares_ci"]["residual"] = result["residual"]["share_ci"]
    result["empty_groups"] = [g for g in GROUP_KEYS if not groups[g]]
    return result


def public_shares(attribution: dict[str, Any]) -> dict[str, float]:
    """The fractions the question is asked in: method, protocol, budget, their
    interactions and the residual (``other`` when some factor is neither). They
    sum to 1 in a balanced design."""
    s = attribution["shares_all"]
    out = {k: s[k] for k in ("method", "protocol", "budget", "method_x_protocol", "budget_x", "residual")}
    if s.get("other"):
        out["other"] = s["other"]
    return out


def _clean(value):
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return nan_to_none(value) if isinstance(value, float) else value
