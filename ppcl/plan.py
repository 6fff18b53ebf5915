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
     "serves": {"0.7": [1, 3]},                   # optional: the plugs a ratio the plan was selected for exports
     "selection": {...}}                          # free-form metadata of the selector (method, budget, scores)

Rules (checked on construction, on load and before anything is written):

- interval ``[s, e]``: ``0 <= s <= e < L``; sorted, no two share a block (adjacent is fine, as in the released
  Qwen-Image plan ``[3,4],[5,7]``); all of ``s..e`` of one kind (FLUX dual/single). ``[s, s]`` re-trains block s
  in place and removes nothing.
- an interval that removes blocks (``s < e``) may not contain the first or last block unless ``allow_ends``, nor a
  protected block: a protected block is one kept exactly as the teacher has it.
- ``serves`` (written by a selection for several ratios with ``serve_subsets="joint"``, :func:`ppcl.select.select`
  ``serve``): keep ratio (a string, ``"0.7"``) -> the interval indices (``plan.intervals[k]``, sorted, distinct, at
  least one) whose plugs the model at that ratio keeps. ``export --keep-params 0.7`` and distillation's
  ``output_loss_ratios`` use the recorded subset for a ratio it names (:func:`ppcl.subsets.choose_intervals`), the
  size rule for any other.
- width ops: ``ffn_linear`` names a block that no depth interval replaces (not inside any interval, ``[s, s]``
  included: that block's plug is a plain copy) and a stream that block has; at most one op per (block, stream).
  ``text_freeze [a, b]`` needs ``a < b``, dual blocks with a text stream throughout, and no overlap with another
  ``text_freeze``. An ``ffn_linear`` text op may not name a frozen block ``a+1..b`` (its text FFN is already gone;
  block ``a`` keeps its text stream, so a text op there is fine); image ops on frozen blocks are fine.
- text_freeze and depth intervals compose (:func:`text_freeze_roles`; the released 10B model freezes [50, 59] around
  its depth intervals [52, 53], [54, 55], [56, 57] and its ffn_linear blocks 58, 59). The text stream of the student
  follows the *frozen reference*: the teacher's text up to block ``a``; ``tau`` (the teacher's text leaving ``a``)
  entering and leaving every block ``a+1..b-1``; the teacher's text leaving ``b`` after ``b``. A depth interval
  ``[s, e]`` meeting ``[a, b]`` takes one of three roles:

  * ``member`` (``a < s``, ``e < b``): its plug (a copy of the source block) is itself a text-frozen block: text
    modulation a copy of block ``a``'s, text FFN and output projection gone; the text passes through unchanged,
    only the image stream is distilled.
  * ``last`` (``a < s``, ``e == b``): the same, and the plug carries the residual text projection of the group
    (the last position of the frozen group in the student); its text is distilled to the teacher's text leaving ``b``.
  * ``source`` (``s <= a <= e < b``): the plug stands where block ``a`` stood: a full block (its own text stream)
    whose text is distilled to ``tau`` (the frozen state), not to the teacher's text leaving ``e``, so that the
    frozen blocks after it see what they were trained on. The frozen blocks keep block ``a``'s modulation copy
    (the teacher's block ``a`` is the modulation source whether or not this plug is used).

  Rejected: a plug crossing the end (``a < s <= b < e``: a frozen block's text is projected back to the teacher's
  only at ``b``) and a plug covering the whole group (``s <= a``, ``e >= b``: no frozen block would remain).

Parameter accounting is exact and comes from the modules (:func:`predict_params`): every block the student keeps
is counted as its width ops leave it (ffn_linear: the adapter's ``width_op_params(op) -> (removed, added)``;
text_freeze: per frozen block, its own text parts removed and block ``a``'s light modulation copy added, plus the
projection at ``b``); every interval ``[s, e]`` then replaces those counts of blocks ``s..e`` by its plug: block
``plug_source(s, e, init)``, made text-frozen (and projected) when its role is ``member`` / ``last``. Each
parameter is counted exactly once; a plan with width ops cannot be counted without ``width_op_params``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ppcl.errors import PPCLError, first_field_error
from ppcl.settings import PLUG_INITS, PlugInit

PLAN_VERSION = 1
INIT_MODES = PLUG_INITS

#: The authors' released Qwen-Image 20B -> 10B plan (method.md section 1; 0-based, inclusive): 25 of 60 blocks
#: removed by 13 plugs ...
QWEN_IMAGE_RELEASED_INTERVALS: list[list[int]] = [
    [3, 4], [5, 7], [8, 10], [11, 12], [15, 24], [25, 27], [29, 30], [42, 43], [45, 47], [48, 49], [52, 53], [54, 55],
    [56, 57],
]
#: ... and its width ops (method.md section 3): FFN -> linear in blocks 2, 58, 59 and the text stream frozen across
#: [36, 37], [40, 41], [50, 59]. Block 2 has both FFNs replaced; 58 and 59 lie in the frozen [50, 59], whose text FFN
#: is already gone, so only their image FFN is left to replace (a text op there is rejected).
QWEN_IMAGE_RELEASED_WIDTH: list[dict[str, Any]] = [
    {"op": "ffn_linear", "block": 2, "stream": "image"}, {"op": "ffn_linear", "block": 2, "stream": "text"},
    {"op": "ffn_linear", "block": 58, "stream": "image"}, {"op": "ffn_linear", "block": 59, "stream": "image"},
    {"op": "text_freeze", "interval": [36, 37]}, {"op": "text_freeze", "interval": [40, 41]},
    {"op": "text_freeze", "interval": [50, 59]},
]


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
    init: PlugInit = "middle"
    allow_ends: bool = False
    protect: list[int] = Field(default_factory=list)
    params: Params
    plug_sources: list[int] = Field(default_factory=list)
    #: keep ratio ("0.7") -> the interval indices the model at that ratio keeps (module docstring)
    serves: dict[str, list[int]] = Field(default_factory=dict)
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
    check_serves(plan.serves, len(plan.intervals))
    check_width(plan.intervals, plan.width, t)
    if plan.params.teacher != t.total_params:
        raise PPCLError(f"params.teacher {plan.params.teacher} differs from teacher.total_params {t.total_params}")


def check_serves(serves: dict[str, list[int]], n_intervals: int) -> None:
    """The ``serves`` rule of the module docstring; raises a one-line PPCLError naming the ratio."""
    for key, ids in serves.items():
        try:
            ratio = float(key)
        except ValueError:
            ratio = float("nan")
        if not 0 < ratio <= 1:
            raise PPCLError(f"serves: key {key!r} is not a keep ratio in (0, 1]")
        if not ids or list(ids) != sorted(set(ids)) or not all(0 <= k < n_intervals for k in ids):
            raise PPCLError(f"serves {key}: {list(ids)} is not a sorted, non-empty list of distinct interval indices "
                            f"0..{n_intervals - 1}")


def check_width(intervals, width, teacher: Teacher) -> None:
    """The width-op rules of the module docstring (ranges, streams, overlaps, and how each op composes with the
    depth ``intervals``); raises a one-line PPCLError naming the op (and the interval)."""
    t = teacher
    inside = {i: (s, e) for s, e in intervals for i in range(s, e + 1)}
    seen: set[tuple[int, str]] = set()
    frozen: list[tuple[int, int]] = []
    ffn: list[FfnLinear] = []
    for op in width:
        if isinstance(op, FfnLinear):
            if not 0 <= op.block < t.num_blocks:
                raise PPCLError(f"width op ffn_linear block {op.block}: out of range (blocks 0..{t.num_blocks - 1})")
            if op.stream not in t.blocks[op.block].streams:
                raise PPCLError(f"width op ffn_linear block {op.block}: the block has no {op.stream} stream")
            if op.block in inside:
                raise PPCLError(f"width op ffn_linear block {op.block}: the block is inside a depth interval "
                                f"{_fmt(inside[op.block])} (its plug replaces it)")
            if (op.block, op.stream) in seen:
                raise PPCLError(f"width op ffn_linear block {op.block} stream {op.stream}: given twice")
            seen.add((op.block, op.stream))
            ffn.append(op)
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
    for op in ffn:
        for a, b in frozen:
            if op.stream == "text" and a < op.block <= b:
                raise PPCLError(f"width op ffn_linear block {op.block} stream text: the block's text stream is frozen "
                                f"by text_freeze [{a}, {b}] (its text FFN is already removed)")
    text_freeze_roles(intervals, frozen)


def text_freeze_roles(
    intervals: list[tuple[int, int]] | list[list[int]], freezes: list[tuple[int, int]] | list[list[int]]
) -> dict[int, tuple[str, tuple[int, int]]]:
    """How each depth interval composes with the text_freeze intervals (module docstring).

    Returns ``{interval position in the plan: (role, (a, b))}`` with role ``"member"``, ``"last"`` or ``"source"``,
    for the intervals that meet a frozen group ``[a, b]``; the others are plain depth plugs. Raises a one-line
    PPCLError for a plug crossing the end of a frozen group or covering it whole."""
    roles: dict[int, tuple[str, tuple[int, int]]] = {}
    for k, (s, e) in enumerate(intervals):
        for a, b in freezes:
            if e < a or s > b:
                continue
            if s <= a and e >= b:
                raise PPCLError(f"depth interval [{s}, {e}] covers all of width op text_freeze [{a}, {b}]: no frozen "
                                "block would remain (drop the text_freeze or shorten the interval)")
            if e > b:
                raise PPCLError(f"depth interval [{s}, {e}] crosses the end of width op text_freeze [{a}, {b}]: a "
                                f"plug inside it must end at {b} at the latest (the frozen text is projected back "
                                f"to the teacher's only at block {b})")
            if s <= a:
                roles[k] = ("source", (a, b))
            else:
                roles[k] = ("last" if e == b else "member", (a, b))
    return roles


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
    """Exact ``{"teacher": ..., "student": ...}`` counted from the adapter's modules (depth and width).

    ``student = (teacher - sum of block params) + sum over kept blocks of their width-modified counts + sum of the
    plugs' counts`` (module docstring): a block inside an interval is counted neither as a teacher block nor as a
    width-modified one, only through its interval's plug, so every parameter is counted once."""
    blocks = adapter.blocks()
    if len(blocks) != plan.teacher.num_blocks:
        raise PPCLError(f"the plan is for {plan.teacher.num_blocks} blocks, the model has {len(blocks)}")
    check_intervals(plan.intervals, [b.kind for b in blocks], allow_ends=plan.allow_ends, protect=plan.protect)
    check_width(plan.intervals, plan.width, teacher_from_adapter(adapter))
    teacher = adapter.total_parameters()
    params = [b.params for b in blocks]
    kept = list(params)  # each block as the width ops leave it, when no plug replaces it
    frozen: dict[tuple[int, int], dict[str, Any]] = {}
    if plan.width:
        op_params = getattr(adapter, "width_op_params", None)
        if op_params is None:
            raise PPCLError(f"cannot count width operations for {adapter.family}: its adapter has no width_op_params")
        for op in plan.width:
            if isinstance(op, FfnLinear):
                removed, added = op_params(op)
                kept[op.block] -= removed - added
            else:
                a, b = op.interval
                group = _text_freeze_counts(adapter, op, op_params)
                frozen[(a, b)] = group
                for k in range(a + 1, b + 1):
                    kept[k] -= group["removed"][k] - group["added"] - (group["proj"] if k == b else 0)
    roles = text_freeze_roles(plan.intervals, list(frozen))
    student = teacher - sum(params) + sum(kept)
    for k, (s, e) in enumerate(plan.intervals):
        src = adapter.plug_source(s, e, plan.init)
        plug = params[src]
        role, group = roles.get(k, (None, None))
        if role in ("member", "last"):
            g = frozen[group]
            plug -= _member_text_params(adapter, src) - g["added"] - (g["proj"] if role == "last" else 0)
        student -= sum(kept[s:e + 1]) - plug
    return {"teacher": teacher, "student": student}


def _member_text_params(adapter, index: int) -> int:
    """Parameters of block ``index``'s own text-stream update (what text_freeze removes from it)."""
    from ppcl.arch.common import count_parameters

    block = adapter.block(index)
    return sum(count_parameters(block.get_submodule(p)) for p in adapter.text_stream_parts(block).values())


def _text_freeze_counts(adapter, op, op_params) -> dict[str, Any]:
    """Per-block accounting of one text_freeze ``[a, b]``: ``removed[k]`` (block k's own text parts), ``added``
    (one light modulation copy, the same for every frozen block), ``proj`` (the residual projection at ``b``),
    consistent with the adapter's total ``width_op_params(op)``."""
    import torch

    from ppcl.arch.common import count_parameters

    a, b = op.interval
    removed_total, added_total = op_params(op)
    removed = {k: _member_text_params(adapter, k) for k in range(a + 1, b + 1)}
    with torch.device("meta"):  # shapes only
        added = count_parameters(adapter.frozen_text_modulation(adapter.block(a), init=False))
    proj = added_total - added * (b - a)
    if sum(removed.values()) != removed_total or proj < 0:  # a bug in one of the two counts, not bad input
        raise AssertionError(f"text_freeze [{a}, {b}] accounting disagrees with the adapter's width_op_params")
    return {"removed": removed, "added": added, "proj": proj}


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
        check_plan(draft)  # the plan's own rules first: one-line errors before any module is counted
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
    where, msg = first_field_error(e)
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


def as_plan(plan: Any) -> Plan:
    """A Plan from a plan.json path (:func:`load_plan`), a dict (validated here), or a Plan (returned as is)."""
    if isinstance(plan, (str, Path)):
        return load_plan(plan)
    if isinstance(plan, dict):
        try:
            return Plan.model_validate(plan)
        except ValidationError as e:
            raise PPCLError(f"invalid plan: {_first_error(e)}") from None
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
    removed_by = [sum(b.params for b in t.blocks[s:e + 1]) - (t.blocks[src].params if src is not None else 0)
                  for (s, e), src in zip(plan.intervals, sources)]
    for (s, e), src, removed in zip(plan.intervals, sources, removed_by):
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
    served = sorted(plan.selection.get("serve") or {}, key=lambda k: -float(k))
    if served and not plan.serves:
        lines.append("")
        lines.append(f"selected to serve keep {', '.join(served)} too: the export's size rule picks each one's "
                     "subset (serve_subsets size_rule)")
    if plan.serves:
        lines.append("")
        for key, ids in sorted(plan.serves.items(), key=lambda kv: -float(kv[0])):
            kept = plan.params.teacher - sum(removed_by[k] for k in ids)
            lines.append(f"serves keep {key} with intervals {[list(plan.intervals[k]) for k in ids]} "
                         f"({kept / max(plan.params.teacher, 1):.1%} kept without width ops)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ from a bare config
def meta_adapter(model: str | Path):
    """The family adapter of a transformer built on the meta device from its config alone (no weights read).

    ``model``: a transformer ``config.json``, a folder holding one (a diffusers ``transformer/`` folder), or a
    pipeline folder (its ``model_index.json`` names the transformer class; ``transformer/config.json`` is read).
    Parameters are meta tensors: shapes and counts are exact, values do not exist. Raises PPCLError for a missing
    or unreadable file or an unknown class."""
    import importlib
    import json

    import torch

    from ppcl.arch import get_adapter

    path = Path(model)
    library, cls_name = "diffusers", None
    if path.is_dir() and (path / "model_index.json").is_file():
        try:
            spec = json.loads((path / "model_index.json").read_text())
        except json.JSONDecodeError as e:
            raise PPCLError(f"unreadable {path / 'model_index.json'}: {e}") from None
        library, cls_name = (spec.get("transformer") or [None, None])[:2]
        if not library or not cls_name:
            raise PPCLError(f"{path / 'model_index.json'}: no transformer entry")
        path = path / "transformer"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PPCLError(f"model config not found: {path} (expected a pipeline folder, a transformer folder or a "
                        "config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PPCLError(f"unreadable {path}: {e}") from None
    if not isinstance(config, dict):
        raise PPCLError(f"{path}: expected a JSON object")
    cls_name = cls_name or config.get("_class_name")
    if not cls_name:
        raise PPCLError(f"{path}: field '_class_name' is missing (which diffusers transformer is this?)")
    from ppcl.arch import FAMILIES, adapter_for
    from ppcl.custom_code import ppcl_width_class

    try:  # a width export names its custom-code module: ppcl's own class (no code of the folder is run)
        cls = (ppcl_width_class(Path(model), [library, cls_name], [adapter_for(f) for f in FAMILIES])
               or getattr(importlib.import_module(library), cls_name))
    except (ImportError, AttributeError):
        raise PPCLError(f"{path}: unknown transformer class {library}.{cls_name}") from None
    try:
        with torch.device("meta"):
            transformer = cls.from_config(config)
    except (TypeError, ValueError) as e:
        raise PPCLError(f"{path}: cannot build {cls_name} from it: {str(e).splitlines()[0]}") from None
    return get_adapter(transformer)
