"""The subset rule of an export (:mod:`ppcl.export`'s module doc, "Subsets" and "Accounting"): which trained
interval plugs ``export --keep-params F`` keeps, and the exact parameter count of every subset.

Its own module, below both :mod:`ppcl.export` and :mod:`ppcl.distill`: distillation's ``output_loss_ratios`` trains
exactly the subsets an export will build (:func:`ppcl.distill.losses.export_placements`), so both read one rule.
``units`` are :class:`ppcl.distill.units.Unit` objects (read by attribute: ``kind``, ``index``, ``start``, ``end``,
``module``, ``placed()``).
"""

from __future__ import annotations

import itertools

from ppcl.arch.common import Adapter, count_parameters
from ppcl.errors import PPCLError

#: above this many intervals, --keep-params uses a greedy choice instead of trying every subset
EXHAUSTIVE_MAX = 16


def subset_fractions(teacher: int, width_saving: int, savings: dict[int, int]) -> list[tuple[list[int], float]]:
    """Every subset of the trained interval plugs (plan indices) with the parameter fraction its export keeps,
    most kept first; empty above :data:`EXHAUSTIVE_MAX` intervals (too many to list)."""
    ids = sorted(savings)
    if len(ids) > EXHAUSTIVE_MAX:
        return []
    out = [(list(c), (teacher - width_saving - sum(savings[k] for k in c)) / teacher)
           for r in range(len(ids) + 1) for c in itertools.combinations(ids, r)]
    return sorted(out, key=lambda x: (-x[1], x[0]))


def interval_savings(adapter: Adapter, units) -> dict[int, int]:
    """Parameters removed by each interval plug (plan index -> blocks s..e as the width units leave them, minus the
    plug)."""
    placed = {k: m for u in units if u.kind != "interval" for k, m in u.placed().items()}
    out = {}
    for u in units:
        if u.kind == "interval":
            removed = sum(count_parameters(placed.get(l, adapter.block(l))) for l in range(u.start, u.end + 1))
            out[u.index] = removed - count_parameters(u.module)
    return out


def subset_accounting(adapter: Adapter, units) -> tuple[int, int, dict[int, int]]:
    """``(teacher parameters, width_saving, savings per interval)``: the additive accounting of the module doc,
    from which every subset's exported size follows."""
    width_saving = sum(count_parameters(adapter.block(k)) - count_parameters(m)
                       for u in units if u.kind in ("width", "text_freeze") for k, m in u.placed().items())
    return adapter.total_parameters(), width_saving, interval_savings(adapter, units)


def exported_subset(adapter: Adapter, units, keep_params: float, losses: dict[int, float] | None = None,
                    serves: dict[str, list[int]] | None = None) -> list[int]:
    """The plan indices ``export --keep-params`` picks (:func:`choose_intervals`). Before training (``losses``
    None) a tie between two subsets of the same size goes to fewer plugs, where the export breaks it by the plugs'
    final losses first. ``serves``: the plan's recorded subsets (``Plan.serves``)."""
    teacher, width_saving, savings = subset_accounting(adapter, units)
    return choose_intervals(keep_params, teacher, width_saving, savings, losses or {}, serves)


def served_subset(serves: dict[str, list[int]] | None, keep_params: float) -> list[int] | None:
    """The subset a plan records for ``keep_params`` (``Plan.serves``, keys compared as numbers), or None."""
    for key, ids in (serves or {}).items():
        if abs(float(key) - keep_params) < 1e-9:
            return sorted(ids)
    return None


def choose_intervals(keep_params: float, teacher: int, width_saving: int, savings: dict[int, int],
                     losses: dict[int, float], serves: dict[str, list[int]] | None = None) -> list[int]:
    """The subset rule of the module doc. Returns plan indices in order.

    A ratio the plan was selected for (``serves``, :attr:`ppcl.plan.Plan.serves`) gets the subset the selection
    chose for it: the selector scored the plugs' effect on the model's output and picked, over every ratio at once,
    the plan and its subsets (:func:`ppcl.select.select`'s ``serve`` with ``serve_subsets="joint"``); checked against
    this exact accounting. Any other ratio: the size rule."""
    if not 0 < keep_params <= 1:
        raise PPCLError(f"--keep-params must be in (0, 1] (got {keep_params})")
    budget = keep_params * teacher
    base = teacher - width_saving
    ids = sorted(savings)
    recorded = served_subset(serves, keep_params)
    if recorded is not None:
        unknown = [k for k in recorded if k not in savings]
        if unknown:
            raise PPCLError(f"plan serves {keep_params:g} with interval {unknown[0]}, which has no trained plug")
        kept = base - sum(savings[k] for k in recorded)
        if kept > budget:
            raise PPCLError(f"plan serves {keep_params:g} with intervals {recorded}, which keep "
                            f"{kept / teacher:.4f} of the teacher's parameters: over the ratio")
        return recorded
    best: tuple[int, float, int] | None = None
    best_set: tuple[int, ...] = ()
    if len(ids) <= EXHAUSTIVE_MAX:
        candidates = (c for r in range(len(ids) + 1) for c in itertools.combinations(ids, r))
    else:  # greedy: add intervals by most parameters removed per unit of loss, each prefix is a candidate
        order = sorted(ids, key=lambda k: -savings[k] / (losses.get(k, 0.0) + 1e-6))
        candidates = (tuple(sorted(order[:r])) for r in range(len(order) + 1))
    for c in candidates:
        kept = base - sum(savings[k] for k in c)
        if kept > budget:
            continue
        key = (kept, -sum(losses.get(k, 0.0) for k in c), -len(c))
        if best is None or key > best:
            best, best_set = key, c
    if best is None:
        lowest = base - sum(savings.values())
        raise PPCLError(f"--keep-params {keep_params} is out of reach: with every trained plug the model keeps "
                        f"{lowest / teacher:.4f} of the teacher's parameters")
    return list(best_set)
