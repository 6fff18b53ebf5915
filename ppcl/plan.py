"""The Plan: which contiguous intervals of teacher blocks are replaced by one plug each, plus width operations,
with exact parameter accounting (method.md sections 1-3).

``plan.json`` (version 1)::

    {"version": 1, "family": "qwenimage",
     "teacher": {"num_blocks": 60, "total_params": ..., "blocks": [{"index": 0, "kind": "dual", "params": ...,
                 "streams": ["image", "text"]}, ...]},
     "intervals": [[3, 4], [5, 7], ...],          # 0-based inclusive, execution order, non-overlapping
     "width": [{"op": "ffn_linear", "block": 2, "stream": "image"},
               {"op": "text_freeze", "interval": [36, 37]}],
     "init": "middle", "allow_ends": false, "protect": [],
     "params": {"teacher": ..., "student": ...},
     "plug_sources": [4, 6, ...],                 # teacher block each plug starts from, one per interval
     "selection": {...}}                          # free-form metadata of the selector (method, budget, scores)

Rules (checked on construction, on load and before anything is written):

- interval ``[s, e]``: ``0 <= s <= e < L``; sorted, no two share a block (adjacent is fine, as in the released
  Qwen-Image plan ``[3,4],[5,7]``); all of ``s..e`` of one kind (FLUX dual/single). ``[s, s]`` re-trains block s
  in place and removes nothing.
- an interval that removes blocks (``s < e``) may not contain the first or last block unless ``allow_ends``, nor a
  protected block: a protected block is one kept exactly as the teacher has it.
- width ops: ``ffn_linear`` names a block that the plan keeps (not inside an interval with ``s < e``) and a stream
  that block has; at most one op per (block, stream). ``text_freeze [a, b]`` needs ``a < b``, dual blocks with a
  text stream throughout, and no overlap with another ``text_freeze``; it may overlap depth intervals (the
  released 10B model freezes [50, 59] around its depth intervals [52, 53], ...).

Parameter accounting is exact and comes from the modules: ``student = teacher - sum_intervals (params of blocks
s..e) + params(block plug_source(s, e, init))`` minus the net savings of width ops as reported by the adapter's
``width_op_params(op) -> (removed, added)`` (implemented with the width plugs; a plan with width ops cannot be
counted without it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ppcl.errors import PPCLError

PLAN_VERSION = 1
INIT_MODES = ("middle", "first", "last")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherBlock(_Model):
    index: int
    kind: str
    params: int = Field(ge=0)
    streams: list[str] = Field(default_factory=lambda: ["image", "text"])


class Teacher(_Model):
    num_blocks: int = Field(ge=1)
    total_params: int = Field(ge=0)
    blocks: list[TeacherBlock]


class FfnLinear(_Model):
    op: Literal["ffn_linear"]
    block: int
    stream: Literal["image", "text"]


class TextFreeze(_Model):
    op: Literal["text_freeze"]
    interval: tuple[int, int]


WidthOp = FfnLinear | TextFreeze


class Params(_Model):
    teacher: int
    student: int


class Plan(_Model):
    version: int = PLAN_VERSION
    family: str
    teacher: Teacher
    intervals: list[tuple[int, int]]
    width: list[FfnLinear | TextFreeze] = Field(default_factory=list)
    init: Literal["middle", "first", "last"] = "middle"
    allow_ends: bool = False
    protect: list[int] = Field(default_factory=list)
    params: Params
    plug_sources: list[int] = Field(default_factory=list)
    selection: dict[str, Any] = Field(default_factory=dict)

    @field_validator("family")
    @classmethod
    def _family(cls, v):
        from ppcl.arch import FAMILIES

        if v not in FAMILIES:
            raise ValueError(f"unknown family '{v}': expected one of {', '.join(FAMILIES)}")
        return v

    @field_validator("intervals", mode="before")
    @classmethod
    def _pairs(cls, v):
        if not isinstance(v, list):
            raise ValueError("intervals must be a list of [start, end] pairs")
        for i, iv in enumerate(v):
            if not isinstance(iv, (list, tuple)) or len(iv) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in iv
            ):
                raise ValueError(f"interval #{i} {iv!r} is not a [start, end] pair of integers")
        return v

    @model_validator(mode="after")
    def _check(self):
        check_plan(self)
        return self

    @property
    def removed_blocks(self) -> int:
        return sum(e - s for s, e in self.intervals)

    def blocks_in_intervals(self) -> set[int]:
        """Blocks replaced by a plug in an interval that removes something (``s < e``)."""
        return {i for s, e in self.intervals if e > s for i in range(s, e + 1)}


def _fmt(iv) -> str:
    return f"[{iv[0]}, {iv[1]}]"


def check_intervals(
    intervals: list[tuple[int, int]] | list[list[int]],
    kinds: list[str],
    *,
    allow_ends: bool = False,
    protect: list[int] | tuple[int, ...] = (),
) -> None:
    """Raise PPCLError naming the first interval that is malformed, out of range, overlapping, across a kind
    boundary, or removing an end/protected block."""
    n = len(kinds)
    prev = None
    protected = set(protect)
    for iv in intervals:
        s, e = iv
        if s > e:
            raise PPCLError(f"interval {_fmt(iv)}: start after end")
        if s < 0 or e >= n:
            raise PPCLError(f"interval {_fmt(iv)}: out of range (the teacher has blocks 0..{n - 1})")
        if prev is not None and s <= prev[1]:
            if s < prev[0]:
                raise PPCLError(f"interval {_fmt(iv)}: intervals must be in execution order (after {_fmt(prev)})")
            raise PPCLError(f"interval {_fmt(iv)}: overlaps {_fmt(prev)}")
        if len({kinds[i] for i in range(s, e + 1)}) > 1:
            raise PPCLError(
                f"interval {_fmt(iv)}: crosses a block-kind boundary "
                f"({', '.join(sorted({kinds[i] for i in range(s, e + 1)}))}); intervals stay within one kind"
            )
        if e > s:
            ends = [i for i in (0, n - 1) if s <= i <= e]
            if ends and not allow_ends:
                raise PPCLError(
                    f"interval {_fmt(iv)}: removes the {'first' if ends[0] == 0 else 'last'} block "
                    f"{ends[0]} (pass allow_ends / --allow-ends to permit it)"
                )
            hit = sorted(protected.intersection(range(s, e + 1)))
            if hit:
                raise PPCLError(f"interval {_fmt(iv)}: contains protected block {hit[0]}")
        prev = iv


def check_plan(plan: Plan) -> None:
    """Every rule of the module docstring; raises PPCLError naming the offending interval/op/field."""
    t = plan.teacher
    if len(t.blocks) != t.num_blocks or [b.index for b in t.blocks] != list(range(t.num_blocks)):
        raise PPCLError(f"teacher.blocks must list blocks 0..{t.num_blocks - 1} in order")
    kinds = [b.kind for b in t.blocks]
    for p in plan.protect:
        if not 0 <= p < t.num_blocks:
            raise PPCLError(f"protected block {p}: out of range (the teacher has blocks 0..{t.num_blocks - 1})")
    check_intervals(plan.intervals, kinds, allow_ends=plan.allow_ends, protect=plan.protect)
    if plan.plug_sources and len(plan.plug_sources) != len(plan.intervals):
        raise PPCLError(f"plug_sources has {len(plan.plug_sources)} entries for {len(plan.intervals)} intervals")
    for src, (s, e) in zip(plan.plug_sources, plan.intervals):
        if not s <= src <= e:
            raise PPCLError(f"interval [{s}, {e}]: plug source {src} lies outside the interval")
    removed = plan.blocks_in_intervals()
    seen: set[tuple[int, str]] = set()
    frozen: list[tuple[int, int]] = []
    for op in plan.width:
        if isinstance(op, FfnLinear):
            if not 0 <= op.block < t.num_blocks:
                raise PPCLError(f"width op ffn_linear block {op.block}: out of range (blocks 0..{t.num_blocks - 1})")
            if op.stream not in t.blocks[op.block].streams:
                raise PPCLError(f"width op ffn_linear block {op.block}: the block has no {op.stream} stream")
            if op.block in removed:
                raise PPCLError(f"width op ffn_linear block {op.block}: the block is inside a depth interval")
            if (op.block, op.stream) in seen:
                raise PPCLError(f"width op ffn_linear block {op.block} stream {op.stream}: given twice")
            seen.add((op.block, op.stream))
        else:
            a, b = op.interval
            if not a < b:
                raise PPCLError(f"width op text_freeze {_fmt(op.interval)}: needs start < end")
            if a < 0 or b >= t.num_blocks:
                raise PPCLError(f"width op text_freeze {_fmt(op.interval)}: out of range "
                                f"(blocks 0..{t.num_blocks - 1})")
            bad = [i for i in range(a, b + 1) if t.blocks[i].kind != "dual" or "text" not in t.blocks[i].streams]
            if bad:
                raise PPCLError(f"width op text_freeze {_fmt(op.interval)}: block {bad[0]} has no own text stream")
            for fa, fb in frozen:
                if a <= fb and fa <= b:
                    raise PPCLError(f"width op text_freeze {_fmt(op.interval)}: overlaps text_freeze [{fa}, {fb}]")
            frozen.append((a, b))
    if plan.params.teacher != t.total_params:
        raise PPCLError(f"params.teacher {plan.params.teacher} differs from teacher.total_params {t.total_params}")


# ------------------------------------------------------------------------------------------ accounting
def student_params(
    total_params: int,
    block_params: list[int],
    intervals: list[tuple[int, int]] | list[list[int]],
    sources: list[int],
) -> int:
    """``total - sum(params of s..e) + params(source)`` over the intervals (depth only)."""
    out = total_params
    for (s, e), src in zip(intervals, sources, strict=True):
        out -= sum(block_params[s:e + 1]) - block_params[src]
    return out


def predict_params(plan: Plan, adapter) -> dict[str, int]:
    """Exact ``{"teacher": ..., "student": ...}`` counted from the adapter's modules (depth and width)."""
    blocks = adapter.blocks()
    if len(blocks) != plan.teacher.num_blocks:
        raise PPCLError(f"the plan is for {plan.teacher.num_blocks} blocks, the model has {len(blocks)}")
    check_intervals(plan.intervals, [b.kind for b in blocks], allow_ends=plan.allow_ends, protect=plan.protect)
    teacher = adapter.total_parameters()
    sources = [adapter.plug_source(s, e, plan.init) for s, e in plan.intervals]
    student = student_params(teacher, [b.params for b in blocks], plan.intervals, sources)
    if plan.width:
        op_params = getattr(adapter, "width_op_params", None)
        if op_params is None:
            raise PPCLError(f"cannot count width operations for {adapter.family}: its adapter has no width_op_params")
        for op in plan.width:
            removed, added = op_params(op)
            student -= removed - added
    return {"teacher": teacher, "student": student}


def teacher_from_adapter(adapter) -> Teacher:
    return Teacher(
        num_blocks=adapter.num_blocks,
        total_params=adapter.total_parameters(),
        blocks=[TeacherBlock(index=b.index, kind=b.kind, params=b.params, streams=list(b.streams))
                for b in adapter.blocks()],
    )


def make_plan(adapter, intervals, *, width=(), init: str = "middle", allow_ends: bool = False,
              protect=(), selection: dict[str, Any] | None = None) -> Plan:
    """A validated plan for the model behind ``adapter`` with exact parameter counts from its modules."""
    teacher = teacher_from_adapter(adapter)
    intervals = [tuple(iv) for iv in intervals]
    check_intervals(intervals, [b.kind for b in teacher.blocks], allow_ends=allow_ends, protect=list(protect))
    try:
        draft = Plan.model_construct(
            family=adapter.family, teacher=teacher, intervals=intervals,
            width=[_width_op(op) for op in width], init=init, allow_ends=allow_ends, protect=list(protect),
            params=Params(teacher=teacher.total_params, student=teacher.total_params),
        )
        params = predict_params(draft, adapter)
        return Plan(
            family=adapter.family, teacher=teacher, intervals=intervals, width=list(draft.width), init=init,
            allow_ends=allow_ends, protect=list(protect), params=Params(**params),
            plug_sources=[adapter.plug_source(s, e, init) for s, e in intervals], selection=dict(selection or {}),
        )
    except ValidationError as e:
        raise PPCLError(f"invalid plan: {_first_error(e)}") from None


def _width_op(op):
    if isinstance(op, (FfnLinear, TextFreeze)):
        return op
    if isinstance(op, dict) and op.get("op") == "ffn_linear":
        return FfnLinear(**op)
    if isinstance(op, dict) and op.get("op") == "text_freeze":
        return TextFreeze(**op)
    raise PPCLError(f"unknown width operation {op!r}: expected op ffn_linear or text_freeze")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"field {where}: {msg}"


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Validate again and write ``plan.json`` atomically."""
    from ppcl.atomic import write_json

    Plan.model_validate(plan.model_dump())  # a plan built with model_construct must still pass every rule
    return write_json(path, plan.model_dump(mode="json"))


def load_plan(path: str | Path) -> Plan:
    """Read and validate ``plan.json``; a bad file -> PPCLError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise PPCLError(f"plan file not found: {path}")
    try:
        plan = Plan.model_validate_json(path.read_text())
    except ValidationError as e:
        err = e.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, PPCLError):
            raise PPCLError(f"invalid plan {path}: {cause}") from None
        raise PPCLError(f"invalid plan {path}: {_first_error(e)}") from None
    except PPCLError as e:
        raise PPCLError(f"invalid plan {path}: {e}") from None
    if plan.version != PLAN_VERSION:
        raise PPCLError(f"invalid plan {path}: version {plan.version}, expected {PLAN_VERSION}")
    return plan


def format_plan(plan: Plan) -> str:
    """A readable table of the plan (``ppcl plan show``)."""
    t = plan.teacher
    lines = [
        f"family {plan.family}: {t.num_blocks} teacher blocks -> {t.num_blocks - plan.removed_blocks} "
        f"(removes {plan.removed_blocks}; init {plan.init})",
        f"params: teacher {plan.params.teacher:,} -> student {plan.params.student:,} "
        f"({plan.params.student / max(plan.params.teacher, 1):.1%} kept)",
    ]
    if plan.selection.get("method"):
        lines.append(f"selected by {plan.selection['method']}"
                     + (f" ({plan.selection['budget']})" if plan.selection.get("budget") else ""))
    lines.append("")
    lines.append(f"{'interval':>12} {'kind':>6} {'blocks':>6} {'removes':>7} {'plug from':>9} {'params removed':>15}")
    sources = plan.plug_sources or [None] * len(plan.intervals)
    for (s, e), src in zip(plan.intervals, sources):
        removed = sum(b.params for b in t.blocks[s:e + 1]) - (t.blocks[src].params if src is not None else 0)
        lines.append(f"{f'[{s}, {e}]':>12} {t.blocks[s].kind:>6} {e - s + 1:>6} {e - s:>7} "
                     f"{'-' if src is None else src:>9} {removed:>15,}")
    if not plan.intervals:
        lines.append(f"{'(none)':>12}")
    if plan.width:
        lines.append("")
        lines.append("width operations:")
        for op in plan.width:
            if isinstance(op, FfnLinear):
                lines.append(f"  ffn_linear   block {op.block} ({op.stream} stream)")
            else:
                lines.append(f"  text_freeze  [{op.interval[0]}, {op.interval[1]}]")
    return "\n".join(lines)
