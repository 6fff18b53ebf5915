"""Interval selection under a budget (method.md section 1): the PPCL selector and four baselines.

Every selector has ONE signature (Torch-Pruning style pluggable scorers)::

    selector(ctx: SelectionContext) -> list[tuple[int, int]]      # intervals, 0-based inclusive

and :func:`select` wraps any of them into a validated :class:`ppcl.plan.Plan` with exact parameter counts. All
inputs come from probe.json (block kinds, exact per-block and total parameter counts, the family's plug-source
departures), so selection needs no model.

Budget: ``keep_params=F`` (student parameters <= F x teacher parameters; selectors add removals until it is met,
the last one chosen as the smallest that completes it, so the overshoot is at most one interval) or ``remove_blocks=N`` (exactly N blocks removed). An unreachable budget is a PPCLError. Every method
obeys the same constraints: no interval crosses a kind boundary; first/last blocks (unless ``allow_ends``) and
protected blocks are never inside an interval that removes blocks.

Methods:

- ``ppcl``: flat runs of the CKA trend. Block ``l`` is *high* when ``c_l >= min_cka`` (default: the median of
  ``c`` over removable blocks); consecutive high blocks of one kind join one run unless the trend jumps,
  ``|d_{l-1}| > max_jump`` (default: 2 x the median ``|d|``), which makes an edge. Candidates are all
  sub-intervals of the runs, 2..``max_interval`` blocks long (those the probe scored), ranked by
  ``(1 - R^2 of the interval probe) / parameters removed`` - quality lost per parameter removed, lowest first.
  Greedy: take the best candidate that fits the remaining need and shares no block with a chosen one (splitting
  and trimming come for free: every sub-interval is a candidate); if none fits under a ``keep_params`` budget,
  the smallest one that completes it. If flat runs cannot reach the budget, candidates are widened to every
  removable interval (recorded as ``relaxed`` in the plan's selection metadata).
- ``shortgpt``: block influence ``BI_l = 1 - cos(h_l, h_{l+1})``; remove the blocks with the lowest BI.
- ``uniform``: removed blocks evenly spaced over the removable blocks.
- ``random``: removed blocks drawn with ``seed``.
- ``angular``: the contiguous window minimising the mean angular distance ``arccos(cos(h_l, h_{l+n}))/pi``
  ("The Unreasonable Ineffectiveness of the Deeper Layers"): dropping blocks ``l..l+n-1`` is the interval
  ``[l, l+n]`` (n + 1 blocks -> one plug, n removed). When no single window of the needed size fits (between
  protected blocks, kind boundaries), further windows are added greedily.

Scattered removals (shortgpt, uniform, random) are expressed as intervals so every method yields the same kind of
plan and removes the same number of blocks at the same ``remove_blocks`` budget: a maximal run of removed blocks
``i..j`` becomes ``[i-1, j]`` (the plug starts from a neighbour kept by the teacher; ``[i, j+1]`` when block
``i-1`` is not available). A block that cannot be expressed that way is skipped for the next in the method's order.
"""

from __future__ import annotations

import random as _random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ppcl.errors import PPCLError
from ppcl.plan import (
    Params,
    Plan,
    Teacher,
    TeacherBlock,
    check_intervals,
    student_params,
)
from ppcl.probe import ProbeResult

METHODS = ("ppcl", "shortgpt", "angular", "uniform", "random")
Interval = tuple[int, int]


@dataclass
class Budget:
    """``keep_params`` (fraction of the teacher's parameters kept) xor ``remove_blocks`` (exact count)."""

    keep_params: float | None = None
    remove_blocks: int | None = None

    def __post_init__(self):
        if (self.keep_params is None) == (self.remove_blocks is None):
            raise PPCLError("give exactly one budget: --keep-params F or --remove-blocks N")
        if self.keep_params is not None and not 0 < self.keep_params <= 1:
            raise PPCLError(f"--keep-params must be in (0, 1] (got {self.keep_params})")
        if self.remove_blocks is not None and self.remove_blocks < 0:
            raise PPCLError(f"--remove-blocks must be >= 0 (got {self.remove_blocks})")

    def describe(self) -> str:
        if self.keep_params is not None:
            return f"keep_params={self.keep_params:g}"
        return f"remove_blocks={self.remove_blocks}"


@dataclass
class SelectionContext:
    """What a selector sees: the probe, the budget and the constraints, with exact parameter accounting."""

    probe: ProbeResult
    budget: Budget
    protect: frozenset[int] = frozenset()
    allow_ends: bool = False
    init: str = "middle"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # selectors record their thresholds / scores here

    def __post_init__(self):
        self.L = len(self.probe.blocks)
        self.kinds = [b.kind for b in self.probe.blocks]
        self.block_params = [b.params for b in self.probe.blocks]
        self.total = self.probe.total_params
        self._exceptions = {(int(s), int(e), str(m)): int(src) for s, e, m, src in
                            self.probe.plug_source_exceptions}
        bad = sorted(p for p in self.protect if not 0 <= p < self.L)
        if bad:
            raise PPCLError(f"--protect block {bad[0]}: out of range (the model has blocks 0..{self.L - 1})")

    # -- constraints
    def removable(self, i: int) -> bool:
        """May block ``i`` lie inside an interval that removes blocks?"""
        if i in self.protect:
            return False
        return self.allow_ends or 0 < i < self.L - 1

    def interval_ok(self, s: int, e: int) -> bool:
        return (0 <= s < e < self.L and all(self.removable(i) for i in range(s, e + 1))
                and len({self.kinds[i] for i in range(s, e + 1)}) == 1)

    def segments(self) -> list[tuple[int, int]]:
        """Maximal runs of removable blocks of one kind (``[start, end]``)."""
        out, i = [], 0
        while i < self.L:
            if not self.removable(i):
                i += 1
                continue
            j = i
            while j + 1 < self.L and self.removable(j + 1) and self.kinds[j + 1] == self.kinds[i]:
                j += 1
            out.append((i, j))
            i = j + 1
        return out

    # -- accounting
    def source(self, s: int, e: int) -> int:
        if (s, e, self.init) in self._exceptions:
            return self._exceptions[(s, e, self.init)]
        return {"middle": (s + e) // 2, "first": s, "last": e}[self.init]

    def student(self, intervals: list[Interval]) -> int:
        ivs = sorted(intervals)
        return student_params(self.total, self.block_params, ivs, [self.source(s, e) for s, e in ivs])

    def removed_params(self, s: int, e: int) -> int:
        return sum(self.block_params[s:e + 1]) - self.block_params[self.source(s, e)]

    def target_student(self) -> int | None:
        if self.budget.keep_params is None:
            return None
        return int(self.budget.keep_params * self.total)

    def met(self, intervals: list[Interval]) -> bool:
        if self.budget.remove_blocks is not None:
            return sum(e - s for s, e in intervals) == self.budget.remove_blocks
        return self.student(intervals) <= self.target_student()

    def need(self, intervals: list[Interval]) -> int:
        """What is still to remove: blocks (remove_blocks) or parameters (keep_params); <= 0 when met."""
        if self.budget.remove_blocks is not None:
            return self.budget.remove_blocks - sum(e - s for s, e in intervals)
        return self.student(intervals) - self.target_student()

    def amount(self, s: int, e: int) -> int:
        return e - s if self.budget.remove_blocks is not None else self.removed_params(s, e)

    # -- per-block signals (mean over streams, as in probe.json)
    def c(self, i: int) -> float | None:
        return self.probe.blocks[i].cka

    def d(self, i: int) -> float | None:
        return self.probe.blocks[i].trend


def check_feasible(ctx: SelectionContext) -> None:
    """PPCLError when even the largest allowed removal (one interval per removable segment) misses the budget."""
    segs = [(s, e) for s, e in ctx.segments() if e > s]
    most_blocks = sum(e - s for s, e in segs)
    if ctx.budget.remove_blocks is not None:
        if ctx.budget.remove_blocks > most_blocks:
            raise PPCLError(
                f"infeasible budget: --remove-blocks {ctx.budget.remove_blocks} but at most {most_blocks} of "
                f"{ctx.L} blocks can be removed (first/last and protected blocks kept, kinds not crossed)")
        return
    best = ctx.student(segs)
    if best > ctx.target_student():
        raise PPCLError(
            f"infeasible budget: --keep-params {ctx.budget.keep_params:g} needs at most "
            f"{ctx.target_student():,} parameters but the smallest allowed student has {best:,} "
            f"({best / ctx.total:.1%} of {ctx.total:,})")


# ------------------------------------------------------------------------------------------ selectors
def _greedy(ctx: SelectionContext, candidates: list[tuple[float, Interval]], chosen: list[Interval]) -> None:
    """Add candidates (cost, interval), lowest cost first, to ``chosen`` until the budget is met."""
    used = {i for s, e in chosen for i in range(s, e + 1)}
    pool = sorted(candidates)
    while ctx.need(chosen) > 0:
        need = ctx.need(chosen)
        free = [(cost, iv) for cost, iv in pool if not used.intersection(range(iv[0], iv[1] + 1))]
        fits = [x for x in free if ctx.amount(*x[1]) <= need]
        if fits:
            pick = fits[0][1]
        elif free and ctx.budget.keep_params is not None:
            pick = min(free, key=lambda x: (ctx.amount(*x[1]), x[0]))[1]
        else:
            return
        chosen.append(pick)
        used.update(range(pick[0], pick[1] + 1))


def select_ppcl(ctx: SelectionContext) -> list[Interval]:
    """Flat runs of the CKA trend, ranked by interval-probe quality lost per parameter removed."""
    rem = [i for i in range(ctx.L) if ctx.removable(i) and ctx.c(i) is not None]
    cs = [ctx.c(i) for i in rem]
    ds = [abs(ctx.d(i)) for i in rem if ctx.d(i) is not None]
    min_cka = ctx.options.get("min_cka")
    max_jump = ctx.options.get("max_jump")
    min_cka = statistics.median(cs) if min_cka is None and cs else (min_cka if min_cka is not None else 1.0)
    max_jump = 2 * statistics.median(ds) if max_jump is None and ds else (max_jump if max_jump is not None else 0.0)
    runs: list[tuple[int, int]] = []
    start = None
    for i in range(ctx.L + 1):
        high = i < ctx.L and ctx.removable(i) and ctx.c(i) is not None and ctx.c(i) >= min_cka
        joins = (high and start is not None and ctx.kinds[i] == ctx.kinds[i - 1]
                 and ctx.d(i - 1) is not None and abs(ctx.d(i - 1)) <= max_jump)
        if start is not None and not joins:
            runs.append((start, i - 1))
            start = None
        if high and start is None:
            start = i
    runs = [r for r in runs if r[1] > r[0]]

    def scored(pairs) -> list[tuple[float, Interval]]:
        out = []
        for s, e in pairs:
            iv = ctx.probe.interval(s, e)
            removed = ctx.removed_params(s, e)
            if iv is None or iv.r2 is None or removed <= 0:
                continue
            out.append(((1.0 - iv.r2) / removed, (s, e)))
        return out

    def subintervals(spans):
        return [(s, e) for a, b in spans for s in range(a, b + 1) for e in range(s + 1, b + 1)
                if e - s + 1 <= ctx.probe.max_interval and ctx.interval_ok(s, e)]

    chosen: list[Interval] = []
    _greedy(ctx, scored(subintervals(runs)), chosen)
    relaxed = ctx.need(chosen) > 0
    if relaxed:
        _greedy(ctx, scored(subintervals(ctx.segments())), chosen)
    ctx.notes.update(min_cka=min_cka, max_jump=max_jump, flat_runs=[list(r) for r in runs], relaxed=relaxed)
    ctx.notes["interval_scores"] = {
        f"{s}-{e}": {"r2": ctx.probe.interval(s, e).r2,
                     "cost_per_param": (1 - ctx.probe.interval(s, e).r2) / ctx.removed_params(s, e)}
        for s, e in chosen if ctx.probe.interval(s, e) is not None and ctx.probe.interval(s, e).r2 is not None
    }
    return sorted(chosen)


def scattered_to_intervals(ctx: SelectionContext, removed: set[int]) -> list[Interval] | None:
    """Intervals removing exactly the blocks ``removed`` (see the module docstring), or None if impossible."""
    runs, i = [], 0
    order = sorted(removed)
    while i < len(order):
        j = i
        while j + 1 < len(order) and order[j + 1] == order[j] + 1 and ctx.kinds[order[j + 1]] == ctx.kinds[order[i]]:
            j += 1
        runs.append((order[i], order[j]))
        i = j + 1
    out: list[Interval] = []
    used: set[int] = set()
    for a, b in runs:
        if a - 1 >= 0 and a - 1 not in used and ctx.interval_ok(a - 1, b):
            iv = (a - 1, b)
        elif b + 1 < ctx.L and b + 1 not in removed and ctx.interval_ok(a, b + 1):
            iv = (a, b + 1)
        else:
            return None
        out.append(iv)
        used.update(range(iv[0], iv[1] + 1))
    return out


def _scattered(ctx: SelectionContext, order: list[int]) -> list[Interval]:
    """Add blocks in ``order`` while they stay expressible, until the budget is met."""
    removed: set[int] = set()
    intervals: list[Interval] = []
    for i in order:
        if ctx.need(intervals) <= 0:
            break
        trial = scattered_to_intervals(ctx, removed | {i})
        if trial is None:
            continue
        removed.add(i)
        intervals = trial
    ctx.notes["removed_blocks"] = sorted(removed)
    return intervals


def select_shortgpt(ctx: SelectionContext) -> list[Interval]:
    """ShortGPT block influence ``1 - cos(h_l, h_{l+1})``: lowest first."""
    bi = {i: 1.0 - (ctx.probe.blocks[i].cosine if ctx.probe.blocks[i].cosine is not None else -1.0)
          for i in range(ctx.L) if ctx.removable(i)}
    order = sorted(bi, key=lambda i: (bi[i], i))
    ctx.notes["block_influence"] = {str(i): bi[i] for i in order}
    return _scattered(ctx, order)


def select_random(ctx: SelectionContext) -> list[Interval]:
    order = [i for i in range(ctx.L) if ctx.removable(i)]
    _random.Random(ctx.seed).shuffle(order)
    return _scattered(ctx, order)


def select_uniform(ctx: SelectionContext) -> list[Interval]:
    """The smallest ``n`` for which ``n`` evenly spaced removable blocks meet the budget."""
    pool = [i for i in range(ctx.L) if ctx.removable(i)]
    for n in range(1, len(pool) + 1):
        picks = {pool[min(len(pool) - 1, int((k + 0.5) * len(pool) / n))] for k in range(n)}
        if len(picks) < n:
            continue
        ivs = scattered_to_intervals(ctx, picks)
        if ivs is not None and (ctx.need(ivs) <= 0 if ctx.budget.keep_params is not None
                                else ctx.need(ivs) == 0):
            ctx.notes["removed_blocks"] = sorted(picks)
            return ivs
        if ctx.budget.remove_blocks is not None and n >= ctx.budget.remove_blocks:
            break
    # Evenly spaced picks collide with constraints: spread outwards from the even positions instead.
    n = ctx.budget.remove_blocks or len(pool)
    even = [pool[min(len(pool) - 1, int((k + 0.5) * len(pool) / n))] for k in range(n)]
    order = list(dict.fromkeys(even + pool))
    return _scattered(ctx, order)


def _angle(ctx: SelectionContext, a: int, b: int) -> float | None:
    vals = [m[a][b] for m in ctx.probe.angular.values() if m[a][b] is not None]
    return sum(vals) / len(vals) if vals else None


def select_angular(ctx: SelectionContext) -> list[Interval]:
    """Contiguous windows of minimal angular distance between ``h_l`` and ``h_{l+n}``."""
    chosen: list[Interval] = []
    used: set[int] = set()
    while ctx.need(chosen) > 0:
        need = ctx.need(chosen)
        options = []  # (n, distance, interval)
        for s in range(ctx.L):
            for e in range(s + 1, ctx.L):
                if not ctx.interval_ok(s, e):
                    break
                if used.intersection(range(s, e + 1)):
                    break
                dist = _angle(ctx, s, e)
                if dist is not None:
                    options.append((ctx.amount(s, e), e - s, dist, (s, e)))
        if not options:
            break
        meets = [o for o in options if o[0] >= need and (ctx.budget.keep_params is not None or o[0] == need)]
        if meets:  # the smallest window that completes the budget, then the closest states
            pick = min(meets, key=lambda o: (o[1], o[2]))[3]
        else:  # no single window suffices: the largest window, then the closest states
            pick = min((o for o in options if o[0] < need), key=lambda o: (-o[1], o[2]), default=None)
            if pick is None:
                break
            pick = pick[3]
        chosen.append(pick)
        used.update(range(pick[0], pick[1] + 1))
        ctx.notes.setdefault("angular_distance", {})[f"{pick[0]}-{pick[1]}"] = _angle(ctx, *pick)
    return sorted(chosen)


SELECTORS: dict[str, Callable[[SelectionContext], list[Interval]]] = {
    "ppcl": select_ppcl,
    "shortgpt": select_shortgpt,
    "angular": select_angular,
    "uniform": select_uniform,
    "random": select_random,
}


def teacher_from_probe(probe: ProbeResult) -> Teacher:
    return Teacher(
        num_blocks=len(probe.blocks), total_params=probe.total_params,
        blocks=[TeacherBlock(index=b.index, kind=b.kind, params=b.params,
                             streams=list(b.streams))
                for b in probe.blocks],
    )


def select(
    probe: ProbeResult,
    *,
    method: str = "ppcl",
    keep_params: float | None = None,
    remove_blocks: int | None = None,
    protect: list[int] | tuple[int, ...] = (),
    allow_ends: bool = False,
    init: str = "middle",
    seed: int = 0,
    **options: Any,
) -> Plan:
    """Choose intervals with ``method`` under the budget and return the validated Plan (exact params).

    ``options``: ``min_cka``, ``max_jump`` (ppcl). Raises PPCLError for an unknown method, a bad or infeasible
    budget, or a budget the method could not reach.
    """
    if method not in SELECTORS:
        raise PPCLError(f"unknown selection method '{method}': expected one of {', '.join(SELECTORS)}")
    if init not in ("middle", "first", "last"):
        raise PPCLError(f"unknown plug init '{init}': expected middle, first or last")
    ctx = SelectionContext(probe=probe, budget=Budget(keep_params, remove_blocks), protect=frozenset(protect),
                           allow_ends=allow_ends, init=init, seed=seed, options=dict(options))
    check_feasible(ctx)
    intervals = sorted(SELECTORS[method](ctx))
    check_intervals(intervals, ctx.kinds, allow_ends=allow_ends, protect=sorted(protect))
    if not ctx.met(intervals):
        raise PPCLError(
            f"method {method} could not meet {ctx.budget.describe()} under the constraints "
            f"(reached {sum(e - s for s, e in intervals)} blocks removed, "
            f"{ctx.student(intervals) / ctx.total:.1%} of parameters kept)")
    student = ctx.student(intervals)
    return Plan(
        family=probe.family, teacher=teacher_from_probe(probe), intervals=intervals, init=init,
        allow_ends=allow_ends, protect=sorted(protect),
        params=Params(teacher=ctx.total, student=student),
        plug_sources=[ctx.source(s, e) for s, e in intervals],
        selection={"method": method, "budget": ctx.budget.describe(), "seed": seed,
                   "probe_model": probe.model, "removed_blocks": sum(e - s for s, e in intervals),
                   "keep_fraction": student / ctx.total, **ctx.notes},
    )
