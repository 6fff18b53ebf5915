"""Held-out loss D of a plan's units, before or after training (what tests and benchmarks compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ppcl.distill.losses import teacher_pass, unit_step_losses
from ppcl.distill.projections import fit_width_units
from ppcl.distill.train import load_teacher
from ppcl.distill.units import build_units, load_unit_weights
from ppcl.plan import as_plan
from ppcl.plugs import LOSS_EPS, freeze


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

    pipe, adapter = load_teacher(model)
    plan_obj = as_plan(plan)
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
