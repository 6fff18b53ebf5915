"""The trained-plug probe (issue 19, item 3): score every candidate interval by a SHORT distillation of its plug.

The linear probe (:mod:`ppcl.probe`) asks whether ``h_{e+1}`` is a linear function of ``h_s``; what the method then
does is train ONE teacher block (the plug) to replace the interval. This probe measures that directly: every
candidate interval ``[s, e]`` gets the plug distill would build for it (:func:`ppcl.plugs.make_depth_plug`, a copy
of block ``adapter.plug_source(s, e, init)``) and all of them are trained at once for ``steps`` steps with the
method's loss D, then scored on held-out batches.

One step is what one distillation step is (:mod:`ppcl.distill.losses`): ONE stock teacher pass under ``no_grad``
captures the call entering every candidate's start and the streams leaving every candidate's end
(:func:`ppcl.distill.losses.teacher_pass`); each plug then runs on its captured call with grad and its loss D,
summed over its streams, is backpropagated at once (per-plug backward: one plug's activations alive at a time);
one optimiser step. Plugs never feed each other, so the overlapping candidates train independently, exactly as
each would in a non-sequential run of a plan holding it.

Choices (recorded in probe.json's ``trained``):
- Data and noise are drawn as distill draws them: :func:`ppcl.distill.streams.training_stream` and
  :func:`ppcl.distill.streams.step_inputs` on a :class:`~ppcl.settings.DistillSettings` with this probe's batch
  size, seed and logit-normal timesteps (DistillSettings' default); teacher and plugs in float32 on the CPU (a
  probe for small teachers: the reference teacher's 60 plugs take ~0.8 s a step on one core).
- ONE AdamW over every plug, weight decay 0 (DistillSettings' default); AdamW is per parameter, so this is the
  same as one optimiser per plug, with one Python call (one fused kernel) per step. Gradient clipping at
  ``max_grad_norm`` is PER PLUG (each plug's own norm, as if it were trained alone): a global norm over 60 plugs
  would let one plug's large gradient shrink every other plug's step. Linear warm-up then cosine to 0 (:func:`ppcl.distill.optim.lr_factor`).
- Held-out scoring: ``eval_batches`` batches with FIXED noise seeded by negative step numbers (never a training
  step's noise, as :func:`ppcl.distill.train.fit_projections` does). With an in-memory batch list longer than
  ``eval_batches`` the last ``eval_batches`` batches are held out and never trained on (``heldout="batches"``);
  a latent cache is read through the training stream, which visits every sample, so its held-out set is the
  stream's first ``eval_batches`` batches, unseen noise and timesteps on seen images (``heldout="noise"``): a
  ~100k-parameter plug trained a few hundred steps does not memorise images, the noise is what varies.
- Scores per interval: ``trained_loss`` (the trained plug), ``initial_loss`` (the untrained copy, what
  "no distillation" exports), ``identity_loss`` (the interval skipped: the teacher's streams entering ``s``
  compared with those leaving ``e``), each the mean over the held-out batches of D summed over the plug's streams,
  and ``trained_quality = trained_loss / max(identity_loss, IDENTITY_FLOOR)``: the fraction of what the interval
  does that the trained plug fails to reproduce (the analogue of ``1 - R^2``; 0 = perfect, 1 = no better than
  skipping the interval, > 1 worse). An interval whose output equals its input to within the floor (D < 1e-6:
  token cosines above 1 - 5e-7) does nothing measurable, so the ratio is taken against the floor: a plug
  reproducing it to within the floor scores ~0, one that does not is ranked by its own loss, never divided by ~0.
- ``output_error`` per interval (the ``"output"`` score of :mod:`ppcl.select`): what the trained plug does to the
  MODEL's output. On the same held-out inputs, the teacher with only this plug in place
  (:func:`ppcl.distill.losses.student_forward`, starting from the teacher's captured call at the plug) against the
  teacher: ``mean_b ||g_student - g_teacher||^2 / ||g_teacher||^2`` with ``g = w * v(cond) - (w - 1) * v(uncond)``,
  the velocity the sampler follows under true classifier-free guidance of scale ``w = output_guidance`` (1: the
  conditional output alone, for guidance-distilled models and pipelines without a negative prompt). Why
  (docs/benchmark.md, "The output score"): on the reference teacher the local ratio above and the linear probe's
  R^2 both call one long plug over nine single-stream blocks the cheapest removal; its output error is the largest
  of any plan's, and the judge agrees (0.975 against 0.986-0.991 for the short-plug plans at keep 0.7). Summed over
  a plan's intervals it predicts the plan's error to first order (the errors of far-apart plugs add).
- ``uncond_ratio``: the share of training samples on the negative prompt, as distill's setting (the unconditional
  branch a guided output error measures must have been trained).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ppcl.distill.losses import student_forward, teacher_pass, unit_call, unit_step_losses, unit_target
from ppcl.distill.optim import lr_factor
from ppcl.distill.streams import step_inputs, take, training_stream, training_uncond
from ppcl.distill.train import load_teacher
from ppcl.distill.units import Unit
from ppcl.errors import PPCLError
from ppcl.plugs import LOSS_EPS, depth_plug_specs, freeze, make_depth_plug, plug_loss
from ppcl.probe_result import TrainedInterval, TrainedProbe

#: the result: probe.json's ``trained`` field
TrainedScores = TrainedProbe

#: identity losses below this are taken as this in ``trained_quality`` (module docstring)
IDENTITY_FLOOR = 1e-6


def default_candidates(adapter: Any, max_interval: int | None = None, init: str = "middle") -> list[tuple[int, int]]:
    """Every ``[s, e]``, ``s < e``, inside one block kind, at most ``max_interval`` blocks long (None: any length),
    that :func:`ppcl.plugs.depth_plug_specs` accepts (so never across block lists); execution order."""
    kinds = [b.kind for b in adapter.blocks()]
    out = []
    for s in range(len(kinds)):
        for e in range(s + 1, len(kinds)):
            if kinds[e] != kinds[s] or (max_interval is not None and e - s + 1 > max_interval):
                break
            try:
                depth_plug_specs(adapter, [[s, e]], init)
            except PPCLError:
                continue
            out.append((s, e))
    return out


def candidate_units(adapter: Any, candidates: list[tuple[int, int]], init: str = "middle") -> list[Unit]:
    """One trainable depth plug per candidate, built as distill builds a plan's (a copy of its source block)."""
    units = []
    for k, (s, e) in enumerate(candidates):
        s, e = int(s), int(e)
        if s >= e:
            raise PPCLError(f"trained probe candidate {k} [{s}, {e}]: an interval must end after it starts "
                            "(it removes e - s blocks)")
        (spec,) = depth_plug_specs(adapter, [[s, e]], init)
        units.append(Unit(f"interval_{s}_{e}", "interval", s, e, spec.source, make_depth_plug(adapter, spec),
                          index=k, interval=[s, e]))
    return units


def _check_arguments(steps: int, eval_batches: int, max_interval: int | None, uncond_ratio: float,
                     output_guidance: float) -> None:
    """One-line PPCLErrors for :func:`trained_interval_scores`' numeric arguments."""
    if steps < 0 or eval_batches < 1:
        raise PPCLError(f"trained probe: steps must be >= 0 and eval_batches >= 1 (got {steps}, {eval_batches})")
    if output_guidance < 1 or not 0 <= uncond_ratio < 1:
        raise PPCLError(f"trained probe: output_guidance must be >= 1 and uncond_ratio in [0, 1) "
                        f"(got {output_guidance}, {uncond_ratio})")
    if max_interval is not None and max_interval < 2:
        raise PPCLError(f"trained probe: max_interval must be >= 2 (got {max_interval})")


def _heldout_inputs(pipe: Any, adapter: Any, settings: Any, heldout: list[dict[str, Any]],
                    negative: dict[str, torch.Tensor] | None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The model inputs of the held-out batches, every row on its own caption, with FIXED noise seeded by negative
    step numbers (never a training step's: step_inputs' seeding); with ``negative``, the same batches and noise on
    the negative prompt too (the unconditional side of a guided output error), else None."""
    from ppcl.data.cache import with_uncond

    clean = step_inputs(pipe, adapter, settings.model_copy(update={"uncond_ratio": 0.0}), torch.device("cpu"),
                        torch.float32, 0, 1)
    cond = [clean(b, -1 - j) for j, b in enumerate(heldout)]
    if negative is None:
        return cond, None
    rows = [torch.ones(int(b["latents"].shape[0]), dtype=torch.bool) for b in heldout]
    return cond, [clean(with_uncond(b, r, negative), -1 - j) for j, (b, r) in enumerate(zip(heldout, rows))]


class _PlugClip:
    """Clip each plug's gradient to ``max_norm`` by its OWN norm (module docstring), in a few foreach calls."""

    def __init__(self, units: list[Unit], max_norm: float | None):
        self.max_norm = max_norm
        self.params, owner = [], []
        for k, u in enumerate(units):
            for p in u.module.parameters():
                self.params.append(p)
                owner.append(k)
        self.owner = torch.tensor(owner)
        self.n = len(units)

    def __call__(self) -> None:
        if not self.max_norm:
            return
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in have]
        owner = self.owner[have]
        sq = torch.stack(torch._foreach_norm(grads)).square()
        per_plug = torch.zeros(self.n, dtype=sq.dtype).index_add_(0, owner, sq).sqrt()
        coef = (self.max_norm / (per_plug + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(coef[owner].unbind()))


def _adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW over every plug's ~1000 tensors in one fused kernel where torch has it for the device (on the
    reference teacher's 60 plugs: 22 ms a step against 70 ms for the per-tensor loop), else the foreach form."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)


@torch.no_grad()
def _score(adapter: Any, units: list[Unit], inputs: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per unit and stream: ``(plug loss D, identity loss D)``, each the mean over ``inputs`` (model inputs)."""
    sums: dict[str, dict[str, list[float]]] = {u.name: {} for u in units}
    for model_inputs in inputs:
        calls, outs, _ = teacher_pass(adapter, model_inputs, units)
        for u in units:
            plugged = unit_step_losses(u, calls, outs, LOSS_EPS)
            entering, target = unit_call(u, calls).streams(), unit_target(u, calls, outs)
            for stream, loss in plugged.items():
                skipped = plug_loss(entering[stream], target[stream], LOSS_EPS)
                acc = sums[u.name].setdefault(stream, [0.0, 0.0])
                acc[0] += float(loss) / len(inputs)
                acc[1] += float(skipped) / len(inputs)
    return {name: {s: (v[0], v[1]) for s, v in per.items()} for name, per in sums.items()}


@torch.no_grad()
def _output_errors(adapter: Any, units: list[Unit], cond: list[dict[str, Any]], uncond: list[dict[str, Any]] | None,
                   guidance: float) -> dict[str, float]:
    """Per unit: the relative squared error of the guided output with only that unit in place (module docstring),
    the mean over the held-out batches ``cond`` (and their negative-prompt copies ``uncond`` when ``guidance`` > 1)."""
    def guided(c: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        return c.float() if u is None else guidance * c.float() - (guidance - 1) * u.float()

    sums = {u.name: 0.0 for u in units}
    for j, inputs in enumerate(cond):
        sides = [inputs] + ([uncond[j]] if uncond is not None else [])
        passes = [teacher_pass(adapter, x, units, full=True) for x in sides]
        teacher = guided(passes[0][2], passes[1][2] if len(passes) > 1 else None)
        scale = float(teacher.pow(2).mean())
        for u in units:
            outs = [student_forward(adapter, x, [u], capture=False, teacher_calls=p[0])[0]
                    for x, p in zip(sides, passes)]
            student = guided(outs[0], outs[1] if len(outs) > 1 else None)
            sums[u.name] += float((student - teacher).pow(2).mean()) / max(scale, 1e-12) / len(cond)
    return sums


def trained_interval_scores(
    model: Any,
    data: str | Path | list[dict[str, Any]] | None,
    *,
    candidates: list[tuple[int, int]] | None = None,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-2,
    warmup_steps: int = 20,
    seed: int = 0,
    eval_batches: int = 4,
    max_interval: int | None = None,
    init: str = "middle",
    max_grad_norm: float | None = 1.0,
    uncond_ratio: float = 0.0,
    output_guidance: float = 1.0,
    progress: bool = True,
) -> TrainedScores:
    """Train one plug per candidate interval for ``steps`` steps (all in one teacher pass per step) and score each
    on held-out batches (module docstring).

    Args:
        model: a pipeline directory or a loaded diffusers pipeline (the teacher; never modified).
        data: a latent cache folder, a list of cache-shaped batches, or None for the built-in synthetic set.
        candidates: ``[(s, e), ...]``; None: :func:`default_candidates` with ``max_interval``.
        steps: optimiser steps (0: the untrained copies are scored, ``trained_loss == initial_loss``).
        batch_size: samples per step (a latent cache is collated to it; an in-memory list is used as given).
        lr, warmup_steps, max_grad_norm: AdamW's peak learning rate, linear warm-up, per-plug clipping (None: off).
        eval_batches: held-out batches the scores are the mean over.
        uncond_ratio: share of training samples on the negative prompt (distill's setting of that name).
        output_guidance: the guidance scale ``w`` of ``output_error`` (1: the conditional output; > 1 needs the
            negative prompt's embeddings: a latent cache's, or the built-in synthetic set's).
    Returns: :class:`TrainedScores` (probe.json's ``trained``), one entry per candidate in the given order.
    """
    from ppcl.settings import DistillSettings, validate_settings

    _check_arguments(steps, eval_batches, max_interval, uncond_ratio, output_guidance)
    t0 = time.perf_counter()
    # The stream and noise of a distillation run of these settings (steps and warm-up only shape its schedule,
    # which this loop computes itself: steps may be 0 here).
    settings = validate_settings(DistillSettings, dict(
        steps=max(1, steps), warmup_steps=min(warmup_steps, max(0, steps - 1)), batch_size=batch_size, lr=lr,
        seed=seed, timesteps="logit_normal", mixed_precision="no", use_8bit_adam=False, uncond_ratio=uncond_ratio))
    pipe, adapter = load_teacher(model, "cpu", torch.float32, encoders=data is None)
    freeze(adapter.transformer)
    candidates = default_candidates(adapter, max_interval, init) if candidates is None else list(candidates)
    if not candidates:
        raise PPCLError("trained probe: no candidate interval (the model has no two consecutive blocks of one kind)")
    units = candidate_units(adapter, candidates, init)

    batches, stream = training_stream(pipe, data, settings)
    # the negative prompt: swapped into training rows (uncond_ratio), and the unconditional side of a guided score
    negative = training_uncond(pipe, adapter, data, settings.model_copy(update={"uncond_ratio": 0.5})) \
        if uncond_ratio > 0 or output_guidance > 1 else None
    noised = step_inputs(pipe, adapter, settings, torch.device("cpu"), torch.float32, 0, 1,
                         uncond=negative if uncond_ratio > 0 else None)
    if batches is not None and len(batches) > eval_batches:  # in memory: hold the last ones out of training
        heldout, kind = batches[-eval_batches:], "batches"
        _, stream = training_stream(pipe, batches[:-eval_batches], settings)
    else:  # a cache (or too few batches): fixed batches, unseen noise
        heldout, kind = take(stream, eval_batches), "noise"
        stream.restore({"epoch": 0, "index": 0})
    eval_inputs, eval_uncond = _heldout_inputs(pipe, adapter, settings, heldout,
                                               negative if output_guidance > 1 else None)
    initial = _score(adapter, units, eval_inputs)

    params = [p for u in units for p in u.module.parameters()]
    optimizer = _adamw(params, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, steps))
    clip = _PlugClip(units, max_grad_norm)
    bar = None
    if progress:
        from ppcl.progress import progress as progress_bar

        bar = progress_bar(total=steps, desc="probe trained plugs", unit="step")
    for u in units:
        u.module.train()
    for step in range(steps):
        # Batch -> inputs (distill's noise of this step) -> ONE teacher pass -> each plug's loss and backward
        inputs = noised(next(stream), step)
        optimizer.zero_grad(set_to_none=True)
        calls, outs, _ = teacher_pass(adapter, inputs, units)
        total = torch.zeros(())
        for u in units:
            loss = sum(unit_step_losses(u, calls, outs, LOSS_EPS).values())
            loss.backward()
            total += loss.detach()
        if not torch.isfinite(total):
            raise PPCLError(f"trained probe: loss is not finite at step {step + 1} (lower --lr)")
        clip()
        optimizer.step()
        schedule.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(total) / len(units):.4f}")
    if bar is not None:
        bar.close()
    for u in units:
        u.module.eval()
    trained = _score(adapter, units, eval_inputs)
    output = _output_errors(adapter, units, eval_inputs, eval_uncond, output_guidance)

    intervals = []
    for u in units:
        per = {s: {"trained": trained[u.name][s][0], "initial": initial[u.name][s][0],
                   "identity": trained[u.name][s][1]} for s in trained[u.name]}
        t_loss, i_loss, id_loss = (sum(v[k] for v in per.values()) for k in ("trained", "initial", "identity"))
        intervals.append(TrainedInterval(
            start=u.start, end=u.end, source=u.source, trained_loss=t_loss, initial_loss=i_loss,
            identity_loss=id_loss, trained_quality=t_loss / max(id_loss, IDENTITY_FLOOR), per_stream=per,
            output_error=output[u.name]))
    where = "cache" if batches is None else ("synthetic" if data is None else "in-memory")
    return TrainedProbe(
        steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, timesteps=settings.timesteps,
        max_grad_norm=max_grad_norm, seed=seed, eval_batches=len(eval_inputs), init=init,
        identity_floor=IDENTITY_FLOOR, data=where, heldout=kind, seconds=time.perf_counter() - t0,
        uncond_ratio=uncond_ratio, output_guidance=output_guidance,
        intervals=intervals)
