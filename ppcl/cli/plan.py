"""``ppcl plan show plan.json``: print a plan as a readable table (validates it)."""

from __future__ import annotations

import argparse

HELP = "inspect a plan: ppcl plan show plan.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the plan's intervals, width ops and parameter counts")
    show.add_argument("plan", help="plan.json")


def run(args: argparse.Namespace) -> int:
    from ppcl.plan import format_plan, load_plan

    print(format_plan(load_plan(args.plan)))
    return 0
