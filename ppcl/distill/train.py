"""The training loop: every plug of a plan trained against the frozen teacher, one teacher pass per step.

:func:`distill` reads top to bottom: prepare (settings, plan, the checkpoint to resume, teacher, units, data,
optimiser) -> per step: batch, inputs, losses, backward, gradient sync, clip, step, log, maybe checkpoint -> finish
(``plugs.safetensors`` and ``run.json``). What the losses are is :mod:`ppcl.distill.losses`.

Choices where method.md is silent (all parameters of :class:`DistillSettings`):
- Multi-GPU (``accelerate launch``): each process takes every ``world``-th batch; plug gradients are all-reduced
  (mean) explicitly after backward (plugs are called one by one, so a DDP wrapper around them would never see a
  forward); only rank 0 writes.
- Mixed precision: bf16 autocast on CUDA (fp32 master weights, the frozen teacher in bf16), none on CPU.
- A non-finite loss stops the run with a one-line error naming the last good checkpoint; nothing final is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppcl import outputs
from ppcl.arch.common import Adapter
from ppcl.atomic import atomic_path, write_json
from ppcl.distill.checkpoint import resume_point, restore_training, save_checkpoint, trim_metrics
from ppcl.distill.losses import Losses, nonsequential_losses, sequential_losses, total_loss
from ppcl.distill.optim import make_optimizer, make_scheduler, optimizer_name, uses_8bit_adam
from ppcl.distill.projections import fit_width_units
from ppcl.distill.settings import DistillSettings, resolve_settings
from ppcl.distill.streams import BatchStream, step_inputs, take, training_stream
from ppcl.distill.units import Unit, build_units, check_plan_family, plan_dict, plan_hash, unit_table
from ppcl.errors import PPCLError
from ppcl.integrity import teacher_fingerprint
from ppcl.plan import as_plan
from ppcl.plugs import freeze
from ppcl.storage import sha256_file

RUN_VERSION = 1


@dataclass
class DistillResult:
    run_dir: Path
    steps: int
    final_losses: dict[str, float]
    plugs: list[dict[str, Any]]


def distill(
    model: Any,
    plan: Any,
    out: str | Path,
    *,
    data: str | Path | list[dict[str, Any]] | None = None,
    settings: DistillSettings | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> DistillResult:
    """Train every plug of ``plan`` against the frozen teacher ``model``; write the RUN folder ``out``.

    Args:
        model: a pipeline directory (or a loaded diffusers pipeline).
        plan: plan.json path, a ``ppcl.plan.Plan`` or its dict.
        out: the RUN folder (see :mod:`ppcl.distill`).
        data: a latent cache folder, a list of cache-shaped batches, or None for the built-in synthetic set.
        settings: :class:`DistillSettings`; ``overrides`` set single fields (``steps=10, lr=1e-3``).
        resume: continue from the newest checkpoint in ``out`` (bit-exact on CPU); error if the plan differs.
        stop_after: stop as if killed after this many steps in total: no final outputs and no extra checkpoint
            (a resumed run restarts from the last regular checkpoint and replays the steps after it).
        on_step: ``on_step(step, metrics)`` after every step on rank 0 (MLflow logging hooks in here).
        on_checkpoint: ``on_checkpoint(folder)`` on rank 0 after each checkpoint is complete on disk, before the
            other ranks go on (``ppcl.distill_s3`` mirrors it to S3 here).
    Returns: :class:`DistillResult` (``final_losses``: mean over the last 10 steps, per ``unit/stream``).
    """
    # Prepare: every input validated before anything is written, then the teacher, units, data and optimiser,
    # restored from the checkpoint being resumed (or, fresh, the width projections fitted by least squares).
    settings = resolve_settings(settings, overrides)
    run = Path(out)
    run_lock = outputs.hold(run) if outputs.rank_writes() else None  # noqa: F841 - a second writer is refused
    plan_obj = as_plan(plan)
    phash = plan_hash(plan_obj)
    last_ckpt, loaded = resume_point(run, phash, resume)
    t = prepare(model, plan_obj, data, settings)
    start_step = start_or_resume(run, t, last_ckpt, loaded, settings)
    end_step = settings.steps if stop_after is None else min(settings.steps, int(stop_after))
    loss_fn = sequential_losses if settings.mode == "sequential" else nonsequential_losses
    accelerator = t.accelerator
    history: list[dict[str, float]] = []
    with StepLog(run / "metrics.jsonl", accelerator.is_main_process, progress, settings.steps, start_step,
                 on_step) as log:
        t.table.train()
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            # Batch -> this step's model inputs (noise seeded by (seed, step, rank): a resumed run draws the same)
            inputs = t.noised(next(t.stream), step)
            # Losses: D per unit and stream, plus the weighted output-level term (ppcl.distill.losses)
            with accelerator.autocast():
                losses, out_loss = loss_fn(t.adapter, inputs, t.units, settings, step=step)
            total = total_loss(losses, out_loss, settings.output_loss_weight)
            check_finite(total, step, last_ckpt)
            # Backward, then the mean plug gradient over the ranks
            t.optimizer.zero_grad(set_to_none=True)
            total.backward()
            average_gradients(t.params, accelerator.num_processes)
            # Clip and step (the schedule steps with the optimiser)
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(t.params, settings.max_grad_norm)
            t.optimizer.step()
            t.scheduler.step()
            # Log: one line of metrics.jsonl, the progress bar, on_step (rank 0)
            done = step + 1
            record = step_record(done, total, t.scheduler.get_last_lr()[0], losses, out_loss, t0)
            history.append(record["losses"])
            log.write(done, record)
            # Maybe checkpoint: every checkpoint_every steps and at the last step (rank 0 writes, every rank waits)
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                last_ckpt = write_checkpoint(run, done, t, phash, settings.keep_checkpoints, on_checkpoint, last_ckpt)

    # Finish: final losses; a complete run (not stopped early) writes plugs.safetensors, then run.json
    final_losses = mean_of_last(history, 10)
    plug_info = plug_records(t.adapter, t.units, final_losses)
    if end_step < settings.steps:
        return DistillResult(run, end_step, final_losses, plug_info)
    if accelerator.is_main_process:
        write_run(run, model, plan_obj, phash, data, settings, t, plug_info, final_losses)
    return DistillResult(run, settings.steps, final_losses, plug_info)


# ------------------------------------------------------------------------------------------------ set-up
@dataclass
class Training:
    """What the loop works with: the frozen teacher, the units and their trainable parameters, the data, the
    optimiser and schedule, on this process's device."""

    accelerator: Any
    pipe: Any
    adapter: Adapter
    units: list[Unit]
    table: nn.ModuleDict
    params: list[nn.Parameter]
    #: the in-memory batches (synthetic set or a list given as data); None for a latent cache
    batches: list[dict[str, Any]] | None
    stream: BatchStream
    #: ``noised(batch, step)`` -> the model inputs of that step (:func:`ppcl.distill.streams.step_inputs`)
    noised: Callable[[dict[str, Any], int], dict[str, Any]]
    optimizer: Any
    scheduler: Any


def load_teacher(model: Any) -> tuple[Any, Adapter]:
    """The teacher pipeline (loaded from a folder, or as given) and its family adapter."""
    from ppcl.arch import get_adapter, load_pipeline

    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    return pipe, get_adapter(pipe)


def prepare(model: Any, plan_obj: Any, data: Any, settings: DistillSettings) -> Training:
    """The accelerator (process group, mixed precision), the frozen teacher on the device, the plan's units
    (fp32 master weights), the batch stream and the optimiser; nothing is written."""
    from accelerate import Accelerator

    mp = settings.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mp)
    device = accelerator.device
    uses_8bit_adam(settings, device)  # 8-bit asked for on CUDA without bitsandbytes: refused before the teacher loads

    pipe, adapter = load_teacher(model)
    check_plan_family(plan_obj, adapter, "distill")
    freeze(adapter.transformer)
    teacher_dtype = torch.bfloat16 if mp == "bf16" else torch.float32
    adapter.transformer.to(device)
    if teacher_dtype != torch.float32:
        adapter.transformer.to(teacher_dtype)

    units = build_units(adapter, plan_obj, settings.init)
    if not units:
        raise PPCLError("the plan has no intervals and no width ops: nothing to distill")
    table = unit_table(units).to(device)
    params = [p for p in table.parameters() if p.requires_grad]
    batches, stream = training_stream(pipe, data, settings)
    noised = step_inputs(pipe, adapter, settings, device, teacher_dtype, accelerator.process_index)
    optimizer = make_optimizer(params, settings, device)
    scheduler = make_scheduler(optimizer, settings)
    return Training(accelerator, pipe, adapter, units, table, params, batches, stream, noised, optimizer, scheduler)


def start_or_resume(
    run: Path, t: Training, ckpt: Path | None, loaded: dict[str, Any] | None, settings: DistillSettings
) -> int:
    """Restore the checkpoint ``loaded`` (and cut metrics.jsonl back to it), or on a fresh run fit the width
    projections; then create the RUN folder (rank 0). Returns the first step to train."""
    start_step = 0
    if loaded is not None:
        start_step = restore_training(ckpt, loaded, t.table, t.optimizer, t.scheduler, t.stream,
                                      t.accelerator.device)
        if t.accelerator.is_main_process:
            trim_metrics(run / "metrics.jsonl", start_step)
    else:
        # Least-squares init of width projections (fresh runs only: a resumed run has them in its checkpoint).
        fit_projections(t, settings)
    if t.accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoints").mkdir(exist_ok=True)
    return start_step


def fit_projections(t: Training, settings: DistillSettings) -> None:
    """Fit every width projection (:func:`ppcl.distill.projections.fit_width_units`) on the first
    ``lsq_batches`` batches, noised with negative step numbers (never a training step's noise); a latent cache's
    stream is rewound to its start afterwards."""
    if any(u.kind in ("width", "text_freeze") for u in t.units):
        fit_batches = t.batches if t.batches is not None else take(t.stream, settings.lsq_batches)
        fit_width_units(t.adapter, t.units, list(fit_batches)[: settings.lsq_batches],
                        lambda b, j: t.noised(b, -1 - j), settings.ridge, t.accelerator.autocast)
        if t.batches is None:
            t.stream.restore({"epoch": 0, "index": 0})


# ------------------------------------------------------------------------------------------------ one step
def check_finite(total: torch.Tensor, step: int, last_ckpt: Path | None) -> None:
    """Stop on a non-finite loss, naming the checkpoint a resumed run would start from."""
    if not torch.isfinite(total).item():
        where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was written"
        raise PPCLError(f"loss is not finite at step {step + 1}: training stopped{where}")


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Every plug gradient replaced by its mean over the ``world`` ranks (a plug no rank used gets zeros)."""
    if world > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def step_record(
    done: int, total: torch.Tensor, lr: float, losses: Losses, out_loss: torch.Tensor | None, t0: float
) -> dict[str, Any]:
    """One line of metrics.jsonl: ``step`` (1-based), ``loss`` (the total), ``lr``, ``losses`` per
    ``unit/stream``, ``step_time_s``, and ``output_loss`` when that term is on."""
    flat = {f"{n}/{s}": float(v.detach()) for n, per in losses.items() for s, v in per.items()}
    record = {"step": done, "loss": float(total.detach()), "lr": lr, "losses": flat,
              "step_time_s": time.perf_counter() - t0}
    if out_loss is not None:
        record["output_loss"] = float(out_loss.detach())
    return record


class StepLog:
    """Rank 0's per-step outputs: a line appended to metrics.jsonl, the progress bar, the ``on_step`` hook."""

    def __init__(self, path: Path, main: bool, progress: bool, total: int, initial: int,
                 on_step: Callable[[int, dict[str, Any]], None] | None):
        self.main, self.on_step, self.bar = main, on_step, None
        if progress and main:
            from ppcl.progress import progress as progress_bar

            self.bar = progress_bar(total=total, initial=initial, desc="distill", unit="step")
        self.file = open(path, "a") if main else None

    def write(self, done: int, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if self.on_step is not None:
            self.on_step(done, record)

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()


def write_checkpoint(run: Path, done: int, t: Training, phash: str, keep: int,
                     on_checkpoint: Callable[[Path], None] | None, last: Path | None) -> Path | None:
    """Rank 0 writes ``RUN/checkpoints/step-<done>`` and calls ``on_checkpoint``; every rank then waits for it.
    Returns the newest checkpoint this rank knows of."""
    if t.accelerator.is_main_process:
        last = save_checkpoint(run, done, t.table, t.optimizer, t.scheduler, t.stream.state(), phash, keep)
        if on_checkpoint is not None:
            on_checkpoint(last)
    t.accelerator.wait_for_everyone()
    return last


# ------------------------------------------------------------------------------------------------ write-out
def mean_of_last(history: list[dict[str, float]], n: int) -> dict[str, float]:
    """Per ``unit/stream``: the mean loss over the last ``n`` steps of ``history``."""
    final_losses: dict[str, float] = {}
    tail = history[-n:]
    for key in (tail[0] if tail else {}):
        final_losses[key] = sum(h[key] for h in tail) / len(tail)
    return final_losses


def plug_records(adapter: Adapter, units: list[Unit], final_losses: dict[str, float]) -> list[dict[str, Any]]:
    """run.json's ``plugs``: per unit its name, kind, blocks, source, ops, parameter count and final losses."""
    return [
        {"name": u.name, "kind": u.kind, "interval": u.interval, "block": u.start if u.kind == "width" else None,
         "members": u.members or None,
         "source": u.source, "list_name": adapter.locate(u.source)[0], "ops": u.ops,
         "params": sum(p.numel() for p in u.module.parameters()),
         "final_loss": {k.split("/", 1)[1]: v for k, v in final_losses.items() if k.split("/", 1)[0] == u.name}}
        for u in units
    ]


def write_run(run: Path, model: Any, plan_obj: Any, phash: str, data: Any, settings: DistillSettings, t: Training,
              plug_info: list[dict[str, Any]], final_losses: dict[str, float]) -> None:
    """``RUN/plugs.safetensors`` (fp32, keys ``<unit>.<param>``), then ``RUN/run.json``, each atomically."""
    from safetensors.torch import save_file

    adapter = t.adapter
    with atomic_path(run / "plugs.safetensors") as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in t.table.state_dict().items()}, str(tmp))
    write_json(run / "run.json", {
        "version": RUN_VERSION,
        "plan_hash": phash,
        "plan": plan_dict(plan_obj),
        "teacher": {"model": str(model) if isinstance(model, (str, Path)) else None, "family": adapter.family,
                    "num_blocks": adapter.num_blocks, "parameters": adapter.total_parameters(),
                    "fingerprint": teacher_fingerprint(model)},  # export refuses plugs of another teacher
        "plugs_sha256": sha256_file(run / "plugs.safetensors"),
        "settings": settings.model_dump(mode="json"),
        # what ran, which use_8bit_adam alone does not say (8-bit exists on CUDA only: ppcl.distill.optim)
        "optimizer": optimizer_name(t.optimizer),
        "data": str(data) if isinstance(data, (str, Path)) else ("synthetic" if data is None else "in-memory"),
        "steps": settings.steps,
        "world_size": t.accelerator.num_processes,
        "plugs": plug_info,
        "final_losses": final_losses,
    })
