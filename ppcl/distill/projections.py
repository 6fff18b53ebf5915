"""Least-squares init of the width projections (method.md section 3), before distillation refines them.

Each residual projection ``y = x + W x + b`` starts at the closed-form solution from normal equations accumulated
over many batches (float64), not one batch (the released code re-solves on each batch and keeps the 10th).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ppcl.arch.common import Adapter, split_output
from ppcl.distill.losses import frozen_calls, teacher_pass, unit_call
from ppcl.distill.units import Unit
from ppcl.plugs import NormalEquations


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
