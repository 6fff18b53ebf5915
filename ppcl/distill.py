"""Pluggable distillation (method.md sections 2-3): every plug of a plan trained in one teacher pass.

Units. A plan becomes *units*, each trained against the frozen teacher: one per depth interval ``[s, e]`` (a copy of
teacher block ``plug_source(s, e, init)``), one per teacher block touched by ``ffn_linear`` ops (the block with its
FFN(s) replaced by residual linear maps, first fitted by least squares), and one per ``text_freeze [a, b]`` (copies of
blocks ``a+1..b`` made text-frozen, see ``ppcl.arch.common``; ``ffn_linear`` image ops on those blocks join this unit).
A depth or ffn_linear unit has a start and an end block: it is fed the teacher's call entering ``start`` and compared
with the teacher's streams leaving ``end``.

A text_freeze unit is trained in the same teacher pass, non-sequentially too: every frozen block ``k`` is fed the
teacher's call entering ``k`` with its text replaced by ``tau``, the teacher's text entering ``a+1`` (what the student's
frozen text state is when block ``a`` is the teacher's); losses: ``image`` = mean over ``k`` of D(image out of k,
teacher image leaving k), ``text`` = D(text out of b, teacher text leaving b). Everything in the frozen blocks trains
(their image stream, the light text modulations, the projections), like the ffn_linear units. An ``ffn_linear`` text
op may not name a frozen block (its text FFN is already gone).

text_freeze and depth intervals compose (the released Qwen-Image plan freezes [50, 59] around [52, 53], [54, 55],
[56, 57]); the rules and the three roles (``member``, ``last``, ``source``) are :func:`ppcl.plan.text_freeze_roles`'.
Every unit is trained on the *frozen reference* of the text stream (teacher text up to ``a``, ``tau`` through
``a+1..b-1``, the teacher's text leaving ``b``), so each unit sees exactly what the others hand it in the student:
- a ``member`` / ``last`` plug of ``[s, e]`` (``a < s``) is a copy of its source block made text-frozen (block ``a``'s
  modulation copy; ``last``: with the text projection); it is fed the teacher's call entering ``s`` with text ``tau``;
  losses: image against the teacher's image leaving ``e``; text (``last`` only) against the teacher's text leaving
  ``b`` (a ``member`` returns ``tau`` exactly: no text loss).
- a ``source`` plug of ``[s, e]`` (``s <= a <= e < b``) is a plain copy fed the teacher's call entering ``s``; its text
  is compared with ``tau`` (the frozen state the blocks after it are trained on), its image with the teacher's.
- the text_freeze unit keeps a frozen copy of EVERY block ``a+1..b``, those inside depth intervals too: one run
  serves every subset of plugs (pluggability), and a block whose interval is left out at export needs its frozen
  form. ``tau`` is always the teacher's text leaving block ``a`` (captured as the call entering ``a+1``).

Non-sequential (default). One stock teacher forward under ``no_grad`` with hooks captures, for every unit, the call
entering its start block and the streams leaving its end block (the forward stops right after the last end
block unless the output-level loss needs the full output). Each unit then runs once on its captured call WITH
grad; loss D (:func:`ppcl.plugs.plug_loss`) on every stream the unit returns. Nothing else runs: no chain of
student blocks whose output is never used.

Sequential (``mode="sequential"``, the ablation). The student is the teacher with every unit in place (a
module-list edit) run through the stock forward; each unit sees what the previous ones produced; loss at each
unit's end against the teacher's streams there.

Choices where method.md is silent (all parameters of :class:`DistillSettings`):
- Noise. The noise and sigmas of step ``t`` come from a generator seeded with ``(seed, t, rank)``, so a resumed run
  draws exactly what the uninterrupted one drew without any generator state to restore; the global torch /
  python / numpy RNG states are still checkpointed (for anything else that draws).
- Data. Batches are visited in epochs; the order of an epoch is a permutation seeded by ``(seed, epoch)`` for the
  in-memory synthetic set; a latent cache is read through ``ppcl.data.cache.iter_cache_batches``. The data
  position ``(epoch, index)`` is checkpointed; resuming re-opens the epoch and skips ``index`` batches.
- Multi-GPU (``accelerate launch``): each process takes every ``world``-th batch; plug gradients are all-reduced
  (mean) explicitly after backward (plugs are called one by one, so a DDP wrapper around them would never see a
  forward); only rank 0 writes.
- Optimiser: AdamW (bitsandbytes 8-bit on CUDA when importable), linear warm-up then cosine to zero, gradient
  clipping at ``max_grad_norm``. Mixed precision: bf16 autocast on CUDA (fp32 master weights), none on CPU.
- Output-level loss (off by default): ``output_loss_weight * mean((v_student - v_teacher)^2)`` with every unit in
  place (needs a full student forward, so it only runs when the weight is > 0). It couples the plugs: each one's
  gradient then also depends on the others being in place, so a subset exported without some of them runs in a
  context it was not trained for (on the reference teacher it is worth ~3 accuracy points at the full plan and
  costs 1.2 points to a plug exported alone; docs/benchmark.md). ``output_loss_keep < 1`` puts a random subset of
  the depth plugs in place for that term each step, so each plug is also trained in the contexts a subset export
  creates.

RUN layout: ``RUN/plugs.safetensors`` (final plug weights, keys ``<unit>.<param>``), ``RUN/run.json`` (versioned:
plan hash, teacher, settings, per-unit source block, final losses), ``RUN/metrics.jsonl`` (one line per step),
``RUN/checkpoints/step-XXXXXX/`` (``plugs.safetensors``, ``training_state.pt`` (optimizer + scheduler),
``rng.pt``, ``state.json``), each written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppcl.arch.common import Adapter, BlockCall, _StopForward, op_dict, split_output
from ppcl.atomic import atomic_path, write_json
from ppcl.errors import PPCLError
from ppcl.plugs import (
    LOSS_EPS,
    NormalEquations,
    StudentView,
    depth_plug_specs,
    freeze,
    make_depth_plug,
    plug_loss,
    student_lists,
)

RUN_VERSION = 1
CHECKPOINT_VERSION = 1
MODES = ("nonsequential", "sequential")


@dataclass
class DistillSettings:
    """Every knob of a distillation run (recorded in run.json)."""

    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float | None = 1.0
    mode: str = "nonsequential"
    #: plug initialisation: ``middle`` | ``first`` | ``last``; None -> the plan's ``init``
    init: str | None = None
    timesteps: str = "uniform"
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    output_loss_weight: float = 0.0
    #: non-sequential only: probability that each depth plug is in place for the output-level term (1: all of
    #: them; < 1: a random subset per step, at least one, so each plug also learns to work without the others)
    output_loss_keep: float = 1.0
    gradient_checkpointing: bool = False
    #: ``auto`` (bf16 on CUDA, none on CPU) | ``no`` | ``bf16``
    mixed_precision: str = "auto"
    loss_eps: float = LOSS_EPS
    #: built-in synthetic data (when no cache is given): samples and image size
    n_samples: int = 16
    resolution: int = 64
    #: batches whose normal equations initialise width projections, and the relative ridge
    lsq_batches: int = 8
    ridge: float = 1e-4
    guidance: float | None = None
    use_8bit_adam: bool = True

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise PPCLError(f"distill needs steps >= 1 and batch_size >= 1 (got {self.steps}, {self.batch_size})")
        if self.mode not in MODES:
            raise PPCLError(f"unknown distill mode '{self.mode}': expected {' or '.join(MODES)}")
        if self.timesteps not in ("uniform", "logit_normal"):
            raise PPCLError(f"unknown timestep sampling '{self.timesteps}': expected uniform or logit_normal")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise PPCLError(f"unknown mixed precision '{self.mixed_precision}': expected auto, no or bf16")
        if self.checkpoint_every < 1:
            raise PPCLError(f"checkpoint_every must be >= 1 (got {self.checkpoint_every})")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise PPCLError(f"learning rate must be positive (got {self.lr})")
        if not 0 < self.output_loss_keep <= 1:
            raise PPCLError(f"output_loss_keep must be in (0, 1] (got {self.output_loss_keep})")


@dataclass
class Unit:
    """One trained thing: a depth plug (``kind="interval"``) or a width-modified block (``kind="width"``)."""

    name: str
    kind: str
    start: int
    end: int
    source: int
    module: nn.Module
    interval: list[int] | None = None
    ops: list[dict[str, Any]] = field(default_factory=list)
    #: text_freeze: the frozen blocks ``a+1..b`` (``module`` is an ``nn.ModuleList`` of them, in order)
    members: list[int] = field(default_factory=list)
    #: a unit meeting a text_freeze ``[a, b]``: ``a + 1``, whose teacher call carries ``tau`` (the frozen text)
    tau_block: int | None = None
    #: the text the unit is fed: ``"teacher"`` (the teacher's text entering ``start``) or ``"tau"``
    text_input: str = "teacher"
    #: the text the unit is compared with: ``"teacher"`` (leaving ``end``), ``"tau"``, or ``"none"`` (no text loss)
    text_target: str = "teacher"
    #: interval units meeting a text_freeze: the role of :func:`ppcl.plan.text_freeze_roles` and its ``[a, b]``
    freeze: tuple[str, list[int]] | None = None

    @property
    def inputs(self) -> set[int]:
        """Blocks whose teacher call the unit needs."""
        base = set(self.members) if self.members else {self.start}
        return base | ({self.tau_block} if self.tau_block is not None else set())

    @property
    def outputs(self) -> set[int]:
        """Blocks whose teacher output the unit is compared with."""
        return set(self.members) if self.members else {self.end}

    def placed(self) -> dict[int, nn.Module]:
        """Teacher block index -> module, for the kept blocks this unit replaces in a student (width units)."""
        if self.members:
            return dict(zip(self.members, self.module))
        return {self.start: self.module}


@dataclass
class DistillResult:
    run_dir: Path
    steps: int
    final_losses: dict[str, float]
    plugs: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------ plans
def _load_plan(plan: Any):
    """A Plan from a path or an object (validated by ppcl.plan)."""
    if isinstance(plan, (str, Path)):
        from ppcl.plan import load_plan

        return load_plan(plan)
    if isinstance(plan, dict):
        from ppcl.plan import Plan

        try:
            return Plan.model_validate(plan)
        except Exception as e:  # pydantic ValidationError: say what, on one line
            raise PPCLError(f"invalid plan: {str(e).splitlines()[0]}") from None
    return plan


def plan_dict(plan: Any) -> dict[str, Any]:
    if hasattr(plan, "model_dump"):
        return plan.model_dump(mode="json")
    if not isinstance(plan, dict):
        plan = vars(plan)
    return json.loads(json.dumps(plan, default=lambda o: o.model_dump(mode="json") if hasattr(o, "model_dump") else vars(o)))


def plan_hash(plan: Any) -> str:
    """sha256 of the plan's structure (family, intervals, width ops, init): what plugs were trained for.
    Predicted parameter counts are left out so re-saving a plan does not orphan its plugs."""
    d = plan_dict(plan)
    core = {k: d.get(k) for k in ("family", "intervals", "width", "init")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def _width_ops(plan: Any) -> list[dict[str, Any]]:
    return [op_dict(op) for op in (getattr(plan, "width", None) or [])]


def check_plan_family(plan: Any, adapter: Adapter, where: str) -> None:
    fam = getattr(plan, "family", None)
    if fam is not None and fam != adapter.family:
        raise PPCLError(f"{where}: plan is for family '{fam}' but the model is '{adapter.family}'")
    teacher = getattr(plan, "teacher", None)
    if teacher is not None:
        if teacher.num_blocks != adapter.num_blocks:
            raise PPCLError(f"{where}: plan was made for a model with {teacher.num_blocks} blocks, this one has "
                            f"{adapter.num_blocks}")
        for info, tb in zip(adapter.blocks(), teacher.blocks):
            if info.params != tb.params:
                raise PPCLError(f"{where}: plan was made for another model (block {info.index} has {info.params} "
                                f"parameters here, {tb.params} in the plan)")
    # Validated against the teacher: ranges, overlaps, list crossings.
    depth_plug_specs(adapter, [list(iv) for iv in plan.intervals], getattr(plan, "init", None) or "middle")


def build_units(adapter: Adapter, plan: Any, init: str | None = None) -> list[Unit]:
    """The plan's units with their initial weights (copies of teacher blocks; width projections at identity).

    The composition rules are checked again here (defensive: a plan made with ``model_construct`` or a dict skips
    ``ppcl.plan``'s validation); the same one-line errors as at load time."""
    import copy

    from ppcl.plan import text_freeze_roles

    init = init or getattr(plan, "init", None) or "middle"
    intervals = [list(iv) for iv in plan.intervals]
    specs = depth_plug_specs(adapter, intervals, init)
    inside = {l: (s, e) for s, e in intervals for l in range(s, e + 1)}
    ops = _width_ops(plan)
    frozen: dict[int, tuple[int, int, dict[str, Any]]] = {}  # member block -> (a, b, op)
    freezes: list[tuple[int, int, dict[str, Any]]] = []
    for op in ops:
        if op.get("op") != "text_freeze":
            continue
        a, b = adapter.text_freeze_interval(op)
        for fa, fb, _ in freezes:
            if a <= fb and fa <= b:
                raise PPCLError(f"width op text_freeze [{a}, {b}] overlaps text_freeze [{fa}, {fb}]")
        for k in range(a + 1, b + 1):
            frozen[k] = (a, b, op)
        freezes.append((a, b, op))
    roles = text_freeze_roles(intervals, [(a, b) for a, b, _ in freezes])
    freeze_op = {(a, b): op for a, b, op in freezes}

    units: list[Unit] = []
    for spec in specs:
        plug = make_depth_plug(adapter, spec)
        unit = Unit(f"interval_{spec.index}", "interval", spec.start, spec.end, spec.source, plug,
                    interval=[spec.start, spec.end])
        if spec.index in roles:
            role, (a, b) = roles[spec.index]
            unit.freeze, unit.tau_block = (role, [a, b]), a + 1
            if role == "source":
                unit.text_target = "tau"
            else:
                _freeze_plug(adapter, a, plug, freeze_op[(a, b)], project=role == "last")
                unit.text_input = "tau"
                unit.text_target = "teacher" if role == "last" else "none"
        units.append(unit)

    by_block: dict[int, list[dict[str, Any]]] = {}
    joined: dict[int, list[dict[str, Any]]] = {}  # ffn_linear ops on frozen blocks, applied inside the freeze unit
    for op in ops:
        kind = op.get("op")
        if kind == "text_freeze":
            continue
        if kind != "ffn_linear":
            raise PPCLError(f"width op '{kind}' is not supported by distill: expected ffn_linear or text_freeze")
        b = int(op["block"])
        if not 0 <= b < adapter.num_blocks:
            raise PPCLError(f"width op on block {b}: the model has {adapter.num_blocks} blocks")
        if b in inside:
            s, e = inside[b]
            raise PPCLError(f"width op ffn_linear block {b}: the block is inside a depth interval [{s}, {e}] "
                            "(its plug replaces it)")
        if b in frozen:
            fa, fb, _ = frozen[b]
            if op.get("stream") == "text":
                raise PPCLError(f"width op ffn_linear block {b} stream text: the block's text stream is frozen by "
                                f"text_freeze [{fa}, {fb}] (its text FFN is already removed)")
            joined.setdefault(b, []).append(op)
            continue
        by_block.setdefault(b, []).append(op)
    for b in sorted(by_block):
        module = copy.deepcopy(adapter.block(b)).float()
        for op in by_block[b]:
            adapter.apply_width_op(module, op)
        for p in module.parameters():
            p.requires_grad_(True)
        units.append(Unit(f"width_{b}", "width", b, b, b, module, ops=by_block[b]))
    for a, b, op in freezes:
        members = list(range(a + 1, b + 1))
        blocks = [copy.deepcopy(adapter.block(k)).float() for k in members]
        adapter.apply_text_freeze(adapter.block(a), blocks, op)  # block a is only read (its modulation rows)
        extra = []
        for k, block in zip(members, blocks):
            for fop in joined.get(k, []):
                adapter.apply_width_op(block, fop)
                extra.append(fop)
        module = nn.ModuleList(blocks).float()  # fp32 master weights, like every plug
        for p in module.parameters():
            p.requires_grad_(True)
        units.append(Unit(f"text_freeze_{a}_{b}", "text_freeze", a + 1, b, a, module, interval=[a, b],
                          ops=[op, *extra], members=members, tau_block=a + 1, text_input="tau"))
    return units


def _freeze_plug(adapter: Adapter, a: int, plug: nn.Module, op: dict[str, Any], project: bool) -> None:
    """Make a depth plug lying inside text_freeze ``[a, b]`` a text-frozen block IN PLACE (block ``a``'s modulation
    copy, text FFN and output projection gone), with the group's text projection only when ``project`` (the plug
    ends at ``b``); fp32 and trainable like every plug."""
    adapter.apply_text_freeze(adapter.block(a), [plug], op)  # a one-block group: it gets the projection ...
    if not project:  # ... which only the last position of the group carries
        del plug.ppcl_proj["text"]
        if not len(plug.ppcl_proj):
            del plug.ppcl_proj
    plug.float()
    for p in plug.parameters():
        p.requires_grad_(True)


def unit_table(units: list[Unit]) -> nn.ModuleDict:
    return nn.ModuleDict({u.name: u.module for u in units})


# ------------------------------------------------------------------------------------------------ data
def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BatchStream:
    """Deterministic, resumable stream of batches: position ``(epoch, index)`` within this process's share."""

    def __init__(self, epoch_iter: Callable[[int], Iterator[dict[str, Any]]]):
        self._epoch_iter = epoch_iter
        self.epoch = 0
        self.index = 0
        self._it: Iterator[dict[str, Any]] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._it = self._epoch_iter(self.epoch)
        for _ in range(self.index):
            if next(self._it, None) is None:
                raise PPCLError(f"checkpoint data position {state} is past the end of the data")

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._epoch_iter(self.epoch)
        for _ in range(2):
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            self.epoch, self.index = self.epoch + 1, 0
            self._it = self._epoch_iter(self.epoch)
        raise PPCLError("the training data is empty (no batch in an epoch)")


def memory_stream(batches: list[dict[str, Any]], seed: int) -> BatchStream:
    """Batches held in memory, re-ordered each epoch by a permutation seeded by ``(seed, epoch)``."""
    if not batches:
        raise PPCLError("the training data is empty")
    rank, world = _rank_world()

    def epoch_iter(epoch: int) -> Iterator[dict[str, Any]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(batches), generator=g).tolist()
        return iter([batches[i] for j, i in enumerate(order) if j % world == rank or len(batches) < world])

    return BatchStream(epoch_iter)


def cache_stream(path: str | Path, batch_size: int, seed: int) -> BatchStream:
    """Batches of a latent cache (``ppcl.data.cache.CacheDataset``: this process's share, shuffled by
    ``(seed, epoch)``), collated to ``batch_size`` (the last short batch of an epoch is kept)."""
    from ppcl.data.cache import CacheDataset, collate

    dataset = CacheDataset(path, shuffle=True, seed=seed)

    def epoch_iter(epoch: int) -> Iterator[dict[str, Any]]:
        dataset.set_epoch(epoch)
        rows: list[dict[str, Any]] = []
        for row in dataset:
            rows.append(row)
            if len(rows) == batch_size:
                yield collate(rows)
                rows = []
        if rows:
            yield collate(rows)

    return BatchStream(epoch_iter)


def synthetic_data(pipe: Any, settings: DistillSettings) -> list[dict[str, Any]]:
    """The built-in data (``ppcl.calibration.synthetic_batches``), computed once per run and held in memory."""
    from ppcl.calibration import synthetic_batches

    return list(
        synthetic_batches(pipe, n_samples=settings.n_samples, batch_size=settings.batch_size,
                          resolution=settings.resolution, seed=settings.seed)
    )


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ steps
def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def teacher_pass(
    adapter: Adapter, model_inputs: dict[str, Any], units: list[Unit], full: bool = False
) -> tuple[dict[int, BlockCall], dict[int, dict[str, torch.Tensor]], torch.Tensor | None]:
    """One stock teacher forward (no grad): calls entering every unit start, streams leaving every unit end, and
    (``full=True``) the model output. Without ``full`` the forward stops after the last end block."""
    starts = set().union(*(u.inputs for u in units)) if units else set()
    ends = set().union(*(u.outputs for u in units)) if units else set()
    last = max(ends) if ends else -1
    calls: dict[int, BlockCall] = {}
    outs: dict[int, dict[str, torch.Tensor]] = {}

    def on_input(i, call):
        if i in starts:
            calls[i] = BlockCall(_detach(call.kwargs))
        return None

    def on_output(i, call, streams):
        if i in ends:
            outs[i] = _detach(streams)
        if i == last and not full:
            raise _StopForward
        return None

    output = None
    with torch.no_grad(), adapter.hooks(on_input=on_input, on_output=on_output, indices=starts | ends):
        with contextlib.suppress(_StopForward):  # the pass ends after the last interval: nothing later is needed
            output = adapter.forward(model_inputs)
    return calls, outs, output


def _run_module(module: nn.Module, call: BlockCall, checkpointing: bool) -> dict[str, torch.Tensor]:
    if checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return split_output(checkpoint(module, use_reentrant=False, **call.kwargs))
    return split_output(module(**call.kwargs))


def _run_unit(unit: Unit, call: BlockCall, checkpointing: bool) -> dict[str, torch.Tensor]:
    return _run_module(unit.module, call, checkpointing)


def unit_tau(unit: Unit, calls: dict[int, BlockCall]) -> torch.Tensor:
    """``tau`` ``(B, T, D)`` of the text_freeze the unit meets: the teacher's text entering block ``a+1``."""
    return calls[unit.tau_block].kwargs["encoder_hidden_states"]


def frozen_calls(unit: Unit, calls: dict[int, BlockCall]) -> dict[int, BlockCall]:
    """The call of each frozen block of a text_freeze unit: the teacher's call entering it, with the text state
    replaced by tau, the teacher's text entering block ``a+1`` (unchanged through the frozen blocks)."""
    tau = unit_tau(unit, calls)
    return {k: calls[k].with_streams({"text": tau}) for k in unit.members}


def unit_call(unit: Unit, calls: dict[int, BlockCall]) -> BlockCall:
    """The call a depth / ffn_linear unit is fed: the teacher's call entering ``start``, its text replaced by
    ``tau`` for a plug inside a frozen text interval (module doc)."""
    call = calls[unit.start]
    if unit.text_input == "tau":
        call = call.with_streams({"text": unit_tau(unit, calls)})
    return call


def unit_target(
    unit: Unit, calls: dict[int, BlockCall], outs: dict[int, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The streams a depth / ffn_linear unit is compared with: the teacher's leaving ``end``, the text replaced by
    ``tau`` (``source`` plugs) or dropped (``member`` plugs, whose text is ``tau`` by construction)."""
    target = dict(outs[unit.end])
    if unit.text_target == "tau":
        target["text"] = unit_tau(unit, calls)
    elif unit.text_target == "none":
        target.pop("text", None)
    return target


def freeze_unit_losses(
    unit: Unit, outs: dict[int, dict[str, torch.Tensor]], target: dict[int, dict[str, torch.Tensor]], eps: float
) -> dict[str, torch.Tensor]:
    """``image``: mean over the frozen blocks in ``outs`` of D on the image stream; ``text``: D at block ``b``.

    ``outs`` holds every frozen block in non-sequential mode; in the sequential student only those no depth plug
    replaces (a plug ending at ``b`` then carries the text loss)."""
    present = [k for k in unit.members if k in outs]
    losses = {}
    if present:
        losses["image"] = torch.stack([plug_loss(outs[k]["image"], target[k]["image"], eps) for k in present]).mean()
    if unit.end in outs:
        losses["text"] = plug_loss(outs[unit.end]["text"], target[unit.end]["text"], eps)
    return losses


def unit_step_losses(
    unit: Unit, calls: dict[int, BlockCall], outs: dict[int, dict[str, torch.Tensor]], eps: float,
    checkpointing: bool = False,
) -> dict[str, torch.Tensor]:
    """Non-sequential losses of one unit on one teacher pass (captured ``calls`` and ``outs``)."""
    if unit.members:
        fcalls = frozen_calls(unit, calls)
        got = {k: _run_module(m, fcalls[k], checkpointing) for k, m in zip(unit.members, unit.module)}
        return freeze_unit_losses(unit, got, outs, eps)
    return unit_losses(unit, _run_unit(unit, unit_call(unit, calls), checkpointing), unit_target(unit, calls, outs),
                       eps)


def unit_losses(
    unit: Unit, out: dict[str, torch.Tensor], target: dict[str, torch.Tensor], eps: float
) -> dict[str, torch.Tensor]:
    """Loss D per stream the unit returns (SD3's last block: image only)."""
    return {s: plug_loss(out[s], target[s], eps) for s in out if s in target}


def output_loss_units(units: list[Unit], keep: float, generator: torch.Generator) -> list[Unit]:
    """The units in place for the output-level term of one step: every width / text_freeze unit and each depth
    plug with probability ``keep`` (at least one plug). Plugs tied to a text_freeze (``freeze`` role) are always in
    place: their roles assume the whole plan."""
    plugs = [u for u in units if u.kind == "interval" and u.freeze is None]
    if keep >= 1 or len(plugs) < 2:
        return units
    draw = torch.rand(len(plugs), generator=generator) < keep
    if not bool(draw.any()):
        draw[int(torch.randint(len(plugs), (1,), generator=generator))] = True
    dropped = {u.name for u, d in zip(plugs, draw.tolist()) if not d}
    return [u for u in units if u.name not in dropped]


def nonsequential_losses(
    adapter: Adapter, model_inputs: dict[str, Any], units: list[Unit], settings: DistillSettings, step: int = 0
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor | None]:
    """Per-unit, per-stream losses of one batch, every unit fed the TEACHER state entering it. The output-level
    term (weight > 0) runs the student with the units of :func:`output_loss_units`, drawn from a generator seeded
    by ``(seed, step)``: a resumed run draws what the uninterrupted one drew, and every rank draws the same."""
    full = settings.output_loss_weight > 0
    calls, outs, teacher_out = teacher_pass(adapter, model_inputs, units, full=full)
    losses = {u.name: unit_step_losses(u, calls, outs, settings.loss_eps, settings.gradient_checkpointing)
              for u in units}
    out_loss = None
    if full:
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 7_919 + 104_729)
        placed = output_loss_units(units, settings.output_loss_keep, g)
        student_out, _ = _student_forward(adapter, model_inputs, placed, capture=False)
        out_loss = (student_out.float() - teacher_out.float()).pow(2).mean()
    return losses, out_loss


def student_layout(adapter: Adapter, units: list[Unit]):
    plugs = {u.start: (u.end, u.module, u.source) for u in units if u.kind == "interval"}
    replaced = {k: m for u in units if u.kind != "interval" for k, m in u.placed().items()}
    return student_lists(adapter, plugs, replaced)


def _student_forward(
    adapter: Adapter, model_inputs: dict[str, Any], units: list[Unit], capture: bool, stop_early: bool = False
) -> tuple[torch.Tensor | None, dict[str, dict[str, torch.Tensor]]]:
    """The student (every unit in place) through the stock forward; optionally capture each unit's output
    (``captured[name]``: its streams; a text_freeze unit: ``captured[f"{name}@{k}"]`` for every frozen block k)."""
    lists, _, position = student_layout(adapter, units)
    covered = {l for u in units if u.kind == "interval" for l in range(u.start, u.end + 1)}
    at: dict[int, str] = {}
    for u in units:
        if u.members:  # frozen blocks a plug replaces are not in the student
            at.update({position[k]: f"{u.name}@{k}" for k in u.members if k not in covered})
        else:
            at[position[u.start]] = u.name
    last = max(at) if at else -1
    captured: dict[str, dict[str, torch.Tensor]] = {}

    def on_output(i, call, streams):
        if i in at:
            captured[at[i]] = streams
        if stop_early and i == last:
            raise _StopForward
        return None

    output = None
    with StudentView(adapter, lists) as student:
        ctx = student.hooks(on_output=on_output, indices=set(at)) if capture else contextlib.nullcontext()
        with ctx, contextlib.suppress(_StopForward):
            output = student.forward(model_inputs)
    return output, captured


def sequential_losses(
    adapter: Adapter, model_inputs: dict[str, Any], units: list[Unit], settings: DistillSettings, step: int = 0
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor | None]:
    """The ablation: each unit fed what the student produced before it; loss at each unit's end (the output-level
    term uses the same full student: ``output_loss_keep`` does not apply)."""
    full = settings.output_loss_weight > 0
    calls, outs, teacher_out = teacher_pass(adapter, model_inputs, units, full=full)
    student_out, captured = _student_forward(adapter, model_inputs, units, capture=True, stop_early=not full)
    losses = {}
    for u in units:
        if u.members:
            got = {k: captured[f"{u.name}@{k}"] for k in u.members if f"{u.name}@{k}" in captured}
            losses[u.name] = freeze_unit_losses(u, got, outs, settings.loss_eps)
        else:
            losses[u.name] = unit_losses(u, captured[u.name], unit_target(u, calls, outs), settings.loss_eps)
    out_loss = None
    if full:
        out_loss = (student_out.float() - teacher_out.float()).pow(2).mean()
    return losses, out_loss


# ------------------------------------------------------------------------------------------------ least squares
@torch.no_grad()
def fit_width_units(
    adapter: Adapter, units: list[Unit], batches: Iterable[dict[str, Any]], noise: Callable[[dict, int], Any],
    ridge: float, autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, int]:
    """Least-squares init of every width projection from normal equations over all ``batches`` (float64).

    With its projections at identity, a width-modified block returns exactly the input ``x`` of each projection:
    the post-attention state of a stream whose FFN is gone (ffn_linear), or tau, the frozen text state, at block
    ``b`` of a text_freeze (fed as in :func:`frozen_calls`), also when a depth plug ending at ``b`` carries the
    projection (fed as in :func:`unit_call`). The target ``y`` is the teacher block's output for that stream (leaving
    ``b``); ``y - x ~ W x + b`` is solved once from the normal equations accumulated over all batches.
    Returns the token count per ``unit[@block]/stream``."""
    width = [u for u in units if u.kind in ("width", "text_freeze")
             or (u.kind == "interval" and "ppcl_proj" in u.module._modules)]
    if not width:
        return {}
    # sites: (key, unit, teacher block index whose output is the target, module with ppcl_proj)
    sites = []
    for u in width:
        if u.kind == "interval":
            sites.append((u.name, u, u.end, u.module))
            continue
        for k, m in u.placed().items():
            if "ppcl_proj" in m._modules:
                sites.append((u.name if not u.members else f"{u.name}@{k}", u, k, m))
    eqs: dict[tuple[str, str], NormalEquations] = {}
    for key, _, _, m in sites:
        for s, lin in m.ppcl_proj.items():
            lin.set_solution(torch.zeros_like(lin.proj.weight), torch.zeros_like(lin.proj.bias))
            eqs[(key, s)] = NormalEquations(lin.proj.in_features)
    for j, batch in enumerate(batches):
        inputs = noise(batch, j)
        with autocast():
            calls, outs, _ = teacher_pass(adapter, inputs, width)
            for key, u, k, m in sites:
                call = frozen_calls(u, calls)[k] if u.members else unit_call(u, calls)
                x = split_output(m(**call.kwargs))
                for s in m.ppcl_proj:
                    eqs[(key, s)].update(x[s], outs[k][s])
    for key, _, _, m in sites:
        for s, lin in m.ppcl_proj.items():
            w, b = eqs[(key, s)].solve(ridge)
            lin.set_solution(w, b)
    return {f"{n}/{s}": e.count for (n, s), e in eqs.items()}


# ------------------------------------------------------------------------------------------------ checkpoints
def _checkpoint_dirs(run: Path) -> list[Path]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _json_rng() -> dict[str, Any]:
    py = random.getstate()
    npst = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }


def _restore_json_rng(st: dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(run: Path, step: int, units_table: nn.ModuleDict, optimizer, scheduler, data_state: dict,
                    phash: str, keep: int) -> Path:
    """Write ``RUN/checkpoints/step-XXXXXX`` atomically; drop older ones beyond ``keep``."""
    from safetensors.torch import save_file

    final = run / "checkpoints" / f"step-{step:06d}"
    with atomic_path(final, directory=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in units_table.state_dict().items()},
                  str(tmp / "plugs.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "training_state.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({
            "version": CHECKPOINT_VERSION, "step": step, "plan_hash": phash, "data": data_state, "rng": _json_rng(),
        }))
    for old in _checkpoint_dirs(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, phash: str) -> dict[str, Any]:
    """Read and validate one checkpoint folder; any damage -> one-line PPCLError naming the folder."""
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {state.get('version')} (expected {CHECKPOINT_VERSION})")
        plugs = load_file(str(ckpt / "plugs.safetensors"))
        training = torch.load(ckpt / "training_state.pt", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged checkpoint
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PPCLError(f"corrupt or truncated checkpoint {ckpt}: {msg}") from None
    if state.get("plan_hash") != phash:
        raise PPCLError(f"cannot resume from {ckpt}: it was trained for a different plan (plan hash differs)")
    return {"state": state, "plugs": plugs, "training": training, "rng": rng}


# ------------------------------------------------------------------------------------------------ optimiser
def make_optimizer(params: list[nn.Parameter], settings: DistillSettings, device: torch.device):
    """AdamW; bitsandbytes' 8-bit AdamW on CUDA when installed and ``use_8bit_adam``."""
    if settings.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb  # type: ignore

            return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------ main loop
def _load_model(model: Any):
    from ppcl.arch import get_adapter, load_pipeline

    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    return pipe, get_adapter(pipe)


def _metric_lines(path: Path, upto: int) -> None:
    """Keep metrics of steps <= ``upto`` only (a resumed run rewrites what followed its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                keep.append(line)
        except (ValueError, KeyError):
            break
    with atomic_path(path) as tmp:
        tmp.write_text("".join(l + "\n" for l in keep))


def distill(
    model: Any,
    plan: Any,
    out: str | Path,
    *,
    data: str | Path | list[dict[str, Any]] | None = None,
    settings: DistillSettings | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> DistillResult:
    """Train every plug of ``plan`` against the frozen teacher ``model``; write the RUN folder ``out``.

    Args:
        model: a pipeline directory (or a loaded diffusers pipeline).
        plan: plan.json path, a ``ppcl.plan.Plan`` or its dict.
        out: the RUN folder (see module doc).
        data: a latent cache folder, a list of cache-shaped batches, or None for the built-in synthetic set.
        settings: :class:`DistillSettings`; ``overrides`` set single fields (``steps=10, lr=1e-3``).
        resume: continue from the newest checkpoint in ``out`` (bit-exact on CPU); error if the plan differs.
        stop_after: stop as if killed after this many steps in total: no final outputs and no extra checkpoint
            (a resumed run restarts from the last regular checkpoint and replays the steps after it).
        on_step: ``on_step(step, metrics)`` after every step on rank 0 (MLflow logging hooks in here).
        on_checkpoint: ``on_checkpoint(folder)`` on rank 0 after each checkpoint is complete on disk, before the
            other ranks go on (``ppcl.distill_s3`` mirrors it to S3 here).
    Returns: :class:`DistillResult` (``final_losses``: mean over the last 10 steps, per ``unit/stream``).
    """
    settings = dataclasses.replace(settings or DistillSettings(), **overrides)
    settings.validate()
    run = Path(out)
    plan_obj = _load_plan(plan)
    phash = plan_hash(plan_obj)

    # ---- validate everything before writing anything
    if run.exists() and not resume and any(run.iterdir()):
        raise PPCLError(f"output {run} already exists: pass --resume to continue it, or choose another --out")
    ckpts = _checkpoint_dirs(run) if resume else []
    loaded = load_checkpoint(ckpts[-1], phash) if ckpts else None
    if resume and not ckpts and (run / "run.json").exists():
        old = json.loads((run / "run.json").read_text())
        if old.get("plan_hash") != phash:
            raise PPCLError(f"cannot resume {run}: it was trained for a different plan (plan hash differs)")
        raise PPCLError(f"run {run} is already complete (run.json exists); nothing to resume")

    from accelerate import Accelerator

    mp = settings.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mp)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    from ppcl.outputs import hold

    run_lock = hold(run) if accelerator.is_main_process else None  # noqa: F841 - a 2nd writer is refused at once

    pipe, adapter = _load_model(model)
    check_plan_family(plan_obj, adapter, "distill")
    freeze(adapter.transformer)
    teacher_dtype = torch.bfloat16 if mp == "bf16" else torch.float32
    adapter.transformer.to(device)
    if teacher_dtype != torch.float32:
        adapter.transformer.to(teacher_dtype)

    units = build_units(adapter, plan_obj, settings.init)
    if not units:
        raise PPCLError("the plan has no intervals and no width ops: nothing to distill")
    table = unit_table(units).to(device)
    params = [p for p in table.parameters() if p.requires_grad]

    if data is None:
        batches = synthetic_data(pipe, settings)
        stream = memory_stream(batches, settings.seed)
    elif isinstance(data, list):
        batches = data
        stream = memory_stream(batches, settings.seed)
    else:
        if not Path(data).exists():
            raise PPCLError(f"data path not found: {data}")
        batches = None
        stream = cache_stream(data, settings.batch_size, settings.seed)

    scheduler_config = dict(pipe.scheduler.config) if hasattr(pipe, "scheduler") else {}

    def noised(batch: dict[str, Any], step: int):
        from ppcl.calibration import noise_batch

        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 7_919 + rank)
        b = _to_device(batch, device, teacher_dtype)
        return noise_batch(adapter, scheduler_config, b, scheme=settings.timesteps, generator=g,
                           guidance=settings.guidance).model_inputs

    optimizer = make_optimizer(params, settings, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.warmup_steps, settings.steps)
    )
    start_step = 0
    metrics_path = run / "metrics.jsonl"
    if loaded is not None:
        try:
            table.load_state_dict({k: v.to(device) for k, v in loaded["plugs"].items()}, strict=True)
            optimizer.load_state_dict(loaded["training"]["optimizer"])
            scheduler.load_state_dict(loaded["training"]["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise PPCLError(f"checkpoint {ckpts[-1]} does not match this plan/model: {str(e).splitlines()[0]}") from None
        start_step = int(loaded["state"]["step"])
        stream.restore(loaded["state"]["data"])
        torch.set_rng_state(loaded["rng"]["torch"])
        if "cuda" in loaded["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(loaded["rng"]["cuda"])
        _restore_json_rng(loaded["state"]["rng"])
        if accelerator.is_main_process:
            _metric_lines(metrics_path, start_step)
    else:
        # Least-squares init of width projections (fresh runs only: a resumed run has them in its checkpoint).
        if any(u.kind in ("width", "text_freeze") for u in units):
            fit_batches = batches if batches is not None else _take(stream, settings.lsq_batches)
            fit_width_units(adapter, units, list(fit_batches)[: settings.lsq_batches],
                            lambda b, j: noised(b, -1 - j), settings.ridge, accelerator.autocast)
            if batches is None:
                stream.restore({"epoch": 0, "index": 0})

    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoints").mkdir(exist_ok=True)
    end_step = settings.steps if stop_after is None else min(settings.steps, int(stop_after))
    history: list[dict[str, float]] = []
    loss_fn = sequential_losses if settings.mode == "sequential" else nonsequential_losses
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=start_step, desc="distill", unit="step")
    metrics_file = open(metrics_path, "a") if accelerator.is_main_process else None
    last_ckpt = ckpts[-1] if ckpts else None
    try:
        table.train()
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            batch = next(stream)
            inputs = noised(batch, step)
            with accelerator.autocast():
                losses, out_loss = loss_fn(adapter, inputs, units, settings, step=step)
            total = sum(v for per in losses.values() for v in per.values())
            if out_loss is not None:
                total = total + settings.output_loss_weight * out_loss
            if not torch.isfinite(total).item():
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was written"
                raise PPCLError(f"loss is not finite at step {step + 1}: training stopped{where}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            done = step + 1
            flat = {f"{n}/{s}": float(v.detach()) for n, per in losses.items() for s, v in per.items()}
            record = {"step": done, "loss": float(total.detach()), "lr": scheduler.get_last_lr()[0],
                      "losses": flat, "step_time_s": time.perf_counter() - t0}
            if out_loss is not None:
                record["output_loss"] = float(out_loss.detach())
            history.append(flat)
            if accelerator.is_main_process:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if on_step is not None:
                    on_step(done, record)
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                if accelerator.is_main_process:
                    last_ckpt = save_checkpoint(run, done, table, optimizer, scheduler, stream.state(), phash,
                                                settings.keep_checkpoints)
                    if on_checkpoint is not None:
                        on_checkpoint(last_ckpt)
                accelerator.wait_for_everyone()
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()

    final_losses: dict[str, float] = {}
    tail = history[-10:]
    for key in (tail[0] if tail else {}):
        final_losses[key] = sum(h[key] for h in tail) / len(tail)
    plug_info = [
        {"name": u.name, "kind": u.kind, "interval": u.interval, "block": u.start if u.kind == "width" else None,
         "members": u.members or None,
         "source": u.source, "list_name": adapter.locate(u.source)[0], "ops": u.ops,
         "params": sum(p.numel() for p in u.module.parameters()),
         "final_loss": {k.split("/", 1)[1]: v for k, v in final_losses.items() if k.split("/", 1)[0] == u.name}}
        for u in units
    ]
    if end_step < settings.steps:
        return DistillResult(run, end_step, final_losses, plug_info)
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        from ppcl.integrity import teacher_fingerprint
        from ppcl.storage import sha256_file

        with atomic_path(run / "plugs.safetensors") as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in table.state_dict().items()}, str(tmp))
        write_json(run / "run.json", {
            "version": RUN_VERSION,
            "plan_hash": phash,
            "plan": plan_dict(plan_obj),
            "teacher": {"model": str(model) if isinstance(model, (str, Path)) else None, "family": adapter.family,
                        "num_blocks": adapter.num_blocks, "parameters": adapter.total_parameters(),
                        "fingerprint": teacher_fingerprint(model)},  # export refuses another teacher
            "plugs_sha256": sha256_file(run / "plugs.safetensors"),
            "settings": dataclasses.asdict(settings),
            "data": str(data) if isinstance(data, (str, Path)) else ("synthetic" if data is None else "in-memory"),
            "steps": settings.steps,
            "world_size": world,
            "plugs": plug_info,
            "final_losses": final_losses,
        })
    return DistillResult(run, settings.steps, final_losses, plug_info)


def _take(stream: BatchStream, n: int) -> list[dict[str, Any]]:
    return [next(stream) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def heldout_losses(
    model: Any, plan: Any, batches: list[dict[str, Any]], *, run: str | Path | None = None,
    seed: int = 12345, timesteps: str = "uniform", init: str | None = None, eps: float = LOSS_EPS,
    lsq: list[dict[str, Any]] | None = None, ridge: float = 1e-4,
) -> dict[str, float]:
    """Mean loss D per ``unit/stream`` on ``batches`` (non-sequential), with the trained plugs of ``run`` or, when
    ``run`` is None, the initial copies (width projections at identity, i.e. no projection; with ``lsq`` batches,
    at their least-squares fit on those batches, noised with seeds distinct from the held-out ones).
    Noise is seeded by ``seed`` so two calls see the same noised inputs."""
    from ppcl.calibration import noise_batch

    pipe, adapter = _load_model(model)
    plan_obj = _load_plan(plan)
    freeze(adapter.transformer)
    units = build_units(adapter, plan_obj, init)
    if run is not None:
        load_unit_weights(units, Path(run) / "plugs.safetensors")
    sched = dict(pipe.scheduler.config) if hasattr(pipe, "scheduler") else {}
    if lsq and run is None:
        fit_width_units(adapter, units, lsq, lambda b, j: noise_batch(
            adapter, sched, b, scheme=timesteps, generator=torch.Generator().manual_seed(seed + 1_000_000 + j)
        ).model_inputs, ridge)
    sums: dict[str, float] = {}
    for j, batch in enumerate(batches):
        g = torch.Generator().manual_seed(seed + j)
        inputs = noise_batch(adapter, sched, batch, scheme=timesteps, generator=g).model_inputs
        calls, outs, _ = teacher_pass(adapter, inputs, units)
        for u in units:
            for s, v in unit_step_losses(u, calls, outs, eps).items():
                sums[f"{u.name}/{s}"] = sums.get(f"{u.name}/{s}", 0.0) + float(v) / len(batches)
    return sums


def load_unit_weights(units: list[Unit], path: Path) -> None:
    """Load ``RUN/plugs.safetensors`` into ``units``; every name and shape must match."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise PPCLError(f"cannot read plugs {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    table = unit_table(units)
    expected = table.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise PPCLError(f"plugs {path} do not match the plan/model: {what}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise PPCLError(f"plugs {path} do not match the model: {k} has shape {tuple(sd[k].shape)}, "
                            f"expected {tuple(v.shape)}")
    table.load_state_dict(sd, strict=True)
