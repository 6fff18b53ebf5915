"""``ppcl export``: build a real pruned pipeline from a plan and its trained plugs."""

from __future__ import annotations

import argparse

HELP = "materialise a pruned pipeline (removed blocks gone, plugs in place) from plan.json + a distill RUN"


def _indices(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated interval indices, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from typing import get_args

    from ppcl.settings import DType, ExportSettings

    about = {n: f.description for n, f in ExportSettings.model_fields.items()}
    parser.add_argument("--model", required=True, help="teacher pipeline folder")
    parser.add_argument("--plan", required=True, help="plan.json the plugs were trained for")
    parser.add_argument("--plugs", required=True, help="RUN folder from ppcl distill")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-params", type=float, help=about["keep_params"])
    which.add_argument("--intervals", type=_indices, help=about["intervals"])
    which.add_argument("--all", action="store_true", help=about["all_intervals"])
    parser.add_argument("--dtype", choices=get_args(DType), default=None, help=about["dtype"])
    parser.add_argument("--max-shard-size", default=ExportSettings.model_fields["max_shard_size"].default,
                        help=about["max_shard_size"])
    parser.add_argument("--out", required=True, help="pruned pipeline folder to write")


def run(args: argparse.Namespace) -> int:
    from ppcl.export import export
    from ppcl.settings import ExportSettings, validate_settings

    # --all is the flag of the all_intervals setting; the group above makes exactly one of the three required
    cfg = validate_settings(ExportSettings, {"keep_params": args.keep_params, "intervals": args.intervals,
                                             "all_intervals": args.all, "dtype": args.dtype,
                                             "max_shard_size": args.max_shard_size}, cli=True)  # fmt: skip
    r = export(args.model, args.plan, args.plugs, args.out, keep_params=cfg.keep_params,
               intervals=cfg.intervals, all_intervals=cfg.all_intervals, dtype=cfg.dtype,
               max_shard_size=cfg.max_shard_size)
    from ppcl.tracking import log_command

    log_command("export", {"keep_params": cfg.keep_params, "parameters": r.parameters,
                           "parameters_ratio": r.parameters / r.teacher_parameters, "intervals": len(r.intervals)},
                r.out, cfg.model_dump(mode="json"))  # fmt: skip
    print(f"{r.out}: {r.transformer_class}, {r.parameters:,} of {r.teacher_parameters:,} parameters "
          f"({r.parameters / r.teacher_parameters:.2%}), intervals {r.intervals}")
    print(f"block map in {r.lineage} (ppcl plan show --model {r.out}), plan.json copied in")
    return 0
