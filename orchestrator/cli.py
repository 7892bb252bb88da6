"""Command line: ``python -m orchestrator <command>``.

User mistakes (a bad study file, a missing dataset, a bad database URL) print
one clear message per problem and exit with status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from db.session import DatabaseError
from rd3core.data import data_env_var, list_datasets
from rd3core.models import list_models
from rd3core.protocol import list_presets
from rd3core.synth import list_methods
from rd3core.teachers import CheckpointError, list_layouts

from .study import yamlsrc
from .analysis.design import AnalysisError
from .study.spec import StudyError, list_bounds

# A cluster's PostgreSQL URL (with its password) comes from the environment, never
# a study file or a command line that `ps` shows.
DEFAULT_DB = os.environ.get("RD3_DB_URL") or None
DB_HELP = "SQLAlchemy URL of the results DB (default: $RD3_DB_URL, else sqlite in --out)"

LISTS = {"presets": list_presets, "datasets": list_datasets, "models": list_models, "methods": list_methods,
         "layouts": list_layouts, "bounds": list_bounds}


def build_parser(prog: str = "python -m orchestrator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="RD3 Bench: fair post-evaluation studies for dataset distillation")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study (resumes: finished cells are skipped)")
    run.add_argument("study", type=Path)
    run.add_argument("--out", type=Path, default=Path("results"),
                     help="results folder: rd3.sqlite, artifacts/, <study>/ (default: results)")
    run.add_argument("--db", default=DEFAULT_DB, help=DB_HELP)
    run.add_argument("--executor", choices=["ray", "local"], default="ray",
                     help="ray (default) or local: in-process, for debugging, same numbers")
    run.add_argument("--address", help="join a running Ray cluster (default: RAY_ADDRESS or an embedded instance)")
    run.add_argument("--num-cpus", type=int, help="CPUs for the embedded Ray instance (default: all usable)")
    run.add_argument("--num-gpus", type=int, help="GPUs for the embedded Ray instance (default: all visible)")
    run.add_argument("--max-retries", type=int, default=2, metavar="N",
                     help="run a job up to N more times after a transient failure: its worker or node died, memory "
                          "ran short (default 2; deterministic errors are never retried)")
    run.add_argument("--retry-failed", action="store_true",
                     help="also run cells whose last attempt failed deterministically (a plain rerun skips them)")
    run.add_argument("--heartbeat-s", type=float, default=5.0, metavar="S",
                     help="Ray jobs beat every S seconds; one silent for 12 beats, or whose node left the cluster, "
                          "is cancelled and retried (default 5)")
    run.add_argument("--dry-run", action="store_true",
                     help="print per stage how many runs are needed and cached, the cells, and a cost estimate "
                          "from past runs; run and write nothing")

    cache = sub.add_parser("cache", help="show or prune the stage artifact store")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    cache_list = cache_sub.add_parser("list", help="every artifact: stage, key, size, age, what made it")
    cache_list.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    gc = cache_sub.add_parser("gc", help="remove leftovers; with studies named, also every artifact none of them needs")
    gc.add_argument("studies", nargs="*", help="study files (or names recorded in the DB) whose artifacts are kept")
    gc.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    gc.add_argument("--db", default=DEFAULT_DB, 
                    help=DB_HELP + "; finds studies by name")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    gc.add_argument("--tmp-grace-s", type=float, default=3600.0,
                    help="keep temporary (publishing) folders written to within this many seconds (default 3600)")

    validate = sub.add_parser("validate", help="check a study file; print every problem")
    validate.add_argument("study", type=Path)
    for cmd in (run, validate):
        cmd.add_argument("--data", metavar="PATH", type=Path,
                         help="where the study's dataset is when the study gives no dataset.root: an ImageFolder "
                              "tree, a .tar.gz of one, or torchvision's CIFAR folder (sets RD3_DATA_<NAME>)")

    lst = sub.add_parser("list", help="print registered names, one per line")
    lst.add_argument("what", choices=sorted(LISTS))

    helps = {"analyze": "attribute accuracy differences to method, protocol, interaction and seeds (ANOVA, "
                        "paired differences, rankings, DD-Ranking metrics)",
             "plot": "write the study's plots (PNG and PDF) under OUT/<study>/",
             "report": "write OUT/<study>/report.md and a self-contained report.html"}
    for name, text in helps.items():
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("study", help="the study's name in the database, or its YAML file")
        cmd.add_argument("--out", type=Path, default=Path("results"),
                         help="results folder: the DB (OUT/rd3.sqlite unless --db) and OUT/<study>/ for outputs")
        cmd.add_argument("--db", default=DEFAULT_DB, help=DB_HELP)
        cmd.add_argument("--level", type=float, default=0.95,
                         help="interval level; tests are at 1 - level (default 0.95)")
        cmd.add_argument("--correction", default="holm", metavar="NAME",
                         help="multiplicity correction over each family of comparisons: holm (default), bonferroni, "
                              "fdr_bh or none")
        if name == "analyze":
            cmd.add_argument("--format", choices=["table", "json"], default="table",
                             help="table (terminal) or json (one JSON object on stdout)")

    query = sub.add_parser("query", help="print results (read-only): the studies; a study's cells with typed "
                                         "factors and metrics (--study); or one SQL statement (--sql)")
    query.add_argument("--study", help="one row per finished cell of this study (default: list the studies)")
    query.add_argument("--where", action="append", default=[], metavar="FACTOR=VALUE",
                       help="keep cells with this factor level (repeat: several factors; the same factor twice: "
                            "either level)")
    query.add_argument("--sql", help='one read-only SQL statement, e.g. "SELECT name, count(*) FROM metric '
                                     'GROUP BY name" (writes are refused by the database)')
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")

    status = sub.add_parser("status", help="cells done / running / failed / pending of a study")
    status.add_argument("study")
    for reader in (query, status):
        reader.add_argument("--out", type=Path, default=Path("results"),
                            help="results folder whose rd3.sqlite to read (default: results)")
        reader.add_argument("--db", default=DEFAULT_DB, help=DB_HELP)
    return parser


def use_data_path(study: Path, data: Path) -> None:
    """``--data PATH``: the dataset's location for this process and the Ray workers
    it starts, as RD3_DATA_<NAME>. A location is not part of any cell's or stage's
    identity (the dataset's content fingerprint is), so the same study finds its
    results wherever its data lives."""
    name = yamlsrc.dataset_name(study)
    if name:  # otherwise the study's own errors say what is wrong
        os.environ[data_env_var(name)] = str(data.expanduser().resolve())


def main(argv: list[str] | None = None, prog: str = "python -m orchestrator") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    try:
        if getattr(args, "data", None) is not None:
            use_data_path(args.study, args.data)
        if args.command == "list":
            print("\n".join(LISTS[args.what]()))
            return 0
        if args.command == "validate":
            from .study.expand import expand
            from .study.spec import load_study

            study = load_study(args.study)
            cells = expand(study)
            columns = ", ".join(study.factor_columns) or "none"
            print(f"{args.study}: ok ({len(cells)} cells; design {study.spec.design.kind}; factors: {columns}; "
                  f"seeds: {', '.join(map(str, study.spec.seeds))})")
            return 0
        if args.command in ("query", "status"):
            from .query import run_query, show_status

            return run_query(args) if args.command == "query" else show_status(args)
        if args.command == "run":
            from .execution.driver import RunOptions, run_study

            if args.max_retries < 0 or not args.heartbeat_s > 0:
                print("error: --max-retries must be >= 0 and --heartbeat-s > 0", file=sys.stderr)
                return 2
            options = RunOptions(out=args.out, db=args.db, executor=args.executor, address=args.address,
                                 num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_retries=args.max_retries,
                                 retry_failed=args.retry_failed, heartbeat_s=args.heartbeat_s,
                                 command="python -m orchestrator " + shlex.join(argv))
            if args.dry_run:
                from .execution.cache import dry_run

                return dry_run(args.study, options)
            return run_study(args.study, options)
        if args.command == "cache":
            from .execution import cache
            from .execution.driver import RunOptions, db_url

            if args.cache_command == "list":
                return cache.list_cache(args.out)
            return cache.gc_cache(args.out, args.studies, db_url(RunOptions(out=args.out, db=args.db)),
                                  dry_run=args.dry_run, tmp_grace_s=args.tmp_grace_s)
        if args.command in ("analyze", "plot", "report"):
            from .analysis import commands

            options = commands.AnalysisOptions(args.study, args.out, args.db, args.level, args.correction)
            if args.command == "analyze":
                return commands.cmd_analyze(options, args.format)
            return commands.cmd_plot(options) if args.command == "plot" else commands.cmd_report(options)
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StudyError as exc:
        for message in exc.messages:
            print(f"error: {message}", file=sys.stderr)
        return 2
    except DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:  # a teacher's weights file changed or vanished after validation
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DBAPIError as exc:  # the database failed under a running command (disk full, server gone, ...)
        detail = str(exc.orig or exc).strip().splitlines()[0]
        print(f"error: results database: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("\ninterrupted: results committed so far are kept; rerun the same command to resume",
              file=sys.stderr)
        return getattr(exc, "exit_status", 130)
    return 0


def console() -> int:
    """The ``rd3`` console script: the same commands as ``python -m orchestrator``."""
    return main(prog="rd3")
