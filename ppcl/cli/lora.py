"""``ppcl lora``: teacher LoRAs on a pruned model (:mod:`ppcl.lora`).

``ppcl lora remap --lora TEACHER_LORA --model PRUNED --out STUDENT_LORA``: the LoRA's kept-block keys renamed to
their student positions by the export's block map, removed-block keys dropped (each named, with its share of the
LoRA's norm), everything else unchanged. Loading a teacher LoRA directly into a pruned model puts it on the wrong
blocks.

``ppcl lora transfer --lora TEACHER_LORA --model PRUNED --out STUDENT_LORA [--teacher TEACHER]``: distil
teacher+LoRA into a LoRA on the pruned model (plugs included), starting from the remap.
"""

from __future__ import annotations

import argparse

HELP = ("teacher LoRAs on a pruned model: `ppcl lora remap` (rename to the student's blocks, drop removed ones) "
        "and `ppcl lora transfer` (distil teacher+LoRA into a LoRA on the pruned model)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = sub.add_parser("remap", help="place a teacher LoRA on the pruned model's blocks (removed blocks dropped, "
                                     "reported with their share of the LoRA's norm)",
                       description="Rename a teacher LoRA's keys to the pruned model's blocks (ppcl_lineage.json); "
                                   "keys of removed blocks are dropped and reported.")
    r.add_argument("--lora", required=True, help="the teacher's LoRA (.safetensors; diffusers/peft or kohya keys)")
    r.add_argument("--model", required=True, help="the pruned pipeline folder from ppcl export")
    r.add_argument("--out", required=True, help="the LoRA for the pruned model (.safetensors) to write")
    r.add_argument("--json", default=None, help="also write the report (renamed, dropped, shares) as JSON here")

    from ppcl.lora import TransferSettings  # a dataclass, no torch: the defaults shown are the real ones

    d = TransferSettings()
    t = sub.add_parser("transfer", help="distil teacher+LoRA into a LoRA on the pruned model (plugs included)",
                       description="Train a LoRA on the pruned model to match the teacher with the LoRA fused, "
                                   "block by block (the distill stage's loss D, teacher-forced), starting from the "
                                   "remapped LoRA.")
    t.add_argument("--lora", required=True, help="the teacher's LoRA (.safetensors, as diffusers loads it)")
    t.add_argument("--model", required=True, help="the pruned pipeline folder from ppcl export")
    t.add_argument("--out", required=True, help="the LoRA for the pruned model (.safetensors) to write")
    t.add_argument("--teacher", default=None, help="the teacher pipeline folder (default: the path the export's "
                                                   "ppcl_lineage.json records)")
    t.add_argument("--data", default=None, help="latent cache from ppcl encode (default: the built-in synthetic set)")
    t.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    t.add_argument("--output-loss-weight", type=float, default=d.output_loss_weight,
                   help="weight of the output-level MSE term; > 0 also trains the kept blocks' adapters "
                        f"(default {d.output_loss_weight:g})")
    t.add_argument("--n-samples", type=int, default=d.n_samples,
                   help=f"size of the built-in synthetic set, without --data (default {d.n_samples})")
    t.add_argument("--seed", type=int, default=d.seed, help=f"seed of data order and noise (default {d.seed})")


def run(args: argparse.Namespace) -> int:
    if args.action == "remap":
        from ppcl.atomic import write_json
        from ppcl.lora import remap

        report = remap(args.lora, args.model, args.out)
        print(report.text())
        if args.json:
            write_json(args.json, report.as_dict())
        print(f"wrote {args.out}")
        return 0
    from ppcl.errors import PPCLError
    from ppcl.lora import TransferSettings, transfer

    for name in ("steps", "batch_size", "n_samples"):
        if getattr(args, name) < 1:
            raise PPCLError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if not args.lr > 0 or args.output_loss_weight < 0:
        raise PPCLError("--lr must be > 0 and --output-loss-weight >= 0")
    s = TransferSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         output_loss_weight=args.output_loss_weight, n_samples=args.n_samples, seed=args.seed)
    r = transfer(args.lora, args.model, args.out, teacher=args.teacher, data=args.data, settings=s)
    print(r.report.text())
    print(f"trained adapters of {len(r.trained_blocks)} blocks ({', '.join(r.trained_blocks)}) for {r.steps} steps: "
          f"loss {r.first_loss:.4g} -> {r.final_loss:.4g}")
    print(f"wrote {args.out}")
    return 0
