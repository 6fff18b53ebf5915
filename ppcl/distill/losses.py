"""The method's losses (method.md section 2, with section 3's width units): what each plug is fed, what it is
compared with, and the loss D between them.

The paper's *teacher-student alternating distillation* (also called non-sequential distillation) is the scheme of
:func:`nonsequential_losses`: every plug is fed the TEACHER's state entering its interval, so errors of one plug
never reach another and every interval trains independently in the same teacher pass; that independence is what
makes the result pluggable (any subset of the trained plugs can be exported afterwards).

D (:func:`ppcl.plugs.plug_loss`) is ``mean over tokens of || a/||a|| - b/||b|| ||^2`` per stream (image, text).

Non-sequential, teacher-forced (default; :func:`nonsequential_losses`). One stock teacher forward under
``no_grad`` with hooks (:func:`teacher_pass`) captures, for every unit, the call entering its start block and the
streams leaving its end block (the forward stops right after the last end block unless the output-level loss needs
the full output). Each unit then runs once on its captured call WITH grad; loss D on every stream the unit returns
(:func:`unit_step_losses`). Nothing else runs: no chain of student blocks whose output is never used.

Width units (method.md section 3). An ffn_linear unit is fed and compared like a depth plug of one block. A
text_freeze unit ``[a, b]`` is trained in the same teacher pass, non-sequentially too: every frozen block ``k`` is
fed the teacher's call entering ``k`` with its text replaced by ``tau``, the teacher's text entering ``a+1`` (what
the student's frozen text state is when block ``a`` is the teacher's); losses (:func:`freeze_unit_losses`):
``image`` = mean over ``k`` of D(image out of k, teacher image leaving k), ``text`` = D(text out of b, teacher text
leaving b). Everything in the frozen blocks trains (their image stream, the light text modulations, the
projections), like the ffn_linear units. Depth plugs meeting a text_freeze are fed / compared with ``tau`` by the
roles of :mod:`ppcl.distill.units` (:func:`unit_call`, :func:`unit_target`).

Sequential (``mode="sequential"``, the ablation the paper argues against; :func:`sequential_losses`). The student is
the teacher with every unit in place (a module-list edit) run through the stock forward; each unit sees what the
previous ones produced; loss at each unit's end against the teacher's streams there.

Output-level loss (optional, off by default; :func:`output_loss`): ``output_loss_weight * mean((v_student -
v_teacher)^2)`` with every unit in place (needs a full student forward, so it only runs when the weight is > 0). It
couples the plugs: each one's gradient then also depends on the others being in place, so a subset exported without
some of them runs in a context it was not trained for (on the reference teacher it is worth ~3 accuracy points at
the full plan and costs 1.2 points to a plug exported alone; docs/benchmark.md). ``output_loss_keep < 1`` puts a
random subset of the depth plugs in place for that term each step (:func:`output_loss_units`), so each plug is also
trained in the contexts a subset export creates. ``output_loss_ratios`` instead takes turns, one step each, between
the whole plan and exactly the subsets ``export --keep-params`` will build at those ratios
(:func:`export_placements`): no step is spent on a subset nobody exports; with ``output_loss_schedule
"every_step"`` every one of those students runs each step and the term is the sum of theirs (each exported model
gets the output-level signal on every step, for one more student forward and backward per ratio). The student of
that term starts at its first unit from the call the teacher pass captured there (:func:`student_forward`): the
blocks before it are the teacher's own on the teacher's states, so running them again would redo the teacher pass's
work.

``output_loss_sequential = w > 0`` adds, inside the output-level term's whole-plan student (which runs anyway),
``w`` x the sequential ablation's loss: D at each unit's end, each unit fed what the units before it made
(:func:`placed_losses`; logged as ``<stream>@plan``, already weighted; the first unit is fed the teacher's state
there too, so its D simply counts ``1 + w`` times). The teacher-forced losses keep every plug trained for any
subset; this term adds the chain of the plugs the lowest ratio exports, at the cost of one capture hook per unit.

The objective of one step is :func:`total_loss`: the sum of every unit's D over its streams, plus the weighted
output-level term.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ppcl.arch.common import Adapter, BlockCall, StopForward, split_output
from ppcl.distill.settings import DistillSettings
from ppcl.errors import PPCLError
from ppcl.subsets import exported_subset
from ppcl.distill.units import Unit, student_layout
from ppcl.plugs import LOSS_EPS, StudentView, plug_loss

Losses = dict[str, dict[str, torch.Tensor]]  # unit name -> stream -> loss D (a scalar tensor)
#: what :func:`teacher_pass` returns: calls entering unit starts, streams leaving unit ends, the model output or None
TeacherStates = tuple[dict[int, BlockCall], dict[int, dict[str, torch.Tensor]], torch.Tensor | None]


# ---------------------------------------------------------------------------------------------------- the teacher pass
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
) -> TeacherStates:
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
            raise StopForward
        return None

    output = None
    with torch.no_grad(), adapter.hooks(on_input=on_input, on_output=on_output, indices=starts | ends):
        with contextlib.suppress(StopForward):  # the pass ends after the last interval: nothing later is needed
            output = adapter.forward(model_inputs)
    return calls, outs, output


# -------------------------------------------------------------------------------- what a unit is fed and compared with
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


# ------------------------------------------------------------------------------------- non-sequential (teacher-forced)
def run_module(module: nn.Module, call: BlockCall, checkpointing: bool) -> dict[str, torch.Tensor]:
    """``module`` on ``call`` with grad (through activation checkpointing when ``checkpointing``): its streams."""
    if checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return split_output(checkpoint(module, use_reentrant=False, **call.kwargs))
    return split_output(module(**call.kwargs))


def unit_losses(
    unit: Unit, out: dict[str, torch.Tensor], target: dict[str, torch.Tensor], eps: float
) -> dict[str, torch.Tensor]:
    """Loss D per stream the unit returns (SD3's last block: image only)."""
    return {s: plug_loss(out[s], target[s], eps) for s in out if s in target}


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
        got = {k: run_module(m, fcalls[k], checkpointing) for k, m in zip(unit.members, unit.module)}
        return freeze_unit_losses(unit, got, outs, eps)
    out = run_module(unit.module, unit_call(unit, calls), checkpointing)
    return unit_losses(unit, out, unit_target(unit, calls, outs), eps)


def nonsequential_losses(
    adapter: Adapter, model_inputs: dict[str, Any], units: list[Unit], settings: DistillSettings, step: int = 0,
    backward: Callable[[torch.Tensor], None] | None = None, placements: list[list[Unit]] | None = None,
    teacher: TeacherStates | None = None,
) -> tuple[Losses, torch.Tensor | None]:
    """Per-unit, per-stream losses of one batch, every unit fed the TEACHER state entering it. The output-level
    term (weight > 0) runs the student with the units of :func:`output_loss_units`, drawn from a generator seeded
    by ``(seed, step)``: a resumed run draws what the uninterrupted one drew, and every rank draws the same. With
    ``settings.output_loss_ratios`` it runs with ``placements[step % len(placements)]`` instead
    (:func:`export_placements`, computed once per run by the caller, or here when None), or, with
    ``output_loss_schedule "every_step"``, with every placement in turn within the step (the term returned is the
    sum of theirs).

    ``backward`` (per-plug backward): called on each unit's summed loss as soon as it exists, then on the weighted
    output-level term last; the losses returned are then detached. A unit's loss depends only on detached teacher
    states and its own weights, so the gradients summed over these calls are those of one backward of
    :func:`total_loss`, while only one unit's activations are alive at a time (scale.md, "for free" 1).

    ``teacher``: this batch's teacher pass, already run (:func:`ppcl.distill.train.distill_many` runs one for
    several runs' units); None runs it here."""
    full = settings.output_loss_weight > 0
    calls, outs, teacher_out = teacher if teacher is not None else teacher_pass(adapter, model_inputs, units,
                                                                                 full=full)
    losses: Losses = {}
    for u in units:
        per = unit_step_losses(u, calls, outs, LOSS_EPS, settings.gradient_checkpointing)
        if backward is not None and per:
            backward(sum(per.values()))
            per = {s: v.detach() for s, v in per.items()}
        losses[u.name] = per
    out_loss = None
    if full:
        if settings.output_loss_ratios:
            turns = placements if placements is not None else export_placements(adapter, units,
                                                                                 settings.output_loss_ratios)
            students = turns if settings.output_loss_schedule == "every_step" else [turns[step % len(turns)]]
        else:
            g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 7_919 + 104_729)
            students = [output_loss_units(units, settings.output_loss_keep, g)]
        terms = []
        w = settings.output_loss_sequential
        for placed in students:  # "every_step": one student at a time, each backpropagated before the next runs
            in_plan = w > 0 and len(placed) == len(units)  # the whole plan's student
            student_out, captured = student_forward(adapter, model_inputs, placed, capture=in_plan,
                                                    teacher_calls=calls)
            term = output_loss(student_out, teacher_out)
            extra = {n: {s: w * v for s, v in per.items()}
                     for n, per in placed_losses(placed, captured, calls, outs).items()} if in_plan else {}
            if backward is not None:
                backward(settings.output_loss_weight * term + sum(v for per in extra.values() for v in per.values()))
                term = term.detach()
                extra = {n: {s: v.detach() for s, v in per.items()} for n, per in extra.items()}
            for n, per in extra.items():
                losses[n].update({f"{s}@plan": v for s, v in per.items()})
            terms.append(term)
        out_loss = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
    return losses, out_loss


# ----------------------------------------------------------------------------------------------- the output-level term
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


def export_placements(adapter: Adapter, units: list[Unit], ratios: list[float],
                      serves: dict[str, list[int]] | None = None) -> list[list[Unit]]:
    """The students the output-level term takes turns with under ``output_loss_ratios``: every unit in place,
    then, per ratio, the units of the model ``export --keep-params ratio`` will build from this run
    (:func:`ppcl.subsets.exported_subset`: the same subset rule, with the plan's recorded ``serves``; width /
    text_freeze units always in place). A
    subset already in the list is not repeated (a ratio the whole plan meets adds nothing).

    Why (docs/benchmark.md): with every plug in place the output term teaches each plug to work beside the
    others, so a plug exported without them runs in a context it never trained in; random subsets
    (``output_loss_keep``) also spend steps on subsets no export builds. The turns train exactly the models
    that will be exported, at no extra cost per step."""
    out = [units]
    seen = {tuple(u.name for u in units)}
    for r in ratios:
        try:
            chosen = set(exported_subset(adapter, units, r, serves=serves))
        except PPCLError as e:
            raise PPCLError(f"output_loss_ratios: {e}") from None
        placed = [u for u in units if u.kind != "interval" or u.index in chosen]
        key = tuple(u.name for u in placed)
        if key not in seen:
            seen.add(key)
            out.append(placed)
    return out


def placed_losses(placed: list[Unit], captured: dict[str, dict[str, torch.Tensor]], calls: dict[int, BlockCall],
                  outs: dict[int, dict[str, torch.Tensor]]) -> Losses:
    """Loss D of every unit at its end inside a student with ``placed`` in place (what :func:`student_forward`
    captured): the sequential ablation's loss, each unit fed what the units before it made."""
    losses: Losses = {}
    for u in placed:
        if u.members:
            got = {k: captured[f"{u.name}@{k}"] for k in u.members if f"{u.name}@{k}" in captured}
            losses[u.name] = freeze_unit_losses(u, got, outs, LOSS_EPS)
        else:
            losses[u.name] = unit_losses(u, captured[u.name], unit_target(u, calls, outs), LOSS_EPS)
    return losses


def output_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """The output-level term: mean squared difference of the student's and the teacher's model outputs (fp32)."""
    return (student_out.float() - teacher_out.float()).pow(2).mean()


def total_loss(losses: Losses, out_loss: torch.Tensor | None, output_loss_weight: float) -> torch.Tensor:
    """What one step minimises: every unit's D summed over units and streams, plus the weighted output-level term."""
    total = sum(v for per in losses.values() for v in per.values())
    if out_loss is not None:
        total = total + output_loss_weight * out_loss
    return total


# ------------------------------------- the student with units in place (output-level term) and the sequential ablation
class _Replayed(nn.Module):
    """Stands in for a teacher block of the student's prefix (the blocks before the first unit, which are the
    teacher's own blocks fed the teacher's own states): returns its input streams untouched, at no cost. The call
    entering the first unit is then replaced by the teacher's captured one (:func:`student_forward`), so what
    the prefix returns is never used."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self._signature = inspect.signature(block.forward)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        return bound.get("encoder_hidden_states"), bound["hidden_states"]


def student_prefix(units: list[Unit]) -> int:
    """The first block any unit replaces or modifies: every block before it is the teacher's own."""
    return min(u.start for u in units) if units else 0


def student_forward(
    adapter: Adapter, model_inputs: dict[str, Any], units: list[Unit], capture: bool, stop_early: bool = False,
    teacher_calls: dict[int, BlockCall] | None = None,
) -> tuple[torch.Tensor | None, dict[str, dict[str, torch.Tensor]]]:
    """The student (every unit in place) through the stock forward; optionally capture each unit's output
    (``captured[name]``: its streams; a text_freeze unit: ``captured[f"{name}@{k}"]`` for every frozen block k).

    ``teacher_calls`` (the teacher pass's captured calls, holding the call entering :func:`student_prefix`): the
    blocks before the first unit are not run again. They are the teacher's blocks on the teacher's states, so the
    call entering the first unit IS the teacher's captured one, bit for bit; the forward starts there (no work done
    twice: on the reference benchmark's plan [[3,5],[6,14]] three of the student's six blocks)."""
    lists, _, position = student_layout(adapter, units)
    on_input = None
    first = student_prefix(units)
    if teacher_calls is not None and first > 0:
        if first not in teacher_calls:
            raise AssertionError(f"the teacher pass did not capture the call entering block {first}")
        for l in range(first):  # blocks before the first unit keep their teacher positions
            name, j = adapter.locate(l)
            lists[name][j] = _Replayed(lists[name][j])
        entering = teacher_calls[first]

        def start_here(i, call):
            return entering if i == position[first] else None

        on_input = start_here
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
            raise StopForward
        return None

    output = None
    with StudentView(adapter, lists) as student:
        hooked = (set(at) if capture else set()) | ({position[first]} if on_input is not None else set())
        ctx = student.hooks(on_input=on_input, on_output=on_output if capture else None, indices=hooked) \
            if hooked else contextlib.nullcontext()
        with ctx, contextlib.suppress(StopForward):
            output = student.forward(model_inputs)
    return output, captured


def sequential_losses(
    adapter: Adapter, model_inputs: dict[str, Any], units: list[Unit], settings: DistillSettings, step: int = 0,
    teacher: TeacherStates | None = None,
) -> tuple[Losses, torch.Tensor | None]:
    """The ablation: each unit fed what the student produced before it; loss at each unit's end (the output-level
    term uses the same full student: ``output_loss_keep`` does not apply). ``teacher``: as in
    :func:`nonsequential_losses`."""
    full = settings.output_loss_weight > 0
    calls, outs, teacher_out = teacher if teacher is not None else teacher_pass(adapter, model_inputs, units,
                                                                                 full=full)
    student_out, captured = student_forward(adapter, model_inputs, units, capture=True, stop_early=not full,
                                            teacher_calls=calls)
    losses = placed_losses(units, captured, calls, outs)
    out_loss = None
    if full:
        out_loss = output_loss(student_out, teacher_out)
    return losses, out_loss
