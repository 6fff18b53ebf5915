"""``ppcl select``: intervals under a budget from probe.json -> plan.json (no model needed)."""

from __future__ import annotations

import argparse

HELP = "choose intervals to prune under a budget from probe.json -> plan.json"


def _blocks(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe", required=True, help="probe.json from ppcl probe")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep-params", type=float, help="fraction of transformer parameters to keep, in (0, 1]")
    budget.add_argument("--remove-blocks", type=int, help="number of blocks to remove")
    parser.add_argument("--method", default="ppcl", choices=["ppcl", "shortgpt", "angular", "uniform", "random"],
                        help="selector (default ppcl)")
    parser.add_argument("--protect", type=_blocks, default=[], help="blocks never removed, e.g. 0,5,7")
    parser.add_argument("--allow-ends", action="store_true", help="allow removing the first/last block")
    parser.add_argument("--init", default="middle", choices=["middle", "first", "last"],
                        help="teacher block each plug starts from (default middle)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selector (default 0)")
    parser.add_argument("--min-cka", type=float, default=None, help="ppcl: CKA threshold of flat runs")
    parser.add_argument("--max-jump", type=float, default=None, help="ppcl: largest |trend| inside a run")
    parser.add_argument("--break-cost", type=float, default=None,
                        help="ppcl: cost of each place an interval leaves a flat run (default 1.0 = an unpredictable interval)")
    parser.add_argument("--out", required=True, help="plan.json to write")
    parser.add_argument("--plot", default=None,
                        help="folder for trend.png with the intervals marked (default: beside plan.json)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw trend.png")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ppcl.plan import format_plan, save_plan
    from ppcl.probe import load_probe
    from ppcl.select import select

    probe = load_probe(args.probe)
    options = {k: v for k, v in (("min_cka", args.min_cka), ("max_jump", args.max_jump),
                                                    ("break_cost", args.break_cost)) if v is not None}
    plan = select(probe, method=args.method, keep_params=args.keep_params, remove_blocks=args.remove_blocks,
                  protect=args.protect, allow_ends=args.allow_ends, init=args.init, seed=args.seed, **options)
    plan.selection["probe"] = str(args.probe)
    save_plan(plan, args.out)
    if not args.no_plot:
        from ppcl.plots import plot_trend

        folder = Path(args.plot) if args.plot else Path(args.out).parent
        plot_trend(probe, folder / f"{Path(args.out).stem}_trend.png", intervals=[list(iv) for iv in plan.intervals])
    print(format_plan(plan))
    print(f"wrote {args.out}")
    return 0
