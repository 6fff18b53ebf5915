"""Export: materialise a real, smaller transformer from a plan and its trained plugs (method.md section 4).

Nothing is materialised in full (issue 16): the teacher and the student exist only on the meta device (shapes,
config, exact counts), and the student's weights are streamed tensor by tensor from the teacher's safetensors and
the run's ``plugs.safetensors`` into diffusers' sharded layout (:mod:`ppcl.export_stream`: peak memory about one
block, whatever the model size; the teacher's dtype by default, ``dtype`` to cast; ``max_shard_size`` as in
``save_pretrained``). Every key of the new model is taken from what now sits at that position (a kept teacher block,
a plug, or a teacher non-block module, as the block map of :mod:`ppcl.lineage` says), and its name and shape are
checked; nothing is copied by luck. Removed blocks are gone from the module lists, the config's layer counts are
updated, weights are safetensors. :func:`build_pruned_transformer` is the in-memory construction of the same model
from loaded modules (quality benchmarks; the test oracle of the streamed export, bit for bit).

- Depth-only exports use the stock class (``FluxTransformer2DModel`` ...): the folder loads with stock diffusers,
  no ppcl import. Exports with width ops use the family's config-registered ``PPCL<Class>`` (extra config field
  ``width_ops`` whose ``block`` indices are positions in the PRUNED model), written in diffusers' custom-code
  layout (:mod:`ppcl.custom_code`: ``trust_remote_code=True`` loads it without ppcl, the stock class refuses it);
  :func:`ppcl.arch.load_pipeline` loads it with ppcl's own class.
- Subsets. One training run serves every ratio: any subset of the trained interval plugs can be exported. Width
  ops of the plan (ffn_linear, text_freeze) are always applied (they are cheap and were trained together).
- Width ops and depth plugs compose (``ppcl.plan.text_freeze_roles``): a text_freeze ``[a, b]`` of the teacher
  becomes ``[p(a), p(b)]`` of the pruned model, ``p(l)`` the position of the block that holds teacher block ``l``
  (itself, or the plug of the chosen interval containing it). The pruned model's constructor then makes positions
  ``p(a)+1..p(b)`` text-frozen, which is exactly what they are: kept frozen blocks of the text_freeze unit and the
  frozen plugs of intervals inside ``[a, b]`` (the one at ``p(b)`` with the projection).
- Accounting (additive over intervals, so every subset is exact): ``exported = teacher - width_saving -
  sum(savings of the chosen intervals)``; ``width_saving`` counts every width-modified block (frozen blocks inside
  intervals too), and an interval's saving is its blocks AS WIDTH-MODIFIED minus its plug, so a block inside a
  chosen interval is counted once, through the plug.
- ``keep_params=F`` rule: among all subsets of intervals (exhaustive up to 16 intervals, greedy beyond), pick the
  one whose exported parameter count is the LARGEST that does not exceed ``F x teacher parameters`` (the least
  pruning that meets the budget); ties go to the smaller sum of the plugs' final training losses. If even all
  intervals cannot reach F, it is an error that says the smallest reachable fraction. A ratio the plan records in
  ``serves`` (a selection for several ratios, ``ppcl select --serve --serve-subsets joint``) exports the subset
  recorded for it instead: the selector chose it by the plugs' scored effect, and distillation trained that exact
  subset.
- Lineage: the export folder also holds the plan it was built from (``plan.json``, byte for byte) and the block
  map ``ppcl_lineage.json`` (:mod:`ppcl.lineage`: each student block -> the teacher block it is, or the interval
  its plug replaces); the model card shows the map as a table. Both are written inside the atomic folder.
"""

from __future__ import annotations

import importlib
import itertools
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppcl.arch.common import Adapter, count_parameters
from ppcl.atomic import atomic_path
from ppcl.errors import PPCLError
from ppcl.export_stream import DEFAULT_MAX_SHARD_SIZE
from ppcl.subsets import choose_intervals, subset_accounting, subset_fractions  # shared with distill



@dataclass
class ExportResult:
    out: Path
    intervals: list[int]  # plan indices of the exported intervals
    parameters: int  # exported transformer parameters (exact)
    teacher_parameters: int
    transformer_class: str
    #: ``out/ppcl_lineage.json``: the block map (:mod:`ppcl.lineage`); ``out/plan.json`` is the plan copied in
    lineage: Path | None = None
    #: with keep_params: every exportable subset of the trained plugs and its kept fraction (exhaustive sizes only)
    subsets: list[tuple[list[int], float]] | None = None
    #: with keep_params: a line saying the fraction achieved is far from the one asked, and which subsets exist
    far_from_asked: str | None = None

#: an export whose kept fraction is further than this below the ratio asked says so (``ExportResult.far_from_asked``)
FAR_FROM_ASKED = 0.05


def far_from_asked_note(keep_params: float, achieved: float, subsets: list[tuple[list[int], float]]) -> str | None:
    """The line an export prints when its kept fraction is more than :data:`FAR_FROM_ASKED` below ``keep_params``."""
    if keep_params - achieved <= FAR_FROM_ASKED:
        return None
    shown = ", ".join(f"{c or 'none'} {f:.3f}" for c, f in subsets[:12]) + (" ..." if len(subsets) > 12 else "")
    return (f"--keep-params {keep_params:g} asked, {achieved:.3f} achieved: no subset of the trained plugs keeps "
            f"between the two (an export replaces whole intervals). Plug subsets (plan interval indices -> kept "
            f"fraction): {shown}. Ask for one of these, or select a plan at this ratio.")


def _read_run(plugs: Path) -> dict[str, Any]:
    path = plugs / "run.json"
    if not path.is_file():
        raise PPCLError(f"not a distill run folder (no run.json): {plugs}")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PPCLError(f"unreadable {path}: {e}") from None
    if run.get("version") != 1:
        raise PPCLError(f"{path}: unsupported run.json version {run.get('version')!r} (expected 1)")
    return run


def covering_positions(units, position: dict[int, int]) -> dict[int, int]:
    """Teacher execution index -> position in the pruned model of the block holding it (``position`` from
    ``student_layout``: plug starts and kept blocks; a block inside a chosen interval is held by that plug)."""
    cover = dict(position)
    for u in units:
        if u.kind == "interval":
            cover.update({l: position[u.start] for l in range(u.start, u.end + 1)})
    return cover


def _width_class(adapter: Adapter) -> type:
    module = importlib.import_module(type(adapter).__module__)
    name = f"PPCL{adapter.transformer_class.__name__}"
    return getattr(module, name)


def student_width_ops(units, position: dict[int, int]) -> list[dict[str, Any]]:
    """The plan's width ops with block indices of the PRUNED model (module doc: a chosen plug may hold a or b);
    ``units`` the chosen ones, ``position`` from ``student_layout``."""
    cover = covering_positions(units, position)
    out = []
    for u in units:
        if u.kind not in ("width", "text_freeze"):
            continue
        for op in u.ops:
            if op.get("op") == "text_freeze":
                a, b = op["interval"]
                out.append({**op, "interval": [cover[a], cover[b]]})
            else:  # ffn_linear blocks are never inside an interval: always kept
                out.append({**op, "block": position[int(op["block"])]})
    return out


def pruned_skeleton(adapter: Adapter, width_ops_new: list[dict[str, Any]], keep) -> nn.Module:
    """The pruned transformer with empty (meta) weights: config from ``adapter.pruned_config(keep)`` (+ ``width_ops``
    and the family's ``PPCL<Class>`` when there are width ops). Its config is the export's ``config.json``, its state
    dict names every tensor the export must fill."""
    from accelerate import init_empty_weights

    cfg = {k: v for k, v in adapter.pruned_config(keep).items() if not k.startswith("_")}
    cls = _width_class(adapter) if width_ops_new else adapter.transformer_class
    if width_ops_new:
        cfg["width_ops"] = width_ops_new
    with init_empty_weights():
        return cls.from_config(cfg)


def _teacher_skeleton(model: Path) -> Adapter:
    """The teacher's adapter over its transformer built on the meta device from ``transformer/config.json``; the
    folder's weight files are checked for truncation (one line naming the file), none is loaded."""
    from ppcl.integrity import check_pipeline_weights
    from ppcl.plan import meta_adapter

    if not model.exists():
        raise PPCLError(f"model path not found: {model}")
    if not (model / "model_index.json").is_file():
        raise PPCLError(f"not a diffusers pipeline directory (no model_index.json): {model}")
    check_pipeline_weights(model)
    return meta_adapter(model)


def build_pruned_transformer(adapter: Adapter, units, width_ops_new: list[dict[str, Any]], lists, keep) -> nn.Module:
    """The pruned transformer in memory, from loaded modules: :func:`pruned_skeleton`, loaded key by key."""
    model = pruned_skeleton(adapter, width_ops_new, keep)
    teacher_sd = adapter.transformer.state_dict()
    block_prefixes = {name for name in lists}
    sources: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    expected = model.state_dict()
    for key, ref in expected.items():
        head = key.split(".", 2)
        if head[0] in block_prefixes and len(head) == 3 and head[1].isdigit():
            name, j, rest = head[0], int(head[1]), head[2]
            if j >= len(lists[name]):
                raise PPCLError(f"pruned model expects {key} but list {name} has {len(lists[name])} blocks")
            src_key = f"{name}.{j}"
            if src_key not in sources:
                sources[src_key] = lists[name][j].state_dict()
            src = sources[src_key]
            if rest not in src:
                raise PPCLError(f"cannot fill {key}: the module placed at {name}[{j}] has no '{rest}'")
            tensor = src[rest]
        else:
            if key not in teacher_sd:
                raise PPCLError(f"cannot fill {key}: not a teacher weight")
            tensor = teacher_sd[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise PPCLError(f"shape mismatch for {key}: source {tuple(tensor.shape)}, pruned model {tuple(ref.shape)}")
        dtype = teacher_sd[key].dtype if key in teacher_sd else adapter.transformer.dtype
        state[key] = tensor.detach().to("cpu", dtype).clone()
    # Every source module must be used whole: a leftover key means the structure differs from the plug's.
    for src_key, src in sources.items():
        used = {k.split(".", 2)[2] for k in expected if k.startswith(src_key + ".")}
        extra = sorted(set(src) - used)
        if extra:
            raise PPCLError(f"the module placed at {src_key} has weights the pruned model lacks: {extra[0]}")
    model.load_state_dict(state, strict=True, assign=True)
    for n, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        if p.is_meta:
            raise PPCLError(f"pruned model tensor {n} was never filled")
    return model.eval()


def export(
    model: str | Path,
    plan: Any,
    plugs: str | Path,
    out: str | Path,
    *,
    keep_params: float | None = None,
    intervals: list[int] | None = None,
    all_intervals: bool = False,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ExportResult:
    """Write a pruned pipeline folder ``out`` (the teacher's other components + the pruned transformer).

    Args:
        model: the teacher pipeline folder (local; the pipeline's export step downloads an s3:// teacher first).
        plan: plan.json path / Plan / dict the plugs were trained for.
        plugs: the distill RUN folder (run.json + plugs.safetensors).
        keep_params / intervals / all_intervals: exactly one: a parameter fraction (see the module rule), plan
            indices of the intervals to replace, or every interval.
        dtype: ``float32`` / ``bfloat16`` / ``float16``: cast every floating-point tensor; None: the teacher's
            (:mod:`ppcl.export_stream`).
        max_shard_size: the largest weight file, bytes or ``"10GB"``-style (diffusers' ``save_pretrained`` rule).
    """
    from ppcl.custom_code import write_custom_code
    from ppcl.distill import build_units, check_plan_family, plan_dict, plan_hash, student_layout
    from ppcl.export_stream import (DTYPES, check_plug_tensors, parse_shard_size, plan_copies, teacher_tensors,
                                    write_transformer_weights)
    from ppcl.lineage import LINEAGE_FILE, PLAN_FILE, build_lineage
    from ppcl.modelcard import TEACHER_ONLY_FILES, model_card
    from ppcl.plan import as_plan

    chosen_modes = sum([keep_params is not None, intervals is not None, bool(all_intervals)])
    if chosen_modes != 1:
        raise PPCLError("choose exactly one of --keep-params, --intervals, --all")
    if dtype is not None and dtype not in DTYPES:
        raise PPCLError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)} (or none: the teacher's)")
    shard_bytes = parse_shard_size(max_shard_size)
    model_path, plugs, out = Path(model), Path(plugs), Path(out)
    plan_obj = as_plan(plan)
    # the plan copied into the export unchanged: the file's own bytes, or the object as save_plan writes it
    plan_bytes = (Path(plan).read_bytes() if isinstance(plan, (str, Path))
                  else (json.dumps(plan_dict(plan_obj), indent=2) + "\n").encode())
    run = _read_run(plugs)
    if run.get("plan_hash") != plan_hash(plan_obj):
        raise PPCLError(f"plugs {plugs} were trained for a different plan (plan hash differs)")
    from ppcl.integrity import check_run_inputs

    check_run_inputs(plugs, run, model_path)  # plugs intact and trained on THIS teacher (issue 13)
    adapter = _teacher_skeleton(model_path)
    teacher = run.get("teacher", {})
    if teacher.get("family") not in (None, adapter.family) or teacher.get("num_blocks") not in (None, adapter.num_blocks):
        raise PPCLError(f"plugs {plugs} were trained on a {teacher.get('family')} model with "
                        f"{teacher.get('num_blocks')} blocks, not this {adapter.family} model with {adapter.num_blocks}")
    check_plan_family(plan_obj, adapter, "export")
    units = build_units(adapter, plan_obj, run.get("settings", {}).get("init"))  # on the meta device: shapes only
    plug_tensors = check_plug_tensors(units, plugs / "plugs.safetensors")

    n_iv = len(plan_obj.intervals)
    teacher_params, width_saving, savings = subset_accounting(adapter, units)
    if all_intervals:
        chosen = list(range(n_iv))
    elif intervals is not None:
        chosen = sorted(set(int(k) for k in intervals))
        bad = [k for k in chosen if not 0 <= k < n_iv]
        if bad:
            raise PPCLError(f"--intervals {bad[0]} is not an interval index of the plan (it has {n_iv})")
    else:
        index = {u.name: u.index for u in units if u.kind == "interval"}
        losses = {}
        for p in run.get("plugs", []):
            if p.get("kind") == "interval":
                losses[index[p["name"]]] = sum((p.get("final_loss") or {}).values())
        chosen = choose_intervals(float(keep_params), teacher_params, width_saving, savings, losses,
                                  plan_obj.serves)

    selected = [u for u in units if u.kind != "interval" or u.index in chosen]
    _, keep, position = student_layout(adapter, selected)
    width_new = student_width_ops(selected, position)
    pruned = pruned_skeleton(adapter, width_new, keep)
    copies = plan_copies(adapter, selected, pruned.state_dict(), teacher_tensors(model_path), plug_tensors,
                         DTYPES[dtype] if dtype else None)  # every tensor's source checked before a byte is written
    params = count_parameters(pruned)
    predicted = teacher_params - width_saving - sum(savings[k] for k in chosen)
    if params != predicted:  # a bug, not bad input: the structure differs from the accounting
        raise AssertionError(f"exported {params} parameters, accounting predicts {predicted}")
    result = ExportResult(out, chosen, params, teacher_params, type(pruned).__name__, out / LINEAGE_FILE)
    if keep_params is not None:
        result.subsets = subset_fractions(teacher_params, width_saving, savings)
        result.far_from_asked = far_from_asked_note(float(keep_params), params / teacher_params, result.subsets)
        if result.far_from_asked:
            print(f"export: warning: {result.far_from_asked}", file=sys.stderr, flush=True)
    lineage = build_lineage(adapter, selected, plan_bytes=plan_bytes, plan_hash=plan_hash(plan_obj), chosen=chosen,
                            teacher_path=str(model_path))

    with atomic_path(out, directory=True) as tmp:
        for item in model_path.iterdir():
            if item.name in ("transformer", PLAN_FILE, LINEAGE_FILE, *TEACHER_ONLY_FILES) or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        (tmp / "transformer").mkdir()
        pruned.save_config(tmp / "transformer")  # the config.json save_pretrained writes
        write_transformer_weights(copies, tmp / "transformer", shard_bytes)
        index = json.loads((tmp / "model_index.json").read_text())
        index["transformer"] = (write_custom_code(type(adapter), pruned, tmp / "transformer") if width_new
                                else ["diffusers", type(pruned).__name__])
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        card = model_card(plan_dict(plan_obj), run, chosen, result, model_path, lineage)
        (tmp / "README.md").write_text(card)
        (tmp / PLAN_FILE).write_bytes(plan_bytes)
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
        (tmp / "ppcl_export.json").write_text(json.dumps({
            "version": 1, "intervals": chosen, "parameters": params, "teacher_parameters": teacher_params,
            "plan_hash": run.get("plan_hash"), "transformer_class": result.transformer_class,
        }, indent=2) + "\n")
    return result
