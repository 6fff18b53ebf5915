"""``ppcl bench``: benchmarks on the shipped reference teacher.

``ppcl bench quality [--out DIR] [--smoke]``: the quality table of issue 9 (:mod:`ppcl.bench.quality`):
teacher, PPCL, no distillation, four baseline selectors and three ablations at keep-params 0.7 and 0.5, written
as DIR/quality.md, quality.json and quality.png (DIR/work keeps the cache, probe, plans, runs and models).

``ppcl bench gpu [--out DIR] [--device cuda|cpu] [--small]``: the GPU check of issue 15 (:mod:`ppcl.bench.gpu`):
real-width Qwen-Image and FLUX blocks with random weights, planner vs measured peak memory, distill step / teacher
forward, probe overhead, pruned speedup vs the FLOP limit; DIR/gpu_check.json and gpu_check.md.
"""

from __future__ import annotations

import argparse

HELP = ("benchmarks: `ppcl bench quality` (PPCL vs baselines and ablations on the reference teacher), "
        "`ppcl bench gpu` (memory and speed checks on one GPU, no download)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    q = sub.add_parser("quality", help="PPCL vs baselines and ablations at keep-params 0.7 and 0.5 (<= 30 min)",
                       description="PPCL vs baselines and ablations on the reference teacher: one table "
                                   "(quality.md, quality.json, quality.png).")
    q.add_argument("--out", default="ppcl-bench/quality", help="output folder (default ppcl-bench/quality)")
    q.add_argument("--smoke", action="store_true",
                   help="a few steps and prompts on a subset of rows: checks the machinery in a minute")
    from ppcl.bench.quality import OPTIONAL_ROWS, SERVE_MODES, QualitySettings  # a dataclass, no torch: the defaults

    d = QualitySettings()
    q.add_argument("--steps", type=int, default=None, help=f"distillation steps of every run (default {d.steps})")
    q.add_argument("--batch-size", type=int, default=None,
                   help=f"distillation batch of every run (default {d.batch_size})")
    q.add_argument("--lr", type=float, default=None, help=f"learning rate of every run (default {d.lr:g})")
    q.add_argument("--output-loss-weight", type=float, default=None,
                   help=f"weight of the output-level loss in every run (default {d.output_loss_weight:g})")
    q.add_argument("--output-loss-keep", type=float, default=None,
                   help="probability each plug is in place for the output-level loss "
                        f"(default {d.output_loss_keep:g})")
    q.add_argument("--output-loss-sequential", type=float, default=None,
                   help="weight of loss D at each plug's end in the output-level term's whole-plan student, each "
                        f"plug fed what the plugs before it made (default {d.output_loss_sequential:g}; 0: off)")
    q.add_argument("--timesteps", choices=("uniform", "logit_normal"), default=None,
                   help=f"timestep sampling of every run (default {d.timesteps})")
    q.add_argument("--ema-decay", type=float, default=None,
                   help=f"moving average of the plug weights kept as each run's plugs (default {d.ema_decay:g}: off)")
    q.add_argument("--output-loss-ratios", default=None,
                   help="comma-separated ratios whose exported subsets the output-level loss also trains, in turn "
                        f"with the whole plan, or none (default {','.join(map(str, d.output_loss_ratios)) or 'none'})")
    q.add_argument("--output-loss-schedule", choices=("turns", "every_step"), default=None,
                   help="with --output-loss-ratios: one student per step in turn, or all of them every step "
                        f"(default {d.output_loss_schedule})")
    q.add_argument("--uncond-ratio", type=float, default=None,
                   help="share of training samples on the empty prompt, the unconditional branch true CFG runs "
                        f"(default {d.uncond_ratio:g})")
    q.add_argument("--train-seed", type=int, default=None,
                   help="seed of the distillation runs only (default: the benchmark's seed, 0); data, probe and "
                        "evaluation stay the same, so two tables differ by what training alone varies")
    q.add_argument("--rows", default=None,
                   help="comma-separated rows besides teacher and ppcl (default: all of "
                        f"{','.join(r for r in d.rows if r != 'ppcl')}; optional: {','.join(OPTIONAL_ROWS)}); "
                        "e.g. --rows ppcl for a settings sweep")
    q.add_argument("--score", choices=("output", "trained", "r2"), default=None,
                   help="interval score of the ppcl row: output (the trained-plug probe's output error), trained "
                        f"(its local loss ratio) or r2 (the linear probe) (default {d.score})")
    q.add_argument("--serve", choices=SERVE_MODES, default=None,
                   help="the ppcl row's 0.7 model: plan (the plan selected for both ratios, 0.7 by the export's size "
                        "rule), joint (that plan and the 0.7 subset the selection records) or none (the plan "
                        f"selected for 0.5 alone, size rule at 0.7) (default {d.serve})")
    q.add_argument("--trained-probe-steps", type=int, default=None,
                   help="steps of the trained-plug probe behind --score output/trained and the trained-probe row "
                        f"(default {d.trained_probe_steps})")
    q.add_argument("--eval-n", type=int, default=None, help=f"evaluation prompts (default {d.eval_n})")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    q.add_argument("--workers", type=int, default=None,
                   help="distillation runs side by side (default: one per core, the --threads shared out)")
    q.add_argument("--teacher", default=None, help="pipeline folder (default: the shipped reference teacher)")
    q.add_argument("--no-keep-work", action="store_true", help="delete OUT/work at the end")

    g = sub.add_parser("gpu", help="planner vs measured memory, step / forward time, probe overhead, pruned speedup "
                                   "on real-width Qwen-Image and FLUX blocks (one GPU, < 8 min, no download)",
                       description="Real-width Qwen-Image (6 blocks) and FLUX.1-dev (4 + 4 blocks) with random bf16 "
                                   "weights at 1024 x 1024: peak memory of a distill run against the planner's "
                                   "prediction, distill step / teacher forward, probe overhead, pruned forward "
                                   "speedup against the FLOP ratio (gpu_check.json, gpu_check.md).")
    g.add_argument("--out", default="ppcl-bench/gpu", help="output folder (default ppcl-bench/gpu)")
    g.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    g.add_argument("--small", action="store_true",
                   help="tiny widths, 64 px, 8 text tokens: checks the machinery in seconds (on CPU too)")
    g.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median reported "
                                                             "(default 5; 2 with --small)")
    g.add_argument("--models", default=None, help="comma-separated subset of qwen-image,flux1-dev (default: both)")
    g.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each model in a process of its own, a failed one rerun with CUDA_LAUNCH_BLOCKING=1 "
                        "(default: on CUDA)")


#: overridable settings: (field, flag, check, what the check requires)
_OVERRIDES = (
    ("steps", "--steps", lambda v: v >= 1, "must be >= 1"),
    ("batch_size", "--batch-size", lambda v: v >= 1, "must be >= 1"),
    ("lr", "--lr", lambda v: 0 < v < float("inf"), "must be a positive number"),
    ("output_loss_weight", "--output-loss-weight", lambda v: 0 <= v < float("inf"), "must be >= 0"),
    ("output_loss_keep", "--output-loss-keep", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("output_loss_sequential", "--output-loss-sequential", lambda v: 0 <= v < float("inf"), "must be >= 0"),
    ("eval_n", "--eval-n", lambda v: v >= 2, "must be >= 2 (FID needs two images)"),
    ("threads", "--threads", lambda v: v >= 1, "must be >= 1"),
    ("workers", "--workers", lambda v: v >= 1, "must be >= 1"),
    ("timesteps", "--timesteps", lambda v: True, ""),
    ("output_loss_schedule", "--output-loss-schedule", lambda v: True, ""),
    ("ema_decay", "--ema-decay", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("uncond_ratio", "--uncond-ratio", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("trained_probe_steps", "--trained-probe-steps", lambda v: v >= 0, "must be >= 0"),
    ("score", "--score", lambda v: True, ""),
    ("serve", "--serve", lambda v: True, ""),
    ("train_seed", "--train-seed", lambda v: v >= 0, "must be >= 0"),
)


def run(args: argparse.Namespace) -> int:
    if args.bench == "gpu":
        return _gpu(args)
    import dataclasses

    from ppcl.bench.quality import OPTIONAL_ROWS, QualitySettings, run_quality
    from ppcl.errors import PPCLError

    s = QualitySettings.smoke() if args.smoke else QualitySettings()
    for field, flag, ok, what in _OVERRIDES:
        value = getattr(args, field)
        if value is None:
            continue
        if not ok(value):
            raise PPCLError(f"{flag} {what} (got {value})")
        s = dataclasses.replace(s, **{field: value})
    if args.output_loss_ratios is not None:
        try:
            text = "" if args.output_loss_ratios.strip().lower() == "none" else args.output_loss_ratios
            ratios = tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise PPCLError(f"--output-loss-ratios: expected comma-separated numbers (got {args.output_loss_ratios!r})"
                            ) from None
        if any(not 0 < r <= 1 for r in ratios):
            raise PPCLError(f"--output-loss-ratios: every ratio must be in (0, 1] (got {args.output_loss_ratios})")
        s = dataclasses.replace(s, output_loss_ratios=ratios)
    if args.rows is not None:
        known = (*QualitySettings().rows, *OPTIONAL_ROWS)
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in known]
        if unknown:
            raise PPCLError(f"--rows: unknown row {unknown[0]!r} (expected some of {', '.join(known)})")
        s = dataclasses.replace(s, rows=tuple(["ppcl", *[r for r in rows if r != "ppcl"]]))
    result = run_quality(args.out, s, teacher=args.teacher, keep_work=not args.no_keep_work)
    from pathlib import Path

    print((Path(args.out) / "quality.md").read_text())
    print(f"wrote {args.out}/quality.md, quality.json, quality.png in {result['seconds']['total'] / 60:.1f} min")
    return 0


def _gpu(args: argparse.Namespace) -> int:
    import dataclasses

    from ppcl.bench.gpu import CASES, GpuCheckSettings, check_device, format_gpu_check, run_gpu_check
    from ppcl.errors import PPCLError

    check_device(args.device)  # before anything is built: no CUDA here is one line, at once
    cases = CASES
    if args.models is not None:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        known = [c.config for c in CASES]
        unknown = [m for m in names if m not in known]
        if unknown or not names:
            raise PPCLError(f"--models {args.models}: expected a comma-separated subset of {','.join(known)}")
        cases = tuple(c for c in CASES if c.config in names)
    s = GpuCheckSettings.smoke(args.device) if args.small else GpuCheckSettings(device=args.device)
    if args.repeats is not None:
        if args.repeats < 1:
            raise PPCLError(f"--repeats must be >= 1 (got {args.repeats})")
        s = dataclasses.replace(s, repeats=args.repeats)
    report = run_gpu_check(args.out, s, cases=cases, isolate=args.isolate)
    print(format_gpu_check(report))
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md in {report['seconds']:.0f} s")
    if report["failed"]:
        raise PPCLError(f"gpu check: {', '.join(report['failed'])} failed (the error and the tail of the log are "
                        f"in {args.out}/gpu_check.json; the other models' numbers were written)")
    return 0
