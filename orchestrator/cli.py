"""Command line: ``python -m orchestrator <command>``.

User mistakes (a bad study file, a missing dataset, a bad database URL) print
one clear message per problem and exit with status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from db.session import DatabaseError
from rd3core.data import list_datasets
from rd3core.models import list_models
from rd3core.protocol import list_presets
from rd3core.synth import list_methods

from .spec import StudyError

LISTS = {"presets": list_presets, "datasets": list_datasets, "models": list_models, "methods": list_methods}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator",
                                     description="RD3 Bench: fair post-evaluation studies for dataset distillation")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study (resumes: finished cells are skipped)")
    run.add_argument("study", type=Path)
    run.add_argument("--out", type=Path, default=Path("results"),
                     help="results folder: rd3.sqlite, artifacts/, <study>/ (default: results)")
    run.add_argument("--db", help="SQLAlchemy URL of the results DB (default: sqlite in --out)")
    run.add_argument("--executor", choices=["ray", "local"], default="ray",
                     help="ray (default) or local: in-process, for debugging, same numbers")
    run.add_argument("--address", help="join a running Ray cluster (default: RAY_ADDRESS or an embedded instance)")
    run.add_argument("--num-cpus", type=int, help="CPUs for the embedded Ray instance (default: all usable)")
    run.add_argument("--num-gpus", type=int, help="GPUs for the embedded Ray instance (default: all visible)")

    validate = sub.add_parser("validate", help="check a study file; print every problem")
    validate.add_argument("study", type=Path)

    lst = sub.add_parser("list", help="print registered names, one per line")
    lst.add_argument("what", choices=sorted(LISTS))

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
        reader.add_argument("--db", help="SQLAlchemy URL of the results DB (default: sqlite in --out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(LISTS[args.what]()))
            return 0
        if args.command == "validate":
            from .expand import expand
            from .spec import load_study

            study = load_study(args.study)
            cells = expand(study)
            print(f"{args.study}: ok ({len(cells)} cells)")
            return 0
        if args.command in ("query", "status"):
            from .query import run_query, show_status

            return run_query(args) if args.command == "query" else show_status(args)
        if args.command == "run":
            from .driver import RunOptions, run_study

            return run_study(args.study, RunOptions(out=args.out, db=args.db, executor=args.executor,
                                                    address=args.address, num_cpus=args.num_cpus,
                                                    num_gpus=args.num_gpus))
    except StudyError as exc:
        for message in exc.messages:
            print(f"error: {message}", file=sys.stderr)
        return 2
    except DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DBAPIError as exc:  # the database failed under a running command (disk full, server gone, ...)
        detail = str(exc.orig or exc).strip().splitlines()[0]
        print(f"error: results database: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: results committed so far are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0
