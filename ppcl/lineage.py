"""Lineage of an export: which teacher block (or which interval's plug) every block of a pruned model is.

Every export writes, beside ``model_index.json``:

- ``plan.json``: the plan the export was built from, byte for byte (its sha256 is recorded below);
- ``ppcl_lineage.json``: the block map, schema ``ppcl.lineage`` version 1::

    {"format": "ppcl.lineage", "version": 1,
     "family": "flux",
     "plan_file": "plan.json", "plan_sha256": "<sha256 of plan.json>", "plan_hash": "<ppcl.distill.plan_hash>",
     "intervals": [0, 1],                       # plan indices of the intervals this export replaced
     "teacher": {"path": "...", "num_blocks": 10,
                 "lists": [{"name": "transformer_blocks", "num_blocks": 4}, {"name": "single_transformer_blocks",
                            "num_blocks": 6}]},
     "student": {"num_blocks": 7, "lists": [...same shape...]},
     "blocks": [                                # one entry per student block, in execution order
       {"student_block": 0, "student_list": "transformer_blocks", "student_index": 0,
        "kind": "kept", "teacher_block": 0, "teacher_list": "transformer_blocks", "teacher_index": 0,
        "width_ops": [], "weights": {"source": "teacher", "prefix": "transformer_blocks.0"}},
       {"student_block": 1, "student_list": "transformer_blocks", "student_index": 1,
        "kind": "plug", "interval": [1, 2], "plan_index": 0,
        "initialised_from": {"teacher_block": 1, "teacher_list": "transformer_blocks", "teacher_index": 1},
        "width_ops": [], "weights": {"source": "plugs", "prefix": "interval_0"}},
       ...]}

Field meanings. Block numbers are 0-based; ``*_block`` is the execution index over all lists, ``*_list`` /
``*_index`` the diffusers module list and the position in it (the key prefix ``<list>.<index>.`` of the weights,
which is what a LoRA names). ``kept``: the student block IS teacher block ``teacher_block``; with ``width_ops``
(plan ops, teacher indices: ``ffn_linear`` of that block, ``text_freeze`` of the group holding it) its weights
are the trained ones, otherwise the teacher's. ``plug``: the block replaces teacher blocks ``interval`` (inclusive)
and was trained as plan interval ``plan_index``, starting from a copy of ``initialised_from``; ``text_freeze``
(optional) says the plug's role inside a frozen text group (``member``, ``last`` or ``source``, see
:func:`ppcl.plan.text_freeze_roles`). ``weights`` names where the exported tensors came from: ``teacher`` (key
prefix in the teacher transformer) or ``plugs`` (key prefix in the distill run's ``plugs.safetensors``), so every
tensor can be traced to its source and checked.

The format is versioned: a reader refuses another ``format`` or ``version`` in one line, as it does a file that
is not JSON or lacks a field (:func:`read_lineage`). ``ppcl plan show --model PRUNED`` prints it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ppcl.errors import PPCLError, first_field_error

LINEAGE_FILE = "ppcl_lineage.json"
LINEAGE_FORMAT = "ppcl.lineage"
LINEAGE_VERSION = 1
#: the plan the export was built from, copied unchanged into the export folder
PLAN_FILE = "plan.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlockList(_Model):
    name: str
    num_blocks: int = Field(ge=0)


class Side(_Model):
    num_blocks: int = Field(ge=0)
    lists: list[BlockList]
    path: str | None = None


class TeacherRef(_Model):
    teacher_block: int = Field(ge=0)
    teacher_list: str
    teacher_index: int = Field(ge=0)


class Weights(_Model):
    source: Literal["teacher", "plugs"]
    prefix: str


class FreezeRole(_Model):
    role: Literal["member", "last", "source"]
    interval: tuple[int, int]


class Block(_Model):
    student_block: int = Field(ge=0)
    student_list: str
    student_index: int = Field(ge=0)
    kind: Literal["kept", "plug"]
    # kept
    teacher_block: int | None = None
    teacher_list: str | None = None
    teacher_index: int | None = None
    # plug
    interval: tuple[int, int] | None = None
    plan_index: int | None = None
    initialised_from: TeacherRef | None = None
    text_freeze: FreezeRole | None = None
    width_ops: list[dict[str, Any]] = Field(default_factory=list)
    weights: Weights


class Lineage(_Model):
    format: Literal["ppcl.lineage"]
    version: int
    family: str
    plan_file: str
    plan_sha256: str
    plan_hash: str
    intervals: list[int]
    teacher: Side
    student: Side
    blocks: list[Block]

    def describe(self, block: Block) -> str:
        """``teacher transformer_blocks.3 (block 3)`` / ``plug of teacher blocks [1, 2] (plan interval 0,
        initialised from teacher block 1)``, then the width ops applied, if any."""
        if block.kind == "kept":
            text = f"teacher {block.teacher_list}.{block.teacher_index} (block {block.teacher_block})"
        else:
            src = block.initialised_from
            text = (f"plug of teacher blocks [{block.interval[0]}, {block.interval[1]}] (plan interval "
                    f"{block.plan_index}, initialised from teacher block {src.teacher_block})")
            if block.text_freeze is not None:
                a, b = block.text_freeze.interval
                text += f", text frozen [{a}, {b}] as {block.text_freeze.role}"
        ops = [_op_text(op) for op in block.width_ops]
        return text + (f" + {', '.join(ops)}" if ops else "")


def _op_text(op: dict[str, Any]) -> str:
    if op.get("op") == "ffn_linear":
        return f"ffn_linear {op.get('stream')}"
    if op.get("op") == "text_freeze":
        a, b = op.get("interval", [None, None])
        return f"text_freeze [{a}, {b}]"
    return str(op.get("op"))


def _ref(adapter, l: int) -> dict[str, Any]:
    name, j = adapter.locate(l)
    return {"teacher_block": l, "teacher_list": name, "teacher_index": j}


def block_map(adapter, units) -> list[dict[str, Any]]:
    """The ``blocks`` entries of a student made of the teacher ``adapter`` and the chosen ``units``
    (:class:`ppcl.distill.units.Unit`: the chosen interval plugs and every width / text_freeze unit), walked as
    :func:`ppcl.plugs.student_lists` walks it, so positions agree with the exported model by construction."""
    plugs = {u.start: u for u in units if u.kind == "interval"}
    placed: dict[int, tuple[str, list[dict[str, Any]]]] = {}  # kept block -> (plugs prefix, its width ops)
    for u in units:
        if u.kind == "width":
            placed[u.start] = (u.name, list(u.ops))
        elif u.kind == "text_freeze":
            freeze, joined = u.ops[0], u.ops[1:]
            for i, k in enumerate(u.members):
                placed[k] = (f"{u.name}.{i}", [freeze, *[op for op in joined if int(op["block"]) == k]])
    counts = {name: 0 for name, _ in adapter.block_lists}
    out: list[dict[str, Any]] = []
    l = 0
    while l < adapter.num_blocks:
        name, _ = adapter.locate(l)
        entry: dict[str, Any] = {"student_block": len(out), "student_list": name, "student_index": counts[name]}
        if l in plugs:
            u = plugs[l]
            entry.update(kind="plug", interval=[u.start, u.end], plan_index=u.index,
                         initialised_from=_ref(adapter, u.source))
            if u.freeze is not None:
                entry["text_freeze"] = {"role": u.freeze[0], "interval": list(u.freeze[1])}
            entry.update(width_ops=[], weights={"source": "plugs", "prefix": u.name})
            l = u.end + 1
        else:
            entry.update(kind="kept", **_ref(adapter, l))
            prefix, ops = placed.get(l, (None, []))
            entry["width_ops"] = ops
            entry["weights"] = ({"source": "plugs", "prefix": prefix} if prefix is not None else
                                {"source": "teacher", "prefix": f"{name}.{entry['teacher_index']}"})
            l += 1
        counts[name] += 1
        out.append(entry)
    return out


def _side(lists: dict[str, int], path: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"num_blocks": sum(lists.values()),
                         "lists": [{"name": n, "num_blocks": c} for n, c in lists.items()]}
    if path is not None:
        d["path"] = path
    return d


def build_lineage(adapter, units, *, plan_bytes: bytes, plan_hash: str, chosen: list[int],
                  teacher_path: str) -> dict[str, Any]:
    """The ``ppcl_lineage.json`` document (module doc) of an export; validated before it is returned."""
    blocks = block_map(adapter, units)
    student: dict[str, int] = {name: 0 for name, _ in adapter.block_lists}
    for b in blocks:
        student[b["student_list"]] += 1
    doc = {
        "format": LINEAGE_FORMAT, "version": LINEAGE_VERSION, "family": adapter.family,
        "plan_file": PLAN_FILE, "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(), "plan_hash": plan_hash,
        "intervals": list(chosen),
        "teacher": _side({name: len(getattr(adapter.transformer, name)) for name, _ in adapter.block_lists},
                         teacher_path),
        "student": _side(student),
        "blocks": blocks,
    }
    Lineage.model_validate(doc)  # what we write must read back
    return doc


def lineage_path(model: str | Path) -> Path:
    """``model`` may be the pruned pipeline folder or the lineage file itself."""
    path = Path(model)
    return path if path.is_file() else path / LINEAGE_FILE


def read_lineage(model: str | Path) -> Lineage:
    """Read and validate the block map of an export; one-line PPCLError for a folder without one, a file that is
    not JSON, another format or version, or a missing / mistyped field (named)."""
    path = lineage_path(model)
    if not Path(model).exists():
        raise PPCLError(f"--model {model}: not found")
    if not path.is_file():
        raise PPCLError(f"--model {model}: no block map ({LINEAGE_FILE}): not a ppcl export, or exported by a ppcl "
                        "that did not record lineage")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise PPCLError(f"unreadable {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("format") != LINEAGE_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PPCLError(f"{path}: not a ppcl lineage file (format {got!r}, expected {LINEAGE_FORMAT!r})")
    if data.get("version") != LINEAGE_VERSION:
        raise PPCLError(f"{path}: unsupported lineage version {data.get('version')!r} (expected {LINEAGE_VERSION})")
    try:
        lineage = Lineage.model_validate(data)
    except ValidationError as e:
        where, msg = first_field_error(e)
        raise PPCLError(f"{path}: field {where}: {msg}") from None
    if [b.student_block for b in lineage.blocks] != list(range(len(lineage.blocks))) or \
            len(lineage.blocks) != lineage.student.num_blocks:
        raise PPCLError(f"{path}: field blocks: expected student blocks 0..{lineage.student.num_blocks - 1} in order")
    return lineage


def read_export_plan(model: str | Path, lineage: Lineage):
    """The plan copied into the export, checked against the sha256 the lineage recorded."""
    from ppcl.plan import load_plan

    path = lineage_path(model).parent / lineage.plan_file
    if not path.is_file():
        raise PPCLError(f"{path}: missing (the export's plan; {LINEAGE_FILE} names it)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != lineage.plan_sha256:
        raise PPCLError(f"{path}: sha256 differs from the one recorded in {LINEAGE_FILE} (changed after export)")
    return load_plan(path)


def format_block_map(lineage: Lineage) -> str:
    """The block map as a table (``ppcl plan show --model``): student block <- what it is."""
    t, s = lineage.teacher, lineage.student
    lines = [f"block map ({lineage.family}): {t.num_blocks} teacher blocks -> {s.num_blocks} "
             f"(plan intervals {lineage.intervals} replaced)",
             f"{'student block':>32}    is"]
    for b in lineage.blocks:
        lines.append(f"{f'{b.student_list}.{b.student_index}':>32} <- {lineage.describe(b)}")
    return "\n".join(lines)


def markdown_block_map(lineage: dict[str, Any]) -> list[str]:
    """The block map as a Markdown table (model card lines)."""
    lin = Lineage.model_validate(lineage)
    lines = ["| student block | is |", "|---|---|"]
    for b in lin.blocks:
        lines.append(f"| `{b.student_list}.{b.student_index}` | {lin.describe(b)} |")
    return lines
