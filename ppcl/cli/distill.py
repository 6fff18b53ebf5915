"""``ppcl distill``: train every plug of a plan against the frozen teacher -> RUN folder.

Any of --model, --plan, --data and --out may be an ``s3://`` URI (:mod:`ppcl.distill_s3`): what every node of a
multi-node TrainJob runs (``torchrun -m ppcl distill ... --out s3://... --resume``)."""

from __future__ import annotations

import argparse

HELP = "train the plugs of plan.json against the frozen teacher (all plugs in one teacher pass) -> RUN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ppcl.settings import DistillSettings, add_settings_arguments

    parser.add_argument("--model", required=True, help="teacher pipeline folder or s3:// prefix")
    parser.add_argument("--plan", required=True, help="plan.json (local or s3://) from ppcl select / ppcl plan")
    parser.add_argument("--data", default=None,
                        help="latent cache (folder or s3://) from ppcl encode (default: built-in synthetic set)")
    parser.add_argument("--out", required=True,
                        help="RUN folder or s3:// prefix (plugs.safetensors, run.json, metrics.jsonl, checkpoints/)")
    parser.add_argument("--scratch", default=None,
                        help="local folder for s3:// inputs and the local RUN copy (default $PPCL_SCRATCH, "
                             "else <tmp>/ppcl-scratch)")
    add_settings_arguments(parser, DistillSettings)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps as if killed (tests of --resume)")


def run(args: argparse.Namespace) -> int:
    import sys

    from ppcl.settings import DistillSettings, settings_from_args

    cfg = settings_from_args(DistillSettings, args)  # checked before torch is even imported

    from ppcl.distill_s3 import distill_uris

    # the defaults are the pipeline's (ppcl.settings): by hand and in the pipeline, the same run
    result = distill_uris(args.model, args.plan, args.out, data=args.data, resume=args.resume,
                          stop_after=args.stop_after, scratch=args.scratch, settings=cfg,
                          progress=not args.no_progress)  # fmt: skip
    if result.steps < cfg.steps:
        where = f"{args.out}/checkpoints" if args.out.startswith("s3://") else result.run_dir / "checkpoints"
        print(f"stopped after step {result.steps} (checkpoint in {where})", file=sys.stderr)
    else:
        losses = ", ".join(f"{k}={v:.4f}" for k, v in result.final_losses.items())
        from ppcl.tracking import log_command

        done = {k: v for k, v in result.final_losses.items() if v is not None}
        log_command("distill", {"steps": result.steps, "plugs": len(result.plugs),
                                "loss": sum(done.values()) / len(done) if done else None},
                    result.run_dir, cfg.model_dump(mode="json"))  # fmt: skip
        print(f"{args.out}: {len(result.plugs)} plugs, {result.steps} steps; final D: {losses}")
    return 0
