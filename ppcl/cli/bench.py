"""``ppcl bench``: benchmarks on the shipped reference teacher.

``ppcl bench quality [--out DIR] [--smoke]``: the quality table of issue 9 (:mod:`ppcl.bench.quality`):
teacher, PPCL, no distillation, four baseline selectors and three ablations at keep-params 0.7 and 0.5, written
as DIR/quality.md, quality.json and quality.png (DIR/work keeps the cache, probe, plans, runs and models).
"""

from __future__ import annotations

import argparse

HELP = "benchmarks on the reference teacher: `ppcl bench quality` (PPCL vs baselines and ablations)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    q = sub.add_parser("quality", help="PPCL vs baselines and ablations at keep-params 0.7 and 0.5 (<= 30 min)",
                       description="PPCL vs baselines and ablations on the reference teacher: one table "
                                   "(quality.md, quality.json, quality.png).")
    q.add_argument("--out", default="ppcl-bench/quality", help="output folder (default ppcl-bench/quality)")
    q.add_argument("--smoke", action="store_true",
                   help="a few steps and prompts on a subset of rows: checks the machinery in a minute")
    q.add_argument("--steps", type=int, default=None, help="distillation steps of every run (default 400)")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    q.add_argument("--teacher", default=None, help="pipeline folder (default: the shipped reference teacher)")
    q.add_argument("--no-keep-work", action="store_true", help="delete OUT/work at the end")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ppcl.bench.quality import QualitySettings, run_quality
    from ppcl.errors import PPCLError

    s = QualitySettings.smoke() if args.smoke else QualitySettings()
    if args.steps is not None:
        if args.steps < 1:
            raise PPCLError(f"--steps must be >= 1 (got {args.steps})")
        s = dataclasses.replace(s, steps=args.steps)
    if args.threads is not None:
        if args.threads < 1:
            raise PPCLError(f"--threads must be >= 1 (got {args.threads})")
        s = dataclasses.replace(s, threads=args.threads)
    result = run_quality(args.out, s, teacher=args.teacher, keep_work=not args.no_keep_work)
    from pathlib import Path

    print((Path(args.out) / "quality.md").read_text())
    print(f"wrote {args.out}/quality.md, quality.json, quality.png in {result['seconds']['total'] / 60:.1f} min")
    return 0
