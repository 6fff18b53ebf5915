"""``ppcl plan show|make|resources``: inspect a plan, write one from explicit intervals, plan a run's memory per stage.

``make`` and ``resources`` need no weights: the transformer is built on the meta device from its config
(``--model`` is a pipeline folder, a transformer folder or a bare ``config.json``).

Every numeric flag is read as text and checked in :func:`run`, so a bad value is one line
``ppcl plan: error: --flag ...`` and exit status 2 (argparse's own type errors print the usage too).
"""

from __future__ import annotations

import argparse

HELP = "inspect a plan (show), write one from explicit intervals (make), plan a run's memory (resources)"

INTERVALS_HELP = ("teacher block ranges replaced by one plug each, 0-based inclusive, in execution order: "
                  "'3-4,5-7,12' ([12, 12] re-trains block 12 in place), or the JSON list '[[3,4],[5,7]]'")
WIDTH_HELP = ("width operations, comma-separated: 'ffn:B:STREAM' replaces block B's FFN of stream image|text by a "
              "residual linear map (ffn_linear); 'freeze:A-B' freezes the text stream across blocks A..B "
              "(text_freeze). The released Qwen-Image plan's: "
              "'ffn:2:image,ffn:2:text,ffn:58:image,ffn:59:image,freeze:36-37,freeze:40-41,freeze:50-59'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print a plan, or an exported model's plan and block map",
                          description="Print plan.json; with --model PRUNED (a `ppcl export` folder) print the plan "
                                      "it was built from and its block map (each block -> the teacher block it is, "
                                      "or the interval its plug replaces). With a plan and --model, check that the "
                                      "plan belongs to the model: the plan the export was built from, or a plan for "
                                      "the model itself as a teacher; anything else is a one-line error.")
    show.add_argument("plan", nargs="?", help="plan.json")
    show.add_argument("--plan", dest="plan_flag", metavar="PLAN", help="plan.json (same as the positional)")
    show.add_argument("--model", help="an exported (pruned) pipeline folder, or any pipeline to check the plan "
                                      "against")

    make = sub.add_parser("make", help="write plan.json from explicit intervals (exact parameter counts, no weights)",
                          description="Write plan.json from explicit intervals, with the same checks and exact "
                                      "parameter prediction as `ppcl select`; the model is built on the meta device "
                                      "from its config, so no weights are read.")
    make.add_argument("--model", required=True, help="pipeline folder, transformer folder or config.json")
    make.add_argument("--intervals", required=True, help=INTERVALS_HELP)
    make.add_argument("--width", default="", help=WIDTH_HELP)
    make.add_argument("--init", default="middle", help="teacher block each plug starts from: middle|first|last "
                                                        "(default middle)")
    make.add_argument("--protect", default="", help="blocks no interval may remove, e.g. 0,5,7")
    make.add_argument("--allow-ends", action="store_true", help="allow removing the first/last block")
    make.add_argument("--out", required=True, help="plan.json to write")

    res = sub.add_parser("resources", help="peak memory of every stage (distill, probe, export, evaluate), no weights",
                         description="Peak memory of each stage of a run, per GPU (export: host RAM), counted tensor "
                                     "by tensor while the stage's real code runs on meta tensors (no weights, no GPU) "
                                     "where it can: distill (the loss path, FSDP2 sharding over --gpus x --nodes "
                                     "ranks, AdamW), probe (the real accumulator) and evaluate's denoising forward; "
                                     "export is modelled from the plan's exact sizes. Per stage: the breakdown, fit / "
                                     "no fit and, when it does not fit, the cheapest settings that do.")
    res.add_argument("--model", required=True, help="pipeline folder, transformer folder or config.json")
    res.add_argument("--plan", required=True, help="plan.json")
    res.add_argument("--gpus", default="1", help="GPUs per node (default 1)")
    res.add_argument("--nodes", default="1", help="nodes (default 1)")
    res.add_argument("--gpu-memory", default="80", help="memory of one GPU in GiB (default 80)")
    res.add_argument("--host-memory", default="8", help="host RAM for the export in GiB (default 8)")
    res.add_argument("--batch-size", default="1", help="distill: samples per GPU per step (default 1)")
    res.add_argument("--probe-batch-size", default="4", help="probe: samples per forward (default 4)")
    res.add_argument("--eval-batch-size", default="4", help="evaluate: images per pipeline call (default 4)")
    res.add_argument("--resolution", default="1024", help="image side in pixels, a multiple of 16 (default 1024)")
    res.add_argument("--text-tokens", default="512", help="text tokens per sample (default 512)")
    res.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint every plug block")
    res.add_argument("--8bit-adam", dest="adam_8bit", action="store_true",
                     help="bitsandbytes AdamW8bit (2 bytes of state per parameter instead of 8)")
    res.add_argument("--output-loss-weight", default="0", help="distill's output-level term (default 0: off)")
    res.add_argument("--stages", default="distill,probe,export,evaluate",
                     help="stages to plan, comma-separated (default all: distill,probe,export,evaluate)")
    res.add_argument("--no-search", action="store_true", help="do not search for settings that fit")
    res.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def parse_intervals(text: str) -> list[list[int]]:
    """``'3-4,5-7,12'`` or ``'[[3,4],[5,7]]'`` -> ``[[3, 4], [5, 7], [12, 12]]``; PPCLError naming the bad item."""
    import json

    from ppcl.errors import PPCLError

    text = text.strip()
    if text.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PPCLError(f"--intervals: not a JSON list of [start, end] pairs ({e.msg})") from None
        if not isinstance(data, list) or not all(
            isinstance(iv, list) and len(iv) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in iv)
            for iv in data
        ):
            raise PPCLError("--intervals: expected a JSON list of [start, end] integer pairs")
        return [list(iv) for iv in data]
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split("-")
        try:
            if len(parts) == 1:
                out.append([int(parts[0]), int(parts[0])])
            elif len(parts) == 2:
                out.append([int(parts[0]), int(parts[1])])
            else:
                raise ValueError
        except ValueError:
            raise PPCLError(f"--intervals: '{item}' is not a block range START-END or a block index") from None
    if not out:
        raise PPCLError("--intervals: no interval given")
    return out


def parse_width(text: str) -> list[dict]:
    """``'ffn:2:image,freeze:36-37'`` -> plan.json width ops; PPCLError naming the bad item."""
    from ppcl.errors import PPCLError

    ops = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        kind = parts[0]
        try:
            if kind in ("ffn", "ffn_linear") and len(parts) == 3 and parts[2] in ("image", "text"):
                ops.append({"op": "ffn_linear", "block": int(parts[1]), "stream": parts[2]})
                continue
            if kind in ("freeze", "text_freeze") and len(parts) == 2:
                a, b = parts[1].split("-")
                ops.append({"op": "text_freeze", "interval": [int(a), int(b)]})
                continue
        except ValueError:
            pass
        raise PPCLError(f"--width: '{item}' is not ffn:BLOCK:image|text or freeze:START-END")
    return ops


def _number(value: str, flag: str, kind=int, low: float | None = None):
    from ppcl.errors import PPCLError

    try:
        x = kind(value)
    except ValueError:
        raise PPCLError(f"{flag}: '{value}' is not {'an integer' if kind is int else 'a number'}") from None
    if low is not None and not x >= low:
        raise PPCLError(f"{flag}: must be >= {low} (got {value})")
    return x


def run(args: argparse.Namespace) -> int:
    from ppcl.plan import format_plan, load_plan

    if args.action == "show":
        if args.model is not None:
            return _show_model(args)
        plan = args.plan_flag or args.plan
        if plan is None:
            from ppcl.errors import PPCLError

            raise PPCLError("plan show needs a plan.json, --model PRUNED, or both")
        print(format_plan(load_plan(plan)))
        return 0
    if args.action == "make":
        return _make(args)
    return _resources(args)


def _show_model(args: argparse.Namespace) -> int:
    """``plan show --model M [PLAN]``: M's lineage (plan + block map) and, with a plan, whether it belongs to M.

    With a plan: it is the plan M was exported from (same plan hash as the lineage records), or a plan made for M
    itself as a teacher (family, block count and per-block parameters match, as distill and export check). Any
    other plan is a one-line error saying what differs, e.g. "the plan is for 60 blocks, the model has 35"."""
    from pathlib import Path

    from ppcl.errors import PPCLError
    from ppcl.lineage import LINEAGE_FILE, format_block_map, lineage_path, read_export_plan, read_lineage
    from ppcl.plan import format_plan, load_plan

    if args.plan_flag and args.plan and args.plan_flag != args.plan:
        raise PPCLError("two different plans given (positional and --plan): give one")
    plan_path = args.plan_flag or args.plan
    model = Path(args.model)
    has_lineage = (model / LINEAGE_FILE).is_file() or (model.is_file() and model.name == LINEAGE_FILE)
    if plan_path is None or has_lineage:
        lineage = read_lineage(model)  # no lineage and no plan: the one-line error
        exported = read_export_plan(model, lineage)
    if plan_path is None:
        print(format_plan(exported))
        print()
        print(format_block_map(lineage))
        return 0
    plan = load_plan(plan_path)
    if has_lineage:
        from ppcl.distill import plan_hash

        if plan_hash(plan) == lineage.plan_hash:
            print(format_plan(plan))
            print()
            print(format_block_map(lineage))
            print(f"\n{args.model} was exported from this plan (plan intervals {lineage.intervals} replaced)")
            return 0
    from ppcl.distill import check_plan_family
    from ppcl.plan import meta_adapter

    adapter = meta_adapter(lineage_path(model).parent if model.is_file() else model)
    try:
        check_plan_family(plan, adapter, "show")
    except PPCLError as e:
        t = plan.teacher.num_blocks
        if plan.family != adapter.family:
            what = f"the plan is for a {plan.family} model, {args.model} is {adapter.family}"
        elif t != adapter.num_blocks:
            what = f"the plan is for {t} blocks, the model has {adapter.num_blocks}"
        else:
            what = str(e).removeprefix("show: ")
        if has_lineage:
            origin = lineage.teacher.num_blocks
            what += (f"; {args.model} was exported from another plan (for {origin} blocks, plan hash "
                     f"{lineage.plan_hash[:12]})" + (" of the same teacher" if origin == t else ""))
        raise PPCLError(f"{plan_path} does not belong to {args.model}: {what}") from None
    print(format_plan(plan))
    print(f"\nthe plan fits {args.model} as a teacher ({adapter.num_blocks} {adapter.family} blocks)"
          + (f"; it is not the plan {args.model} was exported from" if has_lineage else ""))
    return 0


def _make(args: argparse.Namespace) -> int:
    from ppcl.errors import PPCLError
    from ppcl.plan import INIT_MODES, format_plan, make_plan, meta_adapter, save_plan

    if args.init not in INIT_MODES:
        raise PPCLError(f"--init: '{args.init}' is not one of {', '.join(INIT_MODES)}")
    intervals = parse_intervals(args.intervals)
    width = parse_width(args.width)
    protect = [_number(x.strip(), "--protect", int, 0) for x in args.protect.split(",") if x.strip()]
    adapter = meta_adapter(args.model)
    plan = make_plan(adapter, intervals, width=width, init=args.init, allow_ends=args.allow_ends, protect=protect,
                     selection={"method": "explicit", "model": str(args.model)})
    save_plan(plan, args.out)
    print(format_plan(plan))
    print(f"wrote {args.out}")
    return 0


def _resources(args: argparse.Namespace) -> int:
    import json
    import warnings

    from ppcl.errors import PPCLError
    from ppcl.plan import load_plan, meta_adapter
    from ppcl.resources import DistillKnobs, ExportKnobs, StageKnobs, format_resources, plan_resources

    gpus = _number(args.gpus, "--gpus", int, 1)
    nodes = _number(args.nodes, "--nodes", int, 1)
    memory = _number(args.gpu_memory, "--gpu-memory", float)
    if not memory > 0:
        raise PPCLError(f"--gpu-memory: must be a positive number of GiB (got {args.gpu_memory})")
    host = _number(args.host_memory, "--host-memory", float)
    if not host > 0:
        raise PPCLError(f"--host-memory: must be a positive number of GiB (got {args.host_memory})")
    resolution = _number(args.resolution, "--resolution", int, 16)
    tokens = _number(args.text_tokens, "--text-tokens", int, 1)
    knobs = DistillKnobs(batch_size=_number(args.batch_size, "--batch-size", int, 1), resolution=resolution,
                         text_tokens=tokens, gradient_checkpointing=args.gradient_checkpointing,
                         adam_8bit=args.adam_8bit,
                         output_loss_weight=_number(args.output_loss_weight, "--output-loss-weight", float, 0))
    probe = StageKnobs(_number(args.probe_batch_size, "--probe-batch-size", int, 1), resolution, tokens)
    evaluate = StageKnobs(_number(args.eval_batch_size, "--eval-batch-size", int, 1), resolution, tokens)
    stages = tuple(x.strip() for x in args.stages.split(",") if x.strip())
    plan = load_plan(args.plan)
    import diffusers

    # diffusers warns on every cast of the meta teacher and torch on bf16 inputs to fp32 norms: noise here
    diffusers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = meta_adapter(args.model)
        report = plan_resources(adapter, plan, gpus=gpus, nodes=nodes, gpu_memory_gib=memory, knobs=knobs,
                                search=not args.no_search, stages=stages, probe=probe, evaluate=evaluate,
                                export=ExportKnobs(), host_memory_gib=host,
                                model=args.model)
    print(json.dumps(report, indent=2) if args.json else format_resources(report))
    return 0
