"""Calibration of the verdict: simulated studies with planted null effects and
planted effects, analysed by the analysis' own code, many replicates.

Each replicate is a study's results table (methods x protocol settings x seeds,
top-1 as a fraction) built in memory and turned into a Design by
``make_design``, exactly as results read from the database are; its verdicts
come from the functions ``analyze`` calls: ``compare`` (paired differences,
multiplicity correction) and ``attribute`` (shares and their intervals).

- fpr_paired_N: methods that do not differ (4 methods x 2 protocols, a protocol
  effect, cell noise plus a per-seed effect shared by a seed's cells); the share
  of the null paired comparisons called significant after the study's
  correction (Holm), at N = 3, 5, 10 seeds. Beside it, per comparison before
  correction (nominal 0.05), family-wise (nominal <= 0.05), and with
  heavy-tailed noise (Student t, 3 df).
- coverage_shares: balanced studies (3 methods x 2 protocols x 2 epochs, 3
  seeds) with planted main effects and interactions in four scenarios (one
  dominated by each group, one all-null); the share of the 95% intervals of the
  grouped shares (method, protocol, method x protocol, residual) that contain
  the planted population share lambda_g / (lambda_model + N). Beside it the same
  for every term's eta^2 and partial eta^2.
- power_1pt_10: four methods 1 point apart at 10 seeds; the share of the
  1-point differences detected (significant after Holm, right sign); beside it
  the same at 3 and 5 seeds.

Last line: one JSON object. ``--quick`` runs a few replicates (the test suite).

    python bench/inference_calibration.py [--quick] [--replicates N] [--workers W]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.analysis.attribution import Model, attribute, hierarchical_terms, term_group  # noqa: E402
from orchestrator.analysis.comparisons import compare  # noqa: E402
from orchestrator.analysis.design import make_design  # noqa: E402

METHODS4 = ["sre2l", "cda", "rded", "edc"]
METHODS3 = ["sre2l", "cda", "rded"]
NOISE = 0.005  # cell noise sd: half a point, the run-to-run spread of RDED's own CIFAR-10 post-evaluation
SEED_EFFECT = 0.005  # a per-seed shift shared by all of a seed's cells (paired designs cancel it)
LEVEL = 0.95


def study(means: dict[tuple, float], factors: dict[str, list], seeds: int, rng: np.random.Generator,
          heavy: bool = False, seed_effect: float = SEED_EFFECT):
    """A Design from planted cell means plus noise, through make_design."""
    names = list(factors)
    seed_shift = rng.normal(0, seed_effect, seeds)
    rows = []
    for combo in itertools.product(*factors.values()):
        for s in range(seeds):
            noise = NOISE * (rng.standard_t(3) / np.sqrt(3) if heavy else rng.standard_normal())
            rows.append({"cell_key": f"{combo}-{s}", "seed": s, **dict(zip(names, combo)),
                         "top1": means[combo] + seed_shift[s] + noise})
    results = pd.DataFrame(rows)
    cells = results.drop(columns="top1").assign(status="done")
    return make_design("sim", results, cells)


def null_replicate(args) -> dict:
    seeds, rep, heavy = args
    rng = np.random.default_rng([1, seeds, rep, heavy])
    factors = {"method": METHODS4, "protocol": ["native", "rd3"]}
    means = {(m, p): 0.6 + (0.05 if p == "rd3" else 0.0) for m, p in itertools.product(*factors.values())}
    comp = compare(study(means, factors, seeds, rng, heavy), LEVEL)
    paired = comp["paired"]
    return {"n": len(paired), "significant": sum(p["significant"] for p in paired),
            "raw": sum(p["p_t"] is not None and p["p_t"] < 1 - LEVEL for p in paired),
            "flip": sum(p["significant_sign_flip"] for p in paired)}


SCENARIOS = {  # (method, protocol, epochs, method x protocol, protocol x epochs, three-way) effect sizes
    "method_dominates": (0.04, 0.01, 0.0, 0.008, 0.0, 0.0),
    "protocol_dominates": (0.01, 0.04, 0.02, 0.0, 0.005, 0.0),
    "interaction_dominates": (0.005, 0.0, 0.01, 0.03, 0.0, 0.004),
    "all_null": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
}
COVERAGE_FACTORS = {"method": METHODS3, "protocol": ["native", "rd3"], "protocol.epochs": [40, 120]}


def planted_means(sizes) -> dict[tuple, float]:
    """Cell means from fixed effect patterns scaled by ``sizes`` (the patterns are
    centred so each term is its own ANOVA component)."""
    m, p, e, mp, pe, mpe = sizes
    qm = dict(zip(METHODS3, [-1.0, 0.0, 1.0]))
    sp = {"native": -1.0, "rd3": 1.0}
    se = {40: -1.0, 120: 1.0}
    im = dict(zip(METHODS3, [1.0, -2.0, 1.0]))  # orthogonal to qm: a crossover
    out = {}
    for meth, prot, ep in itertools.product(*COVERAGE_FACTORS.values()):
        out[meth, prot, ep] = (0.6 + m * qm[meth] + p * sp[prot] + e * se[ep] + mp * im[meth] * sp[prot]
                               + pe * sp[prot] * se[ep] + mpe * qm[meth] * sp[prot] * se[ep])
    return out


def population_shares(design) -> tuple[dict, dict, float, float]:
    """lambda per term from the noise-free means (SS_t(mu) / sigma^2), and the total."""
    terms = hierarchical_terms(design.factors, len(design.factors))
    model = Model(design, terms)
    lam = {t: model.ss([t], 2) / NOISE ** 2 for t in terms}
    return lam, terms, model.n, sum(lam.values())


def coverage_replicate(args) -> dict:
    scenario, rep = args
    rng = np.random.default_rng([2, rep, list(SCENARIOS).index(scenario)])
    means = planted_means(SCENARIOS[scenario])
    # Population values: the same model on the noise-free means (SEED_EFFECT is off in this
    # scenario: the ANOVA's residual is independent seed noise).
    clean = make_design("truth", *_frames(means, 3))
    lam, terms, n, total = population_shares(clean)
    att = attribute(study(means, COVERAGE_FACTORS, 3, rng, seed_effect=0.0), LEVEL)
    out = {"groups": 0, "groups_covered": 0, "eta2": 0, "eta2_covered": 0, "partial": 0, "partial_covered": 0,
           "by_group": {}}
    truth = {g: sum(lam[t] for t in terms if term_group(t) == g) / (total + n)
             for g in ("method", "protocol", "method_x_protocol")}
    truth["residual"] = n / (total + n)
    for g, value in truth.items():
        lo, hi = att["shares_ci"][g]
        hit = lo - 1e-12 <= value <= hi + 1e-12
        out["groups"] += 1
        out["groups_covered"] += hit
        out["by_group"][g] = int(hit)
    for row, t in zip(att["terms"], terms):
        lo, hi = row["eta2_ci"]
        out["eta2"] += 1
        out["eta2_covered"] += lo - 1e-12 <= lam[t] / (total + n) <= hi + 1e-12
        lo, hi = row["partial_eta2_ci"]
        out["partial"] += 1
        out["partial_covered"] += lo - 1e-12 <= lam[t] / (lam[t] + n) <= hi + 1e-12
    return out


def _frames(means: dict, seeds: int):
    names = list(COVERAGE_FACTORS)
    rows = [{"cell_key": f"{c}-{s}", "seed": s, **dict(zip(names, c)), "top1": v}
            for c, v in means.items() for s in range(seeds)]
    results = pd.DataFrame(rows)
    return results, results.drop(columns="top1").assign(status="done")


def power_replicate(args) -> dict:
    seeds, rep = args
    rng = np.random.default_rng([3, seeds, rep])
    factors = {"method": METHODS4}
    means = {(m,): 0.6 + 0.01 * i for i, m in enumerate(METHODS4)}
    comp = compare(study(means, factors, seeds, rng), LEVEL)
    one = [p for p in comp["paired"] if abs(METHODS4.index(p["a"]) - METHODS4.index(p["b"])) == 1]
    found = sum(p["significant"] and p["diff"] * (METHODS4.index(p["a"]) - METHODS4.index(p["b"])) > 0 for p in one)
    return {"n": len(one), "found": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few replicates (smoke test)")
    parser.add_argument("--replicates", type=int, default=None, help="replicates per setting (default 1000; "
                                                                     "quick: 20)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    reps = args.replicates or (20 if args.quick else 1000)
    cover_reps = max(reps // 4, 10)
    t0 = time.perf_counter()
    figures: dict = {"replicates": reps, "coverage_replicates_per_scenario": cover_reps, "noise_sd_pts": 100 * NOISE,
                     "seed_effect_sd_pts": 100 * SEED_EFFECT, "level": LEVEL, "correction": "Holm"}
    with ProcessPoolExecutor(args.workers) as pool:
        for n in (3, 5, 10):
            for heavy in (False, True):
                if heavy and n != 3:
                    continue
                rows = list(pool.map(null_replicate, [(n, r, heavy) for r in range(reps)], chunksize=20))
                total = sum(r["n"] for r in rows)
                tag = f"{n}_heavy" if heavy else f"{n}"
                figures[f"fpr_paired_{tag}"] = sum(r["significant"] for r in rows) / total
                figures[f"fpr_paired_uncorrected_{tag}"] = sum(r["raw"] for r in rows) / total
                figures[f"fwer_paired_{tag}"] = sum(r["significant"] > 0 for r in rows) / len(rows)
                figures[f"fpr_sign_flip_{tag}"] = sum(r["flip"] for r in rows) / total
                print(f"null, {n} seeds{' (t3 noise)' if heavy else ''}: {figures[f'fpr_paired_{tag}']:.4f} called "
                      f"significant after Holm, {figures[f'fpr_paired_uncorrected_{tag}']:.4f} before, family-wise "
                      f"{figures[f'fwer_paired_{tag}']:.4f}", flush=True)
        cover = list(pool.map(coverage_replicate, [(s, r) for s in SCENARIOS for r in range(cover_reps)], chunksize=5))
        figures["coverage_shares"] = sum(r["groups_covered"] for r in cover) / sum(r["groups"] for r in cover)
        figures["coverage_eta2_terms"] = sum(r["eta2_covered"] for r in cover) / sum(r["eta2"] for r in cover)
        figures["coverage_partial_eta2_terms"] = sum(r["partial_covered"] for r in cover) / sum(r["partial"] for r in cover)
        for g in ("method", "protocol", "method_x_protocol", "residual"):
            figures[f"coverage_share_{g}"] = float(np.mean([r["by_group"][g] for r in cover]))
        print(f"coverage of the 95% share intervals: groups {figures['coverage_shares']:.4f}, term eta^2 "
              f"{figures['coverage_eta2_terms']:.4f}, term partial eta^2 {figures['coverage_partial_eta2_terms']:.4f}",
              flush=True)
        for n in (3, 5, 10):
            power = list(pool.map(power_replicate, [(n, r) for r in range(reps)], chunksize=20))
            figures[f"power_1pt_{n}"] = sum(r["found"] for r in power) / sum(r["n"] for r in power)
            print(f"power: {figures[f'power_1pt_{n}']:.4f} of the 1-point differences detected at {n} seeds",
                  flush=True)
    figures["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
