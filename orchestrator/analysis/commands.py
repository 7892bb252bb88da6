"""The ``analyze``, ``plot`` and ``report`` commands, and the short analysis that
ends ``run``. Reading commands never write to the database, and refuse a
database file that does not exist instead of creating an empty one."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from db.queries import epoch_frame, list_studies, results_frame
from db.session import DatabaseError, make_engine, sqlite_url

from .analyze import CORRECTION, LEVEL, analyze_design
from . import summary
from .design import AnalysisError, load_design
from .inference import CORRECTIONS
from .tables import format_text

if TYPE_CHECKING:
    from ..study.spec import Study


@dataclass(frozen=True)
class AnalysisOptions:
    study: str  # a study name, or the path of its YAML file
    out: Path = Path("results")
    db: str | None = None
    level: float = LEVEL
    correction: str = CORRECTION  # a key of inference.CORRECTIONS


def study_name(arg: str) -> str:
    """A study name, or the name inside a study file given by path."""
    path = Path(arg)
    if arg.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise AnalysisError(f"{arg}: no such study file")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise AnalysisError(f"{arg}: YAML error: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise AnalysisError(f"{arg}: name: expected the study's name (a string)")
        return data["name"]
    return arg


def open_study(options: AnalysisOptions):
    """(engine, study name, output folder) after checking that both exist."""
    name = study_name(options.study)
    if options.db:
        url = options.db
        parsed = _sqlite_file(url)
        if parsed is not None and not parsed.is_file():
            raise DatabaseError(f"no results database at {parsed} (from --db {url})")
    else:
        path = options.out / "rd3.sqlite"
        if not path.is_file():
            raise DatabaseError(f"no results database at {path}: run the study first "
                                f"(python -m orchestrator run STUDY.yaml --out {options.out}) or pass --db URL")
        url = sqlite_url(path)
    engine = make_engine(url)
    try:
        known = list_studies(engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read results from {url}: {exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0]}") from None
    if name not in known:
        raise AnalysisError(f"study {name!r} is not in {url} (studies there: {', '.join(known) or 'none'})")
    if not options.level or not 0 < options.level < 1:
        raise AnalysisError(f"--level: expected a fraction in (0, 1), got {options.level}")
    if options.correction not in CORRECTIONS:
        raise AnalysisError(f"--correction: expected one of {', '.join(CORRECTIONS)}, got {options.correction!r}")
    return engine, name, options.out / name


def _sqlite_file(url: str) -> Path | None:
    """The file behind a SQLite URL (None for other engines, in-memory or bad URLs):
    connecting would silently create it, and a reading command must not."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # make_engine reports bad URLs
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def jsonable(value: Any) -> Any:
    """Plain JSON: NaN and infinities as null, numpy scalars as numbers, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_analysis(options: AnalysisOptions):
    engine, name, folder = open_study(options)
    design = load_design(engine, name)
    if design.cells.empty:
        raise AnalysisError(f"study {name!r} has no cells in the database")
    result = jsonable(analyze_design(design, options.level, options.correction))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analysis.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    return engine, name, folder, design, result


def cmd_analyze(options: AnalysisOptions, fmt: str) -> int:
    _, _, folder, _, result = run_analysis(options)
    if fmt == "json":
        print(json.dumps(result, allow_nan=False))
    else:
        print(format_text(result))
        print(f"\nwrote {folder / 'analysis.json'}")
    return 0


def make_plots(engine, name: str, design, result: dict, options: AnalysisOptions, folder: Path) -> list[Path]:
    from .curves import plot_all

    return plot_all(design, result, epoch_frame(engine, name), folder, options.level)


def cmd_plot(options: AnalysisOptions) -> int:
    engine, name, folder, design, result = run_analysis(options)
    for p in make_plots(engine, name, design, result, options, folder):
        print(f"wrote {p}")
    return 0


def cmd_report(options: AnalysisOptions) -> int:
    from .report import write_report

    engine, name, folder, design, result = run_analysis(options)
    figures = make_plots(engine, name, design, result, options, folder)
    md, page = write_report(engine, result, figures, folder)
    for line in result["headlines"]:
        print(f"- {line}")
    print(f"wrote {md}\nwrote {page}")
    return 0


def run_summary(engine, name: str, folder: Path) -> list[Path]:
    """The quick analysis at the end of ``run``: shares with intervals, the
    headline sentences, analysis.json, the main-effects and variance-share plots."""
    from .plots import main_effects_plot, shares_plot

    design = load_design(engine, name)
    if design.frame.empty:
        return []
    result = jsonable(analyze_design(design))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "analysis.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    if "attribution" in result:
        print(f"\nwhere the variance comes from (full analysis: python -m orchestrator report {name}):")
        for line in result["headlines"]:
            print(f"- {line}")
    return [*main_effects_plot(design, folder), *shares_plot(result, folder), folder / "analysis.json"]


def summarise(engine, study: Study, out: Path) -> None:
    """Mean and std per factor combination and per level on the terminal, CSVs,
    then the quick attribution (shares with intervals, headlines, analysis.json,
    main-effects and variance-share plots)."""
    raw = results_frame(engine, study.name)
    folder = out / study.name
    folder.mkdir(parents=True, exist_ok=True)
    if raw.empty:
        print("no results yet")
        return
    # Factor levels as strings in the study's order (mappings as JSON), only finite top1.
    design = load_design(engine, study.name)
    frame, factors = design.analysed(), list(design.levels)
    combos = summary.combination_table(frame, factors)
    effects = summary.main_effects(frame, factors)
    print(f"\nfinal top-1 (%), mean and std over seeds, per factor combination:")
    print(summary.format_table(combos))
    if not effects.empty:
        print(f"\nper factor level (main effects):")
        print(summary.format_table(effects))
    missing = design.not_analysed()
    if len(missing):
        print(f"\n{len(missing)} stored cell(s) not in these tables (" +
              ", ".join(f"{n} {s}" for s, n in missing["reason"].value_counts().items()) +
              f"): python -m orchestrator analyze {study.name} --out {out} lists them")
    raw.to_csv(folder / "results.csv", index=False)
    combos.to_csv(folder / "combinations.csv", index=False)
    effects.to_csv(folder / "main_effects.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"cells": len(raw), "factors": factors}, indent=1))
    try:
        written = run_summary(engine, study.name, folder)
    except Exception as exc:  # noqa: BLE001 - the results are stored; the analysis can be rerun alone
        print(f"warning: the analysis failed ({exc.__class__.__name__}: {exc}); results are stored: "
              f"rerun it with python -m orchestrator report {study.name} --out {out}", file=sys.stderr)
        written = []
    for p in written:
        print(f"wrote {p}")

