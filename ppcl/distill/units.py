"""Plug units: what a plan trains (method.md sections 2-3), built from copies of teacher blocks.

A plan becomes *units*, each trained against the frozen teacher: one per depth interval ``[s, e]`` (a copy of
teacher block ``plug_source(s, e, init)``), one per teacher block touched by ``ffn_linear`` ops (the block with its
FFN(s) replaced by residual linear maps, first fitted by least squares), and one per ``text_freeze [a, b]`` (copies of
blocks ``a+1..b`` made text-frozen, see ``ppcl.arch.common``; ``ffn_linear`` image ops on those blocks join this unit).
A depth or ffn_linear unit has a start and an end block: it is fed the teacher's call entering ``start`` and compared
with the teacher's streams leaving ``end``.

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

How each kind of unit is fed and compared during training is :mod:`ppcl.distill.losses`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ppcl.arch.common import Adapter, op_dict
from ppcl.errors import PPCLError
from ppcl.plugs import depth_plug_specs, make_depth_plug, student_lists

#: a depth plug, a block with ffn_linear ops, or the frozen blocks of one text_freeze (recorded in run.json)
UnitKind = Literal["interval", "width", "text_freeze"]


@dataclass
class Unit:
    """One trained thing: a depth plug (``kind="interval"``), a width-modified block (``kind="width"``) or the
    frozen blocks of a text_freeze (``kind="text_freeze"``)."""

    name: str
    kind: UnitKind
    start: int
    end: int
    source: int
    module: nn.Module
    #: interval units: the plan index of the interval (``plan.intervals[index]``, what export's ``--intervals``
    #: names); None for width and text_freeze units
    index: int | None = None
    interval: list[int] | None = None
    ops: list[dict[str, Any]] = field(default_factory=list)
    #: text_freeze: the frozen blocks ``a+1..b`` (``module`` is an ``nn.ModuleList`` of them, in order)
    members: list[int] = field(default_factory=list)
    #: a unit meeting a text_freeze ``[a, b]``: ``a + 1``, whose teacher call carries ``tau`` (the frozen text)
    tau_block: int | None = None
    #: the text the unit is fed: ``"teacher"`` (the teacher's text entering ``start``) or ``"tau"``
    text_input: Literal["teacher", "tau"] = "teacher"
    #: the text the unit is compared with: ``"teacher"`` (leaving ``end``), ``"tau"``, or ``"none"`` (no text loss)
    text_target: Literal["teacher", "tau", "none"] = "teacher"
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


# ------------------------------------------------------------------------------------------------ plans
def plan_dict(plan: Any) -> dict[str, Any]:
    """The plan as plain JSON data (a Plan, a dict, or any object with attributes)."""
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
    """The plan was made for this model (family, block count, per-block parameters) and its intervals fit it;
    otherwise a one-line PPCLError starting with ``where``."""
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
                    index=spec.index, interval=[spec.start, spec.end])
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
    """Every unit's module under its name: the trained state (``<unit>.<param>`` keys of plugs.safetensors)."""
    return nn.ModuleDict({u.name: u.module for u in units})


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


def student_layout(adapter: Adapter, units: list[Unit]):
    """The student's block lists with ``units`` in place (:func:`ppcl.plugs.student_lists`' ``lists, keep,
    position``): interval plugs replace their intervals, width / text_freeze modules the blocks they modify."""
    plugs = {u.start: (u.end, u.module, u.source) for u in units if u.kind == "interval"}
    replaced = {k: m for u in units if u.kind != "interval" for k, m in u.placed().items()}
    return student_lists(adapter, plugs, replaced)
