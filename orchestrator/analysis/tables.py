"""The analysis as display tables (terminal and report): one function per table,
each returning (title, DataFrame of formatted strings) or None when the study
lacks what the table needs; ``absent`` notes say why."""
from __future__ import annotations

import math

import pandas as pd

from .tuning import tuning_table

Table = tuple[str, pd.DataFrame]


def pct(x, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def with_ci(x, ci, digits: int = 2) -> str:
    if ci is None or ci[0] is None:
        return pct(x, digits)
    return f"{pct(x, digits)} [{pct(ci[0], digits)}, {pct(ci[1], digits)}]"


def num(x, fmt: str = ".3g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


GROUP_NAMES = {"method": "method", "protocol": "protocol", "budget": "budget (IPC, label storage)",
               "method_x_protocol": "method x protocol", "budget_x": "budget x method/protocol", "other": "other"}


def p_text(p) -> str:
    return "n/a" if p is None else ("<1e-4" if p < 1e-4 else f"{p:.3g}")


def shares_table(r: dict) -> Table:
    att = r["attribution"]
    s, ci = att["shares_all"], att["shares_ci"]
    empty = set(att.get("empty_groups", []))
    rows = [{"group": att["residual_name"] if k == "residual" else GROUP_NAMES.get(k, k),
             "share of variance (%)": "none varies" if k in empty else with_ci(s[k], ci[k], 1)}
            for k in r["shares"]]
    for f in r["design"]["groups"]["protocol"]:
        rows.append({"group": f"  protocol: {f} (main effect)",
                     "share of variance (%)": with_ci(s[f"main:{f}"], ci[f"main:{f}"], 1)})
        rows.append({"group": f"  protocol: {f} (all terms with it)",
                     "share of variance (%)": with_ci(s[f"involving:{f}"], ci[f"involving:{f}"], 1)})
    level = f"{100 * r['inference']['level']:.0f}%"
    return (f"Variance shares (fractions of the total sum of squares; {level} intervals for the "
            "population shares)", pd.DataFrame(rows))


def terms_table(r: dict) -> Table:
    att = r["attribution"]
    rows = [{"term": t["term"], "group": t["group"], "df": num(t["df"], "g"), "SS": num(t["ss"], ".4g"),
             "F": num(t["F"], ".3g"), "p": p_text(t["p"]), "eta2 %": with_ci(t["eta2"], t["eta2_ci"], 1),
             "partial eta2 %": with_ci(t["partial_eta2"], t["partial_eta2_ci"], 1),
             "omega2 %": with_ci(t["omega2"], t["omega2_ci"], 1)} for t in att["terms"]]
    res = att["residual"]
    rows.append({"term": f"residual ({att['residual_name']})", "group": "residual", "df": num(res["df"], "g"),
                 "SS": num(res["ss"], ".4g"), "F": "", "p": "", "eta2 %": with_ci(res["share"], res["share_ci"], 1),
                 "partial eta2 %": "", "omega2 %": ""})
    kind = "II" if att["anova_type"] == 2 else "III"
    title = (f"ANOVA on final top-1: Type {kind} ({att['why_type']}), sum contrasts, "
             f"interactions up to order {att['max_order']}, n={att['n']}")
    return title, pd.DataFrame(rows)


def means_table(r: dict) -> Table | None:
    comp = r.get("comparisons", {})
    if not comp.get("settings"):
        return None
    rows = []
    for s in comp["settings"]:
        row = {"setting": s["setting"]}
        for m in comp["methods"]:
            mean = s["means"][m]
            rank = s["ranks"].get(m)
            row[m] = "-" if mean is None else f"{with_ci(mean, s['ci'][m], 1)} #{rank:g}"
        for b, cell in s.get("baselines", {}).items():
            row[f"{b} (baseline)"] = "-" if cell["mean"] is None else with_ci(cell["mean"], cell["ci"], 1)
        rows.append(row)
    level = f"{100 * comp['level']:.0f}%"
    return (f"Method means per setting: top-1 % [{level} t interval over seeds], #rank among the methods "
            "(1 = best); baselines beside, under their own recipe", pd.DataFrame(rows))


def _test_columns(p: dict) -> dict:
    return {"difference (points)": with_ci(p["diff"], p["ci"]), "seeds": p["seeds"], "t p": p_text(p["p_t"]),
            "sign-flip p": p_text(p["p_sign_flip"]), "adjusted p": p_text(p["p_adjusted"]),
            "significant": "yes" if p["significant"] else "no"}


def paired_table(r: dict, limit: int | None = None) -> Table | None:
    comp = r.get("comparisons", {})
    paired = comp.get("paired")
    if not paired:
        return None
    rows = [{"setting": p["setting"], "a - b": f"{p['a']} - {p['b']}", **_test_columns(p)} for p in paired]
    frame = pd.DataFrame(rows)
    more = "" if limit is None or len(frame) <= limit else f" (first {limit} of {len(frame)}; all in --format json)"
    return (f"Paired method differences (seed by seed; t interval per comparison; p adjusted by "
            f"{comp['correction']} over all {len(paired)}){more}", frame.head(limit) if limit else frame)


def baselines_tables(r: dict, limit: int | None = None) -> list[Table]:
    comp = r.get("comparisons", {})
    out = []
    for b, section in comp.get("versus_baselines", {}).items():
        rows = section.get("rows")
        if not rows:
            continue
        frame = pd.DataFrame([{"setting": x["setting"], "method": x["method"],
                               "method %": pct(x["method_mean"], 1), f"{b} %": pct(x["baseline_mean"], 1),
                               **_test_columns(x)} for x in rows])
        more = "" if limit is None or len(frame) <= limit else f" (first {limit} of {len(frame)})"
        out.append((f"Each method against {b} under the same recipe (method - {b}; p adjusted by "
                    f"{comp['correction']} over the {len(rows)}){more}", frame.head(limit) if limit else frame))
    return out


def kendall_table(r: dict, limit: int | None = None) -> Table | None:
    kendall = r.get("comparisons", {}).get("kendall")
    if not kendall:
        return None
    rows = [{"setting A": k["a"], "setting B": k["b"], "tau": num(k["tau"], ".2f"), "methods": k["methods"],
             "order flips": k["flips"], "real flips": k["significant_flips"]} for k in kendall]
    frame = pd.DataFrame(rows)
    more = "" if limit is None or len(frame) <= limit else f" (first {limit} of {len(frame)}; all in --format json)"
    return (f"Kendall tau-b between method rankings (descriptive; a flip is real when both paired differences are "
            f"significant){more}", frame.head(limit) if limit else frame)


def flips_table(r: dict, limit: int | None = None) -> Table | None:
    flips = r.get("comparisons", {}).get("flips")
    if not flips:
        return None
    rows = [{"settings": " vs ".join(f["settings"]), "pair": f"{f['a']} / {f['b']}",
             "a - b (points)": " vs ".join(pct(d) for d in f["diff_a_minus_b"]),
             "real (both significant)": "yes" if f["significant"] else "no"} for f in flips]
    frame = pd.DataFrame(rows).sort_values("real (both significant)", ascending=False, kind="stable")
    more = "" if limit is None or len(frame) <= limit else f" (first {limit} of {len(frame)}; all in --format json)"
    return f"Ranking flips: method pairs whose order differs between two settings{more}", \
        frame.head(limit) if limit else frame


def spread_table(r: dict) -> Table | None:
    spread = r.get("comparisons", {}).get("spread")
    if not spread:
        return None
    rows = [{"setting": s["setting"], "best": s["best"], "worst": s["worst"],
             "spread (points)": with_ci(s["spread"], s["ci"], 1), "methods": s["methods"]} for s in spread]
    return ("Spread: best minus worst method mean per setting (interval simultaneous over the setting's method "
            "pairs)", pd.DataFrame(rows))


def native_table(r: dict) -> Table | None:
    nvs = r.get("comparisons", {}).get("native_vs_shared", {})
    if "rows" not in nvs:
        return None
    rows = [{"other factors": ", ".join(f"{k}={v}" for k, v in n["others"].items()) or "-",
             "shared protocol": n["shared"],
             "spread, native presets": with_ci(n["spread_native"], n["spread_native_ci"], 1),
             "spread, shared protocol": with_ci(n["spread_shared"], n["spread_shared_ci"], 1),
             "reduction (points)": with_ci(n["reduction"], n["reduction_ci"], 1)} for n in nvs["rows"]]
    return (f"Spread under each method's native preset vs under one shared protocol (RD3's comparison; intervals "
            f"{nvs['interval']})", pd.DataFrame(rows))


def costs_table(r: dict) -> Table | None:
    from .design import COSTS

    rows = r.get("costs")
    if not rows:
        return None
    names = [c for c in COSTS if c in rows[0]]
    frame = pd.DataFrame([{"method": x["method"] + (" (baseline)" if x["role"] == "baseline" else ""),
                           **{COSTS[c]: num(x[c], ".4g") for c in names}} for x in rows])
    return "Costs per method: mean over its cells (stored soft labels are 0 for hard and on-the-fly labels)", frame


def ddranking_tables(r: dict) -> list[Table]:
    dd = r.get("ddranking", {})
    out = []
    titles = {"hlr": "HLR = Acc(full_real, hard) - Acc(method, hard) (points)",
              "ior": "IOR = Acc(method) - Acc(random_real) under the method's recipe (points)",
              "lrs": "LRS (DD-Ranking label robustness score, 0-1)", "ars": "ARS (augmentation robustness score, 0-1)"}
    for key, title in titles.items():
        rows = dd.get(key, {}).get("rows")
        if not rows:
            continue
        scaled = key in ("hlr", "ior")
        out.append((title, pd.DataFrame([{"method": x["method"], "setting": x["setting"],
                                          "value": with_ci(x["value"], x["ci"]) if scaled else
                                          f"{num(x['value'], '.3f')} [{num(x['ci'][0], '.3f')}, "
                                          f"{num(x['ci'][1], '.3f')}]"} for x in rows])))
    return out


def absent_notes(r: dict) -> list[str]:
    notes = []
    comp = r.get("comparisons", {})
    if "absent" in comp:
        notes.append(f"comparisons: {comp['absent']}")
    elif "absent" in comp.get("native_vs_shared", {}):
        notes.append(f"native vs shared spread: {comp['native_vs_shared']['absent']}")
    dd = r.get("ddranking", {})
    if "absent" in dd:
        notes.append(f"DD-Ranking metrics: {dd['absent']}")
    for key in ("hlr", "ior", "lrs", "ars"):
        if "absent" in dd.get(key, {}):
            notes.append(f"DD-Ranking {key.upper()}: not computed: {dd[key]['absent']}")
    return notes


def not_analysed_table(r: dict) -> Table | None:
    rows = r["cells"]["not_analysed"]
    if not rows:
        return None
    frame = pd.DataFrame([{"cell": x["cell_key"][:10], "seed": x["seed"], "status": x["status"], "reason": x["reason"],
                           **x["factors"]} for x in rows])
    return f"Cells not analysed ({len(rows)} of {r['cells']['stored']} stored)", frame


def design_lines(r: dict) -> list[str]:
    d, c = r["design"], r["cells"]
    status = ", ".join(f"{v} {k}" for k, v in sorted(c["by_status"].items()))
    lines = [f"study {r['study']}: {c['stored']} cells stored ({status}); {c['analysed']} analysed",
             f"methods: {', '.join(d['methods']) or 'none'}; baselines (beside, not in the model): "
             f"{', '.join(d['baselines']) or 'none'}",
             f"factors: " + (", ".join(f"{f} [{_group(d, f)}] ({len(d['levels'][f])} levels)"
                                      for f in d["factors"]) or "none vary"),
             f"seeds: {d['seeds']}; design {'balanced' if d['balanced'] else 'UNBALANCED'}: "
             f"{d['combinations']} combinations, {d['combinations_missing']} empty, "
             f"{d['seeds_per_combination_min']}-{d['seeds_per_combination_max']} seeds each"]
    for f, why in d["left_out_of_model"].items():
        lines.append(f"factor {f} left out of the model: {why}")
    for combo in [c for c in d["missing"] if c][:20]:
        lines.append("empty combination: " + ", ".join(f"{k}={v}" for k, v in combo.items()))
    if len(d["missing"]) > 20:
        lines.append(f"... and {len(d['missing']) - 20} more empty combinations (all in --format json)")
    return lines


def _group(d: dict, f: str) -> str:
    return next(g for g, members in d["groups"].items() if f in members)


def all_tables(r: dict, limit: int | None = None) -> list[Table]:
    if "attribution" not in r:
        return [t for t in [not_analysed_table(r)] if t]
    attributed = [] if "absent" in r["attribution"] else [shares_table(r), terms_table(r)]
    tuned = tuning_table(r["tuning"], pct, with_ci) if "tuning" in r else None
    tables = [*attributed, tuned, means_table(r), paired_table(r, limit), *baselines_tables(r, limit), spread_table(r),
              native_table(r), kendall_table(r, limit), flips_table(r, limit), *ddranking_tables(r),
              costs_table(r), not_analysed_table(r)]
    return [t for t in tables if t is not None]


def format_text(r: dict, limit: int | None = 30) -> str:
    """The terminal rendering of ``analyze``'s result."""
    parts = design_lines(r)
    notes = r.get("attribution", {}).get("notes", []) + absent_notes(r)
    for title, frame in all_tables(r, limit):
        parts += ["", title, frame.to_string(index=False)]
    if notes:
        parts += ["", "Notes:"] + [f"- {n}" for n in notes]
    parts += ["", "Headlines:"] + [f"- {h}" for h in r["headlines"]]
    return "\n".join(parts)

