"""Variance attribution: ANOVA on final top-1 over the study's factors.

The point estimates come from statsmodels (OLS with sum contrasts, ``anova_lm``
Type II, or Type III when the design is unbalanced or has missing cells). The
bootstrap over seeds refits the same model thousands of times, so it uses an
equivalent closed form: the design is categorical, so a weighted least-squares
fit depends on the data only through per-combination weighted counts, sums and
sums of squares, and each refit is a tiny solve over combinations instead of
over cells (tests/test_analysis_attribution.py checks it against statsmodels).
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.linalg import cho_factor, cho_solve

from .design import METRIC, Design, factor_group, interval, row_weights

GROUP_KEYS = ("method", "protocol", "method_x_protocol", "other")


def term_name(term: tuple[str, ...]) -> str:
    return " x ".join(term)


def term_group(term: tuple[str, ...]) -> str:
    groups = {factor_group(f) for f in term}
    if "other" in groups:
        return "other"
    if groups == {"method", "protocol"}:
        return "method_x_protocol"
    return groups.pop()


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
    """The ANOVA model over the observed factor combinations, reduced to per-combination
    statistics so that a (weighted) refit costs a solve over combinations only."""

    def __init__(self, design: Design, terms: list[tuple[str, ...]]):
        self.design, self.terms = design, terms
        frame = design.frame
        factors = design.factors
        if factors:
            keys = frame[factors].astype(str).agg("\x1f".join, axis=1)
            codes, uniques = pd.factorize(keys)
            self.combos = frame.loc[~keys.duplicated(), factors].astype(str).reset_index(drop=True)
        else:
            codes, self.combos = np.zeros(len(frame), dtype=int), pd.DataFrame(index=[0])
        self.onehot = np.zeros((len(frame), len(self.combos)))
        self.onehot[np.arange(len(frame)), codes] = 1.0
        self.y = frame[METRIC].to_numpy(float)
        self.blocks = {t: term_columns(design, self.combos, t) for t in terms}
        self.full = self.matrix(terms)
        # Column indices of each term in the full matrix (0 is the intercept).
        edges = np.cumsum([1] + [self.blocks[t].shape[1] for t in terms])
        self.cols = {t: np.arange(a, b) for t, a, b in zip(terms, edges[:-1], edges[1:])}
        self.full_rank: dict[bytes, bool] = {}

    def matrix(self, terms) -> np.ndarray:
        return np.hstack([np.ones((len(self.combos), 1))] + [self.blocks[t] for t in terms])

    def rank(self, terms) -> int:
        return int(np.linalg.matrix_rank(self.matrix(terms)))

    def sums_of_squares(self, weights: np.ndarray, typ: int) -> dict[str, Any]:
        """SS per term, residual SS and df, total SS, for one row-weight vector.

        Each submodel's fit is a Cholesky solve of the principal block of the
        weighted Gram matrix X'WX (sum contrasts keep it well conditioned); a
        singular full model (a draw without any seed of some needed combination)
        is reported as not estimable."""
        wc = weights @ self.onehot
        sc = (weights * self.y) @ self.onehot
        qc = (weights * self.y ** 2) @ self.onehot
        seen = wc > 0
        ybar = np.where(seen, sc / np.where(seen, wc, 1), 0.0)
        within = float(np.sum(qc[seen] - sc[seen] * ybar[seen]))
        n = float(wc.sum())
        mean = float(sc.sum() / n) if n else math.nan
        total = within + float(np.sum(wc[seen] * (ybar[seen] - mean) ** 2))
        gram = self.full.T @ (wc[:, None] * self.full)
        moment = self.full.T @ (wc * ybar)
        yy = float(np.sum(wc * ybar ** 2))
        cache: dict[frozenset, float] = {}

        def rss(terms) -> float:
            key = frozenset(terms)
            if key not in cache:
                cols = np.concatenate([[0]] + [self.cols[t] for t in terms]).astype(int)
                factor = cho_factor(gram[np.ix_(cols, cols)])
                cache[key] = within + max(yy - float(moment[cols] @ cho_solve(factor, moment[cols])), 0.0)
            return cache[key]

        p = self.full.shape[1]
        pattern = seen.tobytes()  # which combinations this draw has: few distinct patterns
        if pattern not in self.full_rank:
            self.full_rank[pattern] = bool(np.linalg.matrix_rank(self.full[seen]) == p)
        if not self.full_rank[pattern]:
            return {"estimable": False, "ss_total": total}
        rss_full = rss(self.terms)
        ss, df = {}, {}
        for t in self.terms:
            if typ == 3:
                base, with_t = [u for u in self.terms if u != t], self.terms
            else:  # Type II: adjusted for every term that does not contain t
                base = [u for u in self.terms if not set(t) <= set(u)]
                with_t = base + [t]
            ss[t], df[t] = max(rss(base) - rss(with_t), 0.0), len(self.cols[t])
        return {"ss": ss, "df": df, "rss": max(rss_full, 0.0), "df_resid": n - p, "ss_total": total,
                "estimable": n - p > 0}


def choose_model(design: Design) -> tuple[int, list[str]]:
    """Highest interaction order whose model is estimable (full rank over the
    observed combinations) and leaves residual degrees of freedom; what is left
    out is pooled into the residual, and a note says so."""
    n, full = len(design.frame), len(design.factors)
    why = ""
    for order in range(full, 0, -1):
        terms = hierarchical_terms(design.factors, order)
        x = Model(design, terms).matrix(terms)
        estimable = np.linalg.matrix_rank(x) == x.shape[1]
        if estimable and n - x.shape[1] > 0:
            notes = [] if order == full else [f"interactions of order > {order} left out ({why}); they are "
                                              "pooled into the residual"]
            return order, notes
        if not why:
            why = ("not estimable: factor combinations are missing" if not estimable else
                   "no residual degrees of freedom: one seed per combination")
    return 0, [f"no estimable model ({why})"]


def statsmodels_table(design: Design, order: int, typ: int) -> pd.DataFrame:
    """anova_lm on ``top1 ~ (C(f1, Sum) + ...)**order``: the reported point estimates."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    safe = {f: f"f{i}" for i, f in enumerate(design.factors)}
    data = design.frame[[METRIC, *design.factors]].rename(columns=safe)
    for f, s in safe.items():
        data[s] = pd.Categorical(data[s].astype(str), categories=design.levels[f])
    rhs = " + ".join(f"C({s}, Sum)" for s in safe.values())
    formula = f"{METRIC} ~ ({rhs})**{order}" if order > 1 else f"{METRIC} ~ {rhs}"
    fit = smf.ols(formula, data=data).fit()
    table = anova_lm(fit, typ=typ)
    back = {f"C({s}, Sum)": f for f, s in safe.items()}
    table.index = [" x ".join(back[p] for p in name.split(":")) if name not in ("Intercept", "Residual") else name
                   for name in table.index]
    return table.drop(index="Intercept", errors="ignore")


def effect_sizes(ss: dict, df: dict, rss: float, df_resid: float) -> dict[tuple, dict[str, float]]:
    """eta^2 = SS/SS_sum; partial eta^2 = SS/(SS + SS_resid);
    omega^2 = (SS - df MS_resid)/(SS_sum + MS_resid); SS_sum = sum of the table's SS."""
    ss_sum = sum(ss.values()) + rss
    ms_resid = rss / df_resid if df_resid > 0 else math.nan
    out = {}
    for t in ss:
        out[t] = {
            "eta2": ss[t] / ss_sum if ss_sum > 0 else math.nan,
            "partial_eta2": ss[t] / (ss[t] + rss) if ss[t] + rss > 0 else math.nan,
            "omega2": (ss[t] - df[t] * ms_resid) / (ss_sum + ms_resid) if ss_sum + ms_resid > 0 else math.nan,
        }
    out["residual"] = {"eta2": rss / ss_sum if ss_sum > 0 else math.nan}
    return out


def grouped_shares(sizes: dict, terms: list[tuple[str, ...]], protocol_factors: list[str]) -> dict[str, float]:
    shares = {g: 0.0 for g in GROUP_KEYS}
    for t in terms:
        shares[term_group(t)] += sizes[t]["eta2"]
    shares["residual"] = sizes["residual"]["eta2"]
    for f in protocol_factors:
        shares[f"main:{f}"] = sizes[(f,)]["eta2"] if (f,) in sizes else 0.0
        shares[f"involving:{f}"] = sum(sizes[t]["eta2"] for t in terms if f in t)
    return shares


def attribute(design: Design, counts: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """The attribution section of the analysis (see docs/ANALYSIS.md)."""
    balance = design.balance()
    typ = 2 if balance["balanced"] else 3
    order, notes = choose_model(design) if design.factors else (0, ["no factor varies: all variance is residual"])
    if order == 0 and design.factors:
        return {"absent": notes[-1], "notes": notes, "anova_type": typ, "max_order": 0,
                "n": len(design.frame)}
    terms = hierarchical_terms(design.factors, order)
    protocol_factors = [f for f in design.factors if factor_group(f) == "protocol"]
    result: dict[str, Any] = {
        "anova_type": typ,
        "why_type": ("balanced design" if typ == 2 else
                     "unbalanced design or missing combinations"),
        "max_order": order, "n": len(design.frame), "notes": notes, "bootstrap_draws": int(len(counts)),
        "interval_level": level,
    }
    if len(design.seeds) < 5:
        notes.append(f"only {len(design.seeds)} seed(s): intervals from resampling so few seeds are coarse "
                     "(with 2 seeds a draw can repeat one seed, leaving no residual)")
    model = Model(design, terms)
    point = model.sums_of_squares(np.ones(len(design.frame)), typ)
    if terms:
        table = statsmodels_table(design, order, typ)
        ss = {t: float(table.loc[term_name(t), "sum_sq"]) for t in terms}
        df = {t: float(table.loc[term_name(t), "df"]) for t in terms}
        rss, df_resid = float(table.loc["Residual", "sum_sq"]), float(table.loc["Residual", "df"])
        stats = {t: (float(table.loc[term_name(t), "F"]), float(table.loc[term_name(t), "PR(>F)"])) for t in terms}
    else:
        ss, df, rss, df_resid, stats = {}, {}, point["rss"], point["df_resid"], {}
    sizes = effect_sizes(ss, df, rss, df_resid)
    shares = grouped_shares(sizes, terms, protocol_factors)
    boot = _bootstrap(model, design, counts, typ, terms, protocol_factors)
    result["bootstrap_undefined"] = boot["undefined"]
    if boot["undefined"]:
        result["notes"].append(f"{boot['undefined']} of {len(counts)} bootstrap draws left out of the ANOVA "
                               "intervals: they drew a single distinct seed, or no seed of some combination")
    result["terms"] = [{
        "term": term_name(t), "factors": list(t), "group": term_group(t), "df": df[t], "ss": ss[t],
        "F": _num(stats[t][0]), "p": _num(stats[t][1]),
        **{k: _num(v) for k, v in sizes[t].items()},
        **{f"{k}_ci": [_num(x) for x in interval(boot[k][t], level)] for k in ("eta2", "partial_eta2", "omega2")},
    } for t in terms]
    result["residual"] = {"df": df_resid, "ss": rss, "share": _num(sizes["residual"]["eta2"]),
                          "share_ci": [_num(x) for x in interval(boot["shares"]["residual"], level)]}
    result["ss_total"] = point["ss_total"]
    result["ss_sum"] = sum(ss.values()) + rss
    result["additive"] = bool(abs(result["ss_sum"] - point["ss_total"]) <= 1e-9 * max(point["ss_total"], 1e-300))
    if not result["additive"]:
        result["notes"].append(f"unbalanced: the table's sums of squares add up to "
                               f"{result['ss_sum'] / point['ss_total']:.3f} of the total; shares are "
                               "fractions of the table's sum")
    result["shares_all"] = {k: _num(v) for k, v in shares.items()}
    result["shares_ci"] = {k: [_num(x) for x in interval(boot["shares"][k], level)] for k in shares}
    return result


def public_shares(attribution: dict[str, Any]) -> dict[str, float]:
    """The four fractions the question is asked in (plus ``other`` when some factor
    is neither method nor protocol); they sum to 1."""
    s = attribution["shares_all"]
    out = {k: s[k] for k in ("method", "protocol", "method_x_protocol", "residual")}
    if s.get("other"):
        out["other"] = s["other"]
    return out


def _bootstrap(model: Model, design: Design, counts: np.ndarray, typ: int, terms, protocol_factors):
    keys = list(GROUP_KEYS) + ["residual"] + [f"{p}:{f}" for f in protocol_factors for p in ("main", "involving")]
    boot = {"eta2": {t: [] for t in terms}, "partial_eta2": {t: [] for t in terms},
            "omega2": {t: [] for t in terms}, "shares": {k: [] for k in keys}}
    boot["undefined"] = 0
    distinct = (counts > 0).sum(axis=1)
    for w, k in zip(row_weights(design, counts), distinct):
        # One distinct seed says nothing about seed noise (its residual would be 0),
        # and a draw that misses every seed of some combination cannot fit the model.
        fit = model.sums_of_squares(w, typ) if k >= 2 else {"estimable": False}
        if not fit["estimable"]:
            # The interval is conditional on the draws that can (their number is reported).
            boot["undefined"] += 1
            continue
        sizes = effect_sizes(fit["ss"], fit["df"], fit["rss"], fit["df_resid"])
        for t in terms:
            for k in ("eta2", "partial_eta2", "omega2"):
                boot[k][t].append(sizes[t][k])
        for k, v in grouped_shares(sizes, terms, protocol_factors).items():
            boot["shares"][k].append(v)
    return boot


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
