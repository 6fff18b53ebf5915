"""``ppcl distill``: train every plug of a plan against the frozen teacher -> RUN folder.

Any of --model, --plan, --data and --out may be an ``s3://`` URI (:mod:`ppcl.distill_s3`): what every node of a
multi-node TrainJob runs (``torchrun -m ppcl distill ... --out s3://... --resume``)."""

from __future__ import annotations

import argparse

HELP = "train the plugs of plan.json against the frozen teacher (all plugs in one teacher pass) -> RUN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="teacher pipeline folder or s3:// prefix")
    parser.add_argument("--plan", required=True, help="plan.json (local or s3://) from ppcl select / ppcl plan")
    parser.add_argument("--data", default=None,
                        help="latent cache (folder or s3://) from ppcl encode (default: built-in synthetic set)")
    parser.add_argument("--out", required=True,
                        help="RUN folder or s3:// prefix (plugs.safetensors, run.json, metrics.jsonl, checkpoints/)")
    parser.add_argument("--scratch", default=None,
                        help="local folder for s3:// inputs and the local RUN copy (default $PPCL_SCRATCH, "
                             "else <tmp>/ppcl-scratch)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size per process (default 2)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default 10)")
    parser.add_argument("--mode", default="nonsequential", choices=["nonsequential", "sequential"],
                        help="nonsequential (default): each plug fed the teacher; sequential: the ablation")
    parser.add_argument("--init", default=None, choices=["middle", "first", "last"],
                        help="teacher block each plug starts from (default: the plan's)")
    parser.add_argument("--timesteps", default="uniform", choices=["uniform", "logit_normal"],
                        help="timestep sampling (default uniform)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and noise (default 0)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="gradient clipping norm; 0 = off (default 1.0)")
    parser.add_argument("--lsq-batches", type=int, default=8,
                        help="batches of the least-squares init of width projections (default 8)")
    parser.add_argument("--ridge", type=float, default=1e-4, help="relative ridge of that fit (default 1e-4)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance value for guidance-distilled teachers")
    parser.add_argument("--no-8bit-adam", dest="use_8bit_adam", action="store_false",
                        help="plain AdamW even where bitsandbytes is installed")
    parser.add_argument("--output-loss-weight", type=float, default=0.0,
                        help="weight of the output-level (velocity) loss; 0 = off (default)")
    parser.add_argument("--output-loss-keep", type=float, default=1.0,
                        help="probability each plug is in place for the output-level loss (default 1: all; "
                             "< 1: a random subset per step, so plugs also learn to work alone)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute plug activations")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                        help="auto (default): bf16 autocast on CUDA, none on CPU")
    parser.add_argument("--n-samples", type=int, default=16, help="synthetic set size without --data (default 16)")
    parser.add_argument("--resolution", type=int, default=64, help="synthetic image size (default 64)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps as if killed (tests of --resume)")


def run(args: argparse.Namespace) -> int:
    import sys

    from ppcl.distill_s3 import distill_uris

    result = distill_uris(
        args.model, args.plan, args.out, data=args.data, resume=args.resume, stop_after=args.stop_after,
        scratch=args.scratch, keep_checkpoints=args.keep_checkpoints, max_grad_norm=args.max_grad_norm or None,
        lsq_batches=args.lsq_batches, ridge=args.ridge, guidance=args.guidance, use_8bit_adam=args.use_8bit_adam,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, mode=args.mode, init=args.init, timesteps=args.timesteps, seed=args.seed,
        checkpoint_every=args.checkpoint_every, output_loss_weight=args.output_loss_weight,
        output_loss_keep=args.output_loss_keep,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
        n_samples=args.n_samples, resolution=args.resolution,
    )
    if result.steps < args.steps:
        where = f"{args.out}/checkpoints" if args.out.startswith("s3://") else result.run_dir / "checkpoints"
        print(f"stopped after step {result.steps} (checkpoint in {where})", file=sys.stderr)
    else:
        losses = ", ".join(f"{k}={v:.4f}" for k, v in result.final_losses.items())
        print(f"{args.out}: {len(result.plugs)} plugs, {result.steps} steps; final D: {losses}")
    return 0
