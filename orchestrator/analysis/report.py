"""``report``: one Markdown file (figures linked beside it) and one
self-contained HTML file (figures embedded as base64) with the study
definition, the headline sentences, the tables, the figures and provenance.

Both are rendered from the same list of blocks, so they always agree."""
from __future__ import annotations

import base64
import html
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from db.queries import provenance_frame, study_spec_text

from .tables import absent_notes, all_tables, design_lines

FIGURES = {
    "variance_shares": "Where the accuracy differences come from: grouped shares and eta^2 per ANOVA term.",
    "main_effects": "Main effects: mean final top-1 per factor level.",
    "interactions": "Interactions: one line per method (or per level of the first factor) over each other factor.",
    "rank_bump": "Method ranks per protocol setting; crossing lines are ranking flips.",
    "learning_curves": "Learning curves: training loss per epoch, test top-1 at evaluated epochs.",
    "accuracy_vs_cost": "Accuracy against cost (synthesis time, image and label storage, post-evaluation "
                        "GPU/CPU hours, training time); baselines beside the methods.",
    "tuning_budget": "Fair tuning: each method's best held-out accuracy against the epochs its search spent.",
}
IGNORED_PROVENANCE = ("cell_key", "attempt")
TABLE_LIMIT = 200


def provenance_section(engine, study: str) -> list[tuple[str, Any]]:
    frame = provenance_frame(engine, study)
    if frame.empty:
        return [("p", "Not recorded: no attempt of this study's cells has provenance (commit, package versions "
                      "and hardware are not stored for these results).")]
    rows = []
    for col in frame.columns:
        if col in IGNORED_PROVENANCE or col.endswith("_at"):
            continue
        counts = frame[col].astype(str).value_counts()
        shown = "; ".join(f"{v} ({n})" if len(counts) > 1 else v for v, n in counts.head(5).items())
        more = f"; ... {len(counts) - 5} more values" if len(counts) > 5 else ""
        rows.append({"field": col, "values (attempts)": shown + more})
    return [("p", f"Recorded with each attempt ({len(frame)} attempts of this study's cells)."),
            ("table", ("Provenance", pd.DataFrame(rows)))]


def analysis_environment() -> str:
    import matplotlib
    import numpy
    import scipy
    import statsmodels

    return (f"Analysis run {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} with Python {platform.python_version()}, "
            f"numpy {numpy.__version__}, pandas {pd.__version__}, scipy {scipy.__version__}, "
            f"statsmodels {statsmodels.__version__}, matplotlib {matplotlib.__version__}.")


def build_blocks(engine, result: dict, figures: list[Path]) -> list[tuple[str, Any]]:
    study = result["study"]
    inf = result["inference"]
    blocks: list[tuple[str, Any]] = [("h1", f"Study report: {study}")]
    blocks.append(("p", f"THE result is `top1`, the final-epoch test accuracy (never selected on the test set). "
                        f"Intervals at {100 * inf['level']:.0f}%, the seed as the unit of replication: Student t "
                        "over seeds for means and paired differences (an exact sign-flip p beside each test), "
                        f"{inf['correction']} correction over each family of comparisons, intervals for the "
                        "population shares of variance. Baselines are shown beside the methods, outside their ANOVA, "
                        "spread and ranks. Definitions and sources: docs/ANALYSIS.md."))
    blocks += [("h2", "Headlines"), ("ul", result["headlines"])]
    blocks += [("h2", "Design"), ("ul", design_lines(result))]
    notes = result.get("attribution", {}).get("notes", []) + absent_notes(result)
    if notes:
        blocks += [("h3", "Notes"), ("ul", notes)]
    blocks.append(("h2", "Tables"))
    for title, frame in all_tables(result, TABLE_LIMIT):
        blocks.append(("table", (title, frame)))
    blocks.append(("h2", "Figures"))
    order = list(FIGURES)
    for path in sorted(figures, key=lambda p: order.index(p.stem) if p.stem in order else len(order)):
        if path.suffix == ".png":
            blocks.append(("figure", (path, FIGURES.get(path.stem, path.stem))))
    blocks += [("h2", "Study definition"), ("p", "As stored in the database when the study last ran:"),
               ("pre", study_spec_text(engine, study) or "(not stored)")]
    blocks += [("h2", "Provenance"), *provenance_section(engine, study), ("p", analysis_environment())]
    return blocks


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(blocks) -> str:
    out = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + content)
        elif kind == "p":
            out.append(content)
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in content))
        elif kind == "pre":
            out.append("```yaml\n" + content.rstrip() + "\n```")
        elif kind == "table":
            title, frame = content
            out.append(f"**{title}**\n\n{markdown_table(frame)}")
        elif kind == "figure":
            path, caption = content
            out.append(f"![{caption}]({path.name})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}pre{background:#f6f6f6;padding:1em;overflow-x:auto}
figure{margin:1em 0 2em}img{max-width:100%}figcaption{font-style:italic;color:#555}caption{text-align:left;
font-weight:bold;padding:.3em 0}"""


def to_html(blocks, title: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(content)}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in content) + "</ul>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(content)}</pre>")
        elif kind == "table":
            title_, frame = content
            table = frame.to_html(index=False, border=0, escape=True)
            out.append(table.replace("<thead>", f"<caption>{html.escape(title_)}</caption><thead>", 1))
        elif kind == "figure":
            path, caption = content
            data = base64.b64encode(path.read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(engine, result: dict, figures: list[Path], out: Path) -> tuple[Path, Path]:
    blocks = build_blocks(engine, result, figures)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, f"Study report: {result['study']}"))
    return md, page
