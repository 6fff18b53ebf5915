"""``ppcl report``: one offline HTML page comparing several evaluation runs (quality vs parameters vs latency)."""

from __future__ import annotations

import argparse

HELP = "compare evaluation runs (metrics.json) across pruning ratios: table + plots in one offline HTML page"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", nargs="+", required=True, metavar="METRICS_JSON",
                        help="metrics.json files written by `ppcl evaluate` (a grid.png beside one is embedded)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: report.html, quality_vs_parameters.png, latency_vs_parameters.png")
    parser.add_argument("--title", default="ppcl: pruning ratios compared", help="page title")


def run(args: argparse.Namespace) -> int:
    from ppcl.report import build_report

    result = build_report(args.metrics, args.out, title=args.title)
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"{len(result.rows)} models from {len(args.metrics)} runs -> {result.report_path}")
    return 0
