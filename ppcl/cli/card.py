"""``ppcl card``: put an evaluation into an export's model card (README.md)."""

from __future__ import annotations

import argparse

HELP = "fill the evaluation table of an export's model card (README.md) from a `ppcl evaluate` metrics.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PRUNED", help="export folder written by `ppcl export`")
    parser.add_argument("--metrics", required=True, metavar="METRICS_JSON",
                        help="metrics.json of a `ppcl evaluate` run that evaluated PRUNED")


def run(args: argparse.Namespace) -> int:
    from ppcl.modelcard import set_evaluation

    print(f"evaluation table from {args.metrics} -> {set_evaluation(args.model, args.metrics)}")
    return 0
