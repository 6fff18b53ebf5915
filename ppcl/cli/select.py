"""``ppcl select``: intervals under a budget from probe.json -> plan.json (no model needed)."""

from __future__ import annotations

import argparse

HELP = "choose intervals to prune under a budget from probe.json -> plan.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ppcl.settings import SelectSettings, add_settings_arguments

    parser.add_argument("--probe", required=True, help="probe.json from ppcl probe")
    # the budget: exactly one of the two (the pipeline always gives keep_params, the smallest ratio)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep-params", type=float,
                        help=SelectSettings.model_fields["keep_params"].description.split(" (")[0] + ", in (0, 1]")
    budget.add_argument("--remove-blocks", type=int, help="number of blocks to remove")
    add_settings_arguments(parser, SelectSettings, exclude=("keep_params",))
    parser.add_argument("--out", required=True, help="plan.json to write")
    parser.add_argument("--plot", default=None,
                        help="folder for <plan>_trend.png (the probe's trend with the chosen intervals shaded; "
                             "--out runs/plan.json writes plan_trend.png) (default: the folder of --out)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw <plan>_trend.png")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ppcl.plan import format_plan, save_plan
    from ppcl.probe import load_probe
    from ppcl.select import check_score, select
    from ppcl.settings import SelectSettings, settings_from_args

    cfg = settings_from_args(SelectSettings, args)
    probe = load_probe(args.probe)
    check_score(probe, cfg.score, f"probe file {args.probe}")
    options = {k: getattr(cfg, k) for k in ("min_cka", "max_jump", "break_cost") if getattr(cfg, k) is not None}
    plan = select(probe, method=cfg.method, keep_params=cfg.keep_params, remove_blocks=args.remove_blocks,
                  protect=cfg.protect, allow_ends=cfg.allow_ends, init=cfg.init, seed=cfg.seed, score=cfg.score,
                  serve=cfg.serve, serve_subsets=cfg.serve_subsets, **options)
    plan.selection["probe"] = str(args.probe)
    save_plan(plan, args.out)
    if not args.no_plot:
        from ppcl.plots import plot_trend

        folder = Path(args.plot) if args.plot else Path(args.out).parent
        plot_trend(probe, folder / f"{Path(args.out).stem}_trend.png", intervals=[list(iv) for iv in plan.intervals])
    from ppcl.tracking import log_command

    log_command("select", {"keep_params": cfg.keep_params, "predicted_keep": plan.params.student / plan.params.teacher,
                           "intervals": len(plan.intervals), "blocks_removed": sum(e - s for s, e in plan.intervals),
                           "teacher_params": plan.params.teacher, "student_params": plan.params.student},
                args.out, cfg.model_dump(mode="json"))  # fmt: skip
    print(format_plan(plan))
    print(f"wrote {args.out}")
    return 0
