"""Interval selection under a budget (method.md section 1): the PPCL selector and four baselines.

Every selector has ONE signature (Torch-Pruning style pluggable scorers)::

    selector(ctx: SelectionContext) -> list[tuple[int, int]]      # intervals, 0-based inclusive

and :func:`select` wraps any of them into a validated :class:`ppcl.plan.Plan` with exact parameter counts. All
inputs come from probe.json (block kinds, exact per-block and total parameter counts, the family's plug-source
departures), so selection needs no model.

Budget: ``keep_params=F`` (student parameters <= F x teacher parameters; selectors add removals until it is met,
the last one chosen as the smallest that completes it - ppcl: no chosen interval is superfluous - so the overshoot
is at most one interval) or
``remove_blocks=N`` (exactly N blocks removed). An unreachable budget is a PPCLError. Every method
obeys the same constraints: no interval crosses a kind boundary; first/last blocks (unless ``allow_ends``) and
protected blocks are never inside an interval that removes blocks.

Methods:

- ``ppcl``: flat runs of the CKA trend first, then interval probe quality per parameter removed, solved EXACTLY.
  Block ``l`` is *high* when ``c_l >= min_cka`` (default: the median of ``c`` over removable blocks); consecutive
  high blocks of one kind join one *flat run* unless the trend jumps, ``|d_{l-1}| > max_jump`` (default: 2 x the
  median ``|d|``), which makes an edge. Every allowed interval ``[s, e]`` (one kind, no end/protected block,
  removing something) is a candidate with the cost::

      cost = quality  +  break_cost x breaks  +  1e-6

  ``quality`` is the interval's score (``score``): ``"r2"`` (default) ``1 - R^2`` of the linear interval probe
  ``h_{e+1} ~ f(h_s)``; ``"trained"`` the trained-plug probe's ``trained_quality`` (probe.json ``trained``,
  :mod:`ppcl.probe_trained`: the held-out loss D of a briefly trained plug over that of skipping the interval,
  the same scale: 0 = perfectly replaceable, 1 = no better than skipping it); ``"output"`` the same probe's
  ``output_error``: the relative error of the model's (guided) output with only that trained plug in place, so
  the summed cost is the plan's predicted output error to first order. It measures directly what the flat runs
  stand in for, so with ``"output"`` ``break_cost`` defaults to 0 (docs/benchmark.md, "The output score": on the
  reference teacher it is the one score that ranks the short-plug plans above one long plug, as the judge does).

  ``breaks`` counts how far the interval leaves a flat run: its low-CKA blocks plus the ``|d|`` jumps between
  two of its consecutive blocks (0 exactly for the sub-intervals of flat runs - the paper's candidates, split or
  trimmed to fit). ``break_cost`` (default 1.0: one break costs as much as an interval the probe cannot predict
  at all, R^2 = 0 or trained quality 1) makes flat runs come first through the cost instead of a hard filter, so
  ``min_cka`` and ``max_jump`` still decide what is preferred but can never make a feasible budget unreachable.
  Intervals longer than the probe's ``max_interval`` (or with no R^2; with ``score="trained"``: no trained score)
  have no score: their quality term is the worst scored one, at least 1; they only exist so that any feasible
  budget stays reachable. The plan is the set of non-overlapping candidates of minimum total cost that meets the
  budget, found by a dynamic programme over block positions (state: position and amount removed so far, exact -
  blocks, or parameters capped at the need). Minimising the
  summed quality lost under a parameter budget is the exact form of "ranked by quality lost per parameter
  removed" (the greedy ratio ranking is the knapsack heuristic, which can strand isolated blocks and miss a
  reachable budget); merging, extending, splitting or trimming intervals all come out of it. Every interval
  costs > 0, so no chosen interval is superfluous: the overshoot of a ``keep_params`` budget is at most one
  interval. Deterministic: ties go to fewer intervals, then the first found in execution order. The metadata
  records the score used, the thresholds, the flat runs, each chosen interval's R^2 (and trained quality),
  breaks and cost, and ``relaxed`` (some chosen interval leaves the flat runs or is unscored).
- ``ppcl`` with ``serve=[r, ...]`` ("Several ratios"; ``keep_params`` budgets): one training run is exported at
  ``keep_params`` AND at each served ratio ``r`` (a keep fraction above it) with a subset of the same plugs. The
  plan and one subset per served ratio are chosen together, minimising the SUM of the costs of every model that
  will be exported (the plan's, plus each subset's): an interval costs once per model it is in. A plan that is
  cheapest at ``keep_params`` alone may have no good subset for ``r`` (on the reference teacher: one long plug);
  this trades some cost at ``keep_params`` for a much better model at ``r``. Solved exactly by the same dynamic
  programme with one removed amount per model (each candidate placed with the set of subsets holding it;
  states Pareto-pruned over all amounts). ``serve_subsets="joint"`` records the subsets in ``Plan.serves``; export
  and distillation's ``output_loss_ratios`` then build and train exactly them (:func:`ppcl.subsets.choose_intervals`).
  The default, ``"size_rule"``, keeps only the plan: each served ratio is exported and trained with the subset the
  export's size rule picks from it, and the jointly chosen subsets stay in the metadata (``serve``). On the
  reference teacher the size rule's subset of the same plan read 0.1-0.55 points higher at both ratios, six of six
  paired comparisons (docs/benchmark.md, "Which 0.7 model"): the summed score adds the plugs' errors, and so favours
  many short plugs, where fewer plugs compound less error.
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
from ppcl.settings import INTERVAL_SCORES, PLUG_INITS, SERVE_SUBSETS
from ppcl.settings import SELECT_METHODS as METHODS
#: ppcl: cost of one flat-run break inside an interval (a low-CKA block, or a |d| jump between two of its blocks).
DEFAULT_BREAK_COST = 1.0
#: ppcl: cost of every interval (one more plug to train): makes each interval cost > 0, so no chosen interval is
#: superfluous, and prefers fewer plugs at equal quality.
INTERVAL_COST = 1e-6
Interval = tuple[int, int]
#: ppcl with serve: most partial plans the joint dynamic programme keeps at one block position (past it, a one-line
#: error instead of minutes of work). Measured on synthetic probes: one served ratio on 57-60 blocks and three on 16
#: blocks keep under 1,000 (seconds); each more ratio multiplies the states
MAX_JOINT_STATES = 4000


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
    #: ppcl: the interval quality term, ``"r2"`` (linear probe), ``"trained"`` (trained-plug probe, local loss) or
    #: ``"output"`` (trained-plug probe, the model output's error)
    score: str = "r2"
    #: ppcl: keep ratios above the budget's the plan must also serve with a subset of its plugs
    serve: list[float] = field(default_factory=list)
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
def _ppcl_thresholds(ctx: SelectionContext) -> tuple[float, float, float]:
    """``(min_cka, max_jump, break_cost)`` from ``ctx.options`` or their defaults (see the module docstring)."""
    rem = [i for i in range(ctx.L) if ctx.removable(i) and ctx.c(i) is not None]
    cs = [ctx.c(i) for i in rem]
    ds = [abs(ctx.d(i)) for i in rem if ctx.d(i) is not None]
    min_cka = ctx.options.get("min_cka")
    max_jump = ctx.options.get("max_jump")
    break_cost = ctx.options.get("break_cost")
    min_cka = statistics.median(cs) if min_cka is None and cs else (min_cka if min_cka is not None else 1.0)
    max_jump = 2 * statistics.median(ds) if max_jump is None and ds else (max_jump if max_jump is not None else 0.0)
    if break_cost is None:
        break_cost = 0.0 if ctx.score == "output" else DEFAULT_BREAK_COST
    for name, value in (("min_cka", min_cka), ("max_jump", max_jump), ("break_cost", break_cost)):
        if not isinstance(value, (int, float)) or value != value:
            raise PPCLError(f"ppcl selector: {name} must be a number (got {value!r})")
    if max_jump < 0 or break_cost < 0:
        raise PPCLError(f"ppcl selector: max_jump and break_cost must be >= 0 (got {max_jump:g}, {break_cost:g})")
    return float(min_cka), float(max_jump), float(break_cost)


def _flat_runs(ctx: SelectionContext, min_cka: float, max_jump: float) -> tuple[list[Interval], list[bool], list[bool]]:
    """Maximal flat runs (2+ blocks), and per block: ``high`` (``c_l >= min_cka``, removable) and ``jump`` (block
    ``l`` does not join block ``l - 1``'s run: ``|d_{l-1}| > max_jump`` or no trend)."""
    high = [ctx.removable(i) and ctx.c(i) is not None and ctx.c(i) >= min_cka for i in range(ctx.L)]
    jump = [i == 0 or ctx.d(i - 1) is None or abs(ctx.d(i - 1)) > max_jump for i in range(ctx.L)]
    runs: list[Interval] = []
    start = None
    for i in range(ctx.L + 1):
        joins = (i < ctx.L and high[i] and start is not None and ctx.kinds[i] == ctx.kinds[i - 1] and not jump[i])
        if start is not None and not joins:
            runs.append((start, i - 1))
            start = None
        if i < ctx.L and high[i] and start is None:
            start = i
    return [r for r in runs if r[1] > r[0]], high, jump


@dataclass(frozen=True)
class _Candidate:
    s: int
    e: int
    cost: float  # quality + break_cost * breaks + INTERVAL_COST
    quality: float  # 1 - R^2 (clamped at 0) or trained_quality; unscored: the worst scored value, at least 1
    breaks: int
    scored: bool
    amount: int  # what it contributes to the budget: blocks (remove_blocks) or parameters (keep_params)


def _ppcl_candidates(ctx: SelectionContext, high: list[bool], jump: list[bool], break_cost: float) -> list[_Candidate]:
    """Every allowed interval removing something, with its cost (see the module docstring)."""
    spans = []
    for a, b in ctx.segments():
        spans += [(s, e) for s in range(a, b + 1) for e in range(s + 1, b + 1)]
    scored_q = _interval_quality(ctx, spans)
    # An interval the probe did not score (longer than max_interval, or degenerate) is assumed as bad as the worst
    # scored one and never better than R^2 = 0: it is there so that any feasible budget stays reachable.
    unscored_q = max([1.0, *scored_q.values()])
    out = []
    for s, e in spans:
        amount = ctx.amount(s, e)
        if amount <= 0:
            continue
        breaks = sum(not high[i] for i in range(s, e + 1)) + sum(jump[i] for i in range(s + 1, e + 1))
        q = scored_q.get((s, e), unscored_q)
        out.append(_Candidate(s, e, q + break_cost * breaks + INTERVAL_COST, q, breaks, (s, e) in scored_q, amount))
    return out


def _interval_quality(ctx: SelectionContext, spans: list[Interval]) -> dict[Interval, float]:
    """The quality term of every scored span: ``1 - R^2`` (clamped at 0) of the linear probe, or the trained-plug
    probe's ``trained_quality`` (``ctx.score == "trained"``) or ``output_error`` (``"output"``); spans without a
    finite score are left out."""
    scored: dict[Interval, float] = {}
    if ctx.score in ("trained", "output"):
        for s, e in spans:
            tv = ctx.probe.trained.interval(s, e)
            v = None if tv is None else (tv.trained_quality if ctx.score == "trained" else tv.output_error)
            if v is not None and v == v:
                scored[(s, e)] = max(0.0, v)
        return scored
    for s, e in spans:
        iv = ctx.probe.interval(s, e) if e - s + 1 <= ctx.probe.max_interval else None
        if iv is not None and iv.r2 is not None and iv.r2 == iv.r2:
            scored[(s, e)] = max(0.0, 1.0 - iv.r2)
    return scored


def check_score(probe: ProbeResult, score: str, where: str = "the probe") -> None:
    """PPCLError unless ``score`` is known and ``probe`` holds what it reads (``where`` names the probe file)."""
    if score not in INTERVAL_SCORES:
        raise PPCLError(f"unknown interval score '{score}': expected one of {', '.join(INTERVAL_SCORES)}")
    if score in ("trained", "output") and (probe.trained is None or not probe.trained.intervals):
        raise PPCLError(f"--score {score}: {where} has no trained-plug scores (field 'trained'); write them with "
                        "ppcl probe --trained-steps N")
    if score == "output" and all(iv.output_error is None for iv in probe.trained.intervals):
        raise PPCLError(f"--score output: {where} has no output errors (trained.intervals[].output_error); it was "
                        "written before they existed: run ppcl probe --trained-steps N again")


def _min_cost_cover(ctx: SelectionContext, candidates: list[_Candidate]) -> list[_Candidate] | None:
    """Exact minimum-total-cost set of non-overlapping candidates meeting the budget, or None if none does.

    Dynamic programme over block positions ``p = 0..L`` (candidates are contiguous, so "no overlap" means each
    one starts at or after the previous one's end + 1). State at ``p``: the amount removed so far (exact integer:
    blocks, or parameters clamped at the need, since any amount beyond the need is equally feasible). Each state
    keeps its cheapest path; under ``keep_params`` a state is dropped when another at the same position removes
    at least as much for at most the same cost (it cannot lead anywhere cheaper). Ties: lower cost, then fewer
    intervals, then the first found in execution order - deterministic."""
    need = ctx.need([])
    if need <= 0:
        return []
    exact = ctx.budget.remove_blocks is not None
    starting: dict[int, list[_Candidate]] = {}
    for c in candidates:
        starting.setdefault(c.s, []).append(c)
    # states[p]: amount -> (cost, n_intervals, previous position, previous amount, candidate or None)
    states: list[dict[int, tuple[float, int, int, int, _Candidate | None]]] = [{} for _ in range(ctx.L + 1)]
    states[0][0] = (0.0, 0, -1, -1, None)

    def offer(p: int, amount: int, entry) -> None:
        old = states[p].get(amount)
        if old is None or (entry[0], entry[1]) < (old[0], old[1]):
            states[p][amount] = entry

    for p in range(ctx.L):
        here = states[p]
        if not exact and len(here) > 1:  # Pareto pruning (see the docstring)
            kept, best = {}, None
            for amount in sorted(here, reverse=True):
                key = (here[amount][0], here[amount][1])
                if best is None or key < best:
                    kept[amount], best = here[amount], key
            states[p] = here = kept
        for amount, (cost, n, *_rest) in sorted(here.items()):
            offer(p + 1, amount, (cost, n, p, amount, None))  # block p stays as it is
            for c in starting.get(p, ()):
                total = amount + c.amount
                if exact and total > need:
                    continue
                offer(c.e + 1, total if exact else min(total, need), (cost + c.cost, n + 1, p, amount, c))
    final = states[ctx.L].get(need)
    if final is None:
        return None
    chosen, p, amount = [], ctx.L, need
    while p > 0:
        _cost, _n, prev_p, prev_amount, cand = states[p][amount]
        if cand is not None:
            chosen.append(cand)
        p, amount = prev_p, prev_amount
    return sorted(chosen, key=lambda c: c.s)


def _joint_cover(ctx: SelectionContext, candidates: list[_Candidate], ratios: list[float]
                 ) -> tuple[list[_Candidate], list[list[_Candidate]]] | None:
    """The plan and, for every ratio of ``ratios`` (keep fractions above the budget's), the subset of it that
    serves that ratio, of minimum total cost ``sum over the plan + every subset of the candidates' costs``: one
    training run for several ratios, chosen for all of them at once (module docstring, "Several ratios").

    The dynamic programme of :func:`_min_cost_cover` with one amount per ratio: each candidate is placed with a
    mask saying which subsets hold it (its cost counted once per model it is in). State at position ``p``: the
    amounts removed by the plan and by each subset, each clamped at its need; a state is dropped when another at
    the same position removes at least as much in every model for at most the same cost. None if no plan meets
    every budget."""
    total_need = ctx.need([])
    needs = [total_need] + [ctx.student([]) - int(r * ctx.total) for r in ratios]
    if any(n <= 0 for n in needs):
        raise AssertionError("serve ratios are checked to be below the teacher's size")
    m = len(ratios)
    starting: dict[int, list[_Candidate]] = {}
    for c in candidates:
        starting.setdefault(c.s, []).append(c)
    masks = [tuple(bool(k >> i & 1) for i in range(m)) for k in range(2 ** m)]
    # states[p]: amounts -> (cost, n_intervals, previous position, previous amounts, candidate, mask)
    start = tuple(0 for _ in needs)
    states: list[dict[tuple[int, ...], tuple]] = [{} for _ in range(ctx.L + 1)]
    states[0][start] = (0.0, 0, -1, None, None, None)

    def offer(p: int, key: tuple[int, ...], entry) -> None:
        old = states[p].get(key)
        if old is None or (entry[0], entry[1]) < (old[0], old[1]):
            states[p][key] = entry

    for p in range(ctx.L):
        here = states[p]
        if len(here) > 1:  # Pareto pruning over (amounts, cost)
            kept: dict[tuple[int, ...], tuple] = {}
            for key in sorted(here, key=lambda k: (here[k][0], here[k][1], tuple(-a for a in k))):
                if not any(all(a >= b for a, b in zip(other, key)) for other in kept):
                    kept[key] = here[key]
            states[p] = here = kept
        if len(here) > MAX_JOINT_STATES:
            raise PPCLError(f"--serve {', '.join(f'{r:g}' for r in ratios)}: the joint selection holds "
                            f"{len(here):,} partial plans at block {p} (limit {MAX_JOINT_STATES:,}); serve fewer "
                            "ratios at once")
        for key, (cost, n, *_rest) in sorted(here.items()):
            offer(p + 1, key, (cost, n, p, key, None, None))
            for c in starting.get(p, ()):
                for mask in masks:
                    new = (min(key[0] + c.amount, needs[0]),) + tuple(
                        min(a + c.amount, need) if inside else a for a, need, inside in zip(key[1:], needs[1:], mask))
                    offer(c.e + 1, new, (cost + c.cost * (1 + sum(mask)), n + 1, p, key, c, mask))
    final = states[ctx.L].get(tuple(needs))
    if final is None:
        return None
    plan: list[_Candidate] = []
    subsets: list[list[_Candidate]] = [[] for _ in ratios]
    p, key = ctx.L, tuple(needs)
    while p > 0:
        _cost, _n, prev_p, prev_key, cand, mask = states[p][key]
        if cand is not None:
            plan.append(cand)
            for i, inside in enumerate(mask):
                if inside:
                    subsets[i].append(cand)
        p, key = prev_p, prev_key
    order = lambda cs: sorted(cs, key=lambda c: c.s)  # noqa: E731
    return order(plan), [order(sub) for sub in subsets]


def select_ppcl(ctx: SelectionContext) -> list[Interval]:
    """Flat runs of the CKA trend first, then interval-probe quality lost per parameter removed, solved exactly
    (minimum total cost over non-overlapping intervals that meets the budget; see the module docstring)."""
    min_cka, max_jump, break_cost = _ppcl_thresholds(ctx)
    runs, high, jump = _flat_runs(ctx, min_cka, max_jump)
    candidates = _ppcl_candidates(ctx, high, jump, break_cost)
    if ctx.serve:
        joint = _joint_cover(ctx, candidates, ctx.serve)
        chosen, subsets = joint if joint is not None else ([], [])
        if joint is not None:
            ctx.notes["serve"] = {f"{r:g}": {"intervals": [[c.s, c.e] for c in sub],
                                             "keep_fraction": ctx.student([(c.s, c.e) for c in sub]) / ctx.total,
                                             "cost": sum(c.cost for c in sub)}
                                  for r, sub in zip(ctx.serve, subsets)}
            ctx.notes["joint_cost"] = sum(c.cost for c in chosen) + sum(c.cost for sub in subsets for c in sub)
    else:
        chosen = _min_cost_cover(ctx, candidates)
    if chosen is None:  # only when no set of allowed intervals meets it; select() names the budget
        chosen = []
    ctx.notes.update(score=ctx.score, min_cka=min_cka, max_jump=max_jump, break_cost=break_cost,
                     flat_runs=[list(r) for r in runs],
                     relaxed=any(c.breaks > 0 or not c.scored for c in chosen),
                     cost=sum(c.cost for c in chosen))
    ctx.notes["interval_scores"] = {f"{c.s}-{c.e}": _chosen_record(ctx, c) for c in chosen}
    return [(c.s, c.e) for c in chosen]


def _chosen_record(ctx: SelectionContext, c: _Candidate) -> dict[str, Any]:
    """The selection metadata of one chosen interval: both probes' scores where present, breaks and cost."""
    iv = ctx.probe.interval(c.s, c.e)
    out = {"r2": iv.r2 if iv is not None else None}
    if ctx.score in ("trained", "output"):
        tv = ctx.probe.trained.interval(c.s, c.e)
        out["trained_quality"] = tv.trained_quality if tv is not None else None
        out["output_error"] = tv.output_error if tv is not None else None
    removed = ctx.removed_params(c.s, c.e)
    return {**out, "scored": c.scored, "breaks": c.breaks, "cost": c.cost,
            "cost_per_param": c.quality / removed if removed > 0 else None}


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
    score: str = "r2",
    serve: list[float] | tuple[float, ...] = (),
    serve_subsets: str = "size_rule",
    **options: Any,
) -> Plan:
    """Choose intervals with ``method`` under the budget and return the validated Plan (exact params).

    ``score`` (ppcl): the interval quality term, ``"r2"``, ``"trained"`` or ``"output"`` (both need probe.json's
    ``trained``). ``serve`` (ppcl, ``keep_params`` budgets): keep ratios above ``keep_params`` that subsets of the
    plan must serve; the plan and its subsets are chosen together. ``serve_subsets``: ``"size_rule"`` (each served
    ratio's model is the export size rule's subset of the plan) or ``"joint"`` (the subsets chosen with the plan,
    recorded in ``Plan.serves``).
    ``options``: ``min_cka``, ``max_jump``, ``break_cost`` (ppcl). Raises PPCLError for an unknown method or
    score, a score another method cannot use, a bad or infeasible budget, or a budget the method could not reach.
    """
    if method not in SELECTORS:
        raise PPCLError(f"unknown selection method '{method}': expected one of {', '.join(SELECTORS)}")
    check_score(probe, score)
    if score != "r2" and method != "ppcl":
        raise PPCLError(f"--score {score}: only the ppcl selector scores intervals (method {method})")
    if score in ("trained", "output") and probe.trained.init != init:
        raise PPCLError(f"--score {score}: the probe's trained plugs started from the {probe.trained.init} block "
                        f"(field trained.init) but --init is {init}")
    serve = sorted({float(r) for r in serve}, reverse=True)
    if serve_subsets not in SERVE_SUBSETS:
        raise PPCLError(f"unknown serve_subsets '{serve_subsets}': expected one of {', '.join(SERVE_SUBSETS)}")
    if serve:
        if method != "ppcl":
            raise PPCLError(f"--serve: only the ppcl selector chooses a plan for several ratios (method {method})")
        if keep_params is None:
            raise PPCLError("--serve needs a --keep-params budget (the ratios it serves are keep fractions)")
        bad = [r for r in serve if not keep_params < r < 1]
        if bad:
            raise PPCLError(f"--serve {bad[0]:g}: a served ratio must lie between --keep-params {keep_params:g} "
                            "and 1 (it keeps a subset of the plan's plugs)")
    if init not in PLUG_INITS:
        raise PPCLError(f"unknown plug init '{init}': expected middle, first or last")
    ctx = SelectionContext(probe=probe, budget=Budget(keep_params, remove_blocks), protect=frozenset(protect),
                           allow_ends=allow_ends, init=init, seed=seed, score=score, serve=list(serve),
                           options=dict(options))
    check_feasible(ctx)
    intervals = sorted(SELECTORS[method](ctx))
    check_intervals(intervals, ctx.kinds, allow_ends=allow_ends, protect=sorted(protect))
    if not ctx.met(intervals):
        raise PPCLError(
            f"method {method} could not meet {ctx.budget.describe()} under the constraints "
            f"(reached {sum(e - s for s, e in intervals)} blocks removed, "
            f"{ctx.student(intervals) / ctx.total:.1%} of parameters kept)")
    student = ctx.student(intervals)
    serves = {}
    for key, chosen in ctx.notes.get("serve", {}).items():
        serves[key] = [intervals.index(tuple(iv)) for iv in chosen["intervals"]]
        if ctx.student([tuple(iv) for iv in chosen["intervals"]]) > int(float(key) * ctx.total):
            raise AssertionError(f"the subset serving {key} misses its budget")
    if serve:
        ctx.notes["serve_subsets"] = serve_subsets
    if serve_subsets == "size_rule":
        serves = {}  # the plan was chosen for the served ratios; the export's size rule picks their subsets
    return Plan(
        family=probe.family, teacher=teacher_from_probe(probe), intervals=intervals, init=init,
        allow_ends=allow_ends, protect=sorted(protect),
        params=Params(teacher=ctx.total, student=student),
        plug_sources=[ctx.source(s, e) for s, e in intervals], serves=serves,
        selection={"method": method, "budget": ctx.budget.describe(), "seed": seed,
                   "probe_model": probe.model, "removed_blocks": sum(e - s for s, e in intervals),
                   "keep_fraction": student / ctx.total, **ctx.notes},
    )
