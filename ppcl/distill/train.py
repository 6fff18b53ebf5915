"""The training loop: every plug of a plan trained against the frozen teacher, one teacher pass per step.

:func:`distill` reads top to bottom through one :class:`Session`: open (settings, plan, the checkpoint to resume,
teacher, units, data; fit width projections or restore the checkpoint; shard the units; optimiser) -> per step
(:meth:`Session.train_step`): batch, inputs, losses with each plug's backward, clip, step, log, maybe checkpoint ->
finish (``plugs.safetensors`` and ``run.json``). :func:`distill_many` drives several sessions in lockstep with one
teacher pass per step for all of them. What the losses are is :mod:`ppcl.distill.losses`.

Choices where method.md is silent (all parameters of :class:`DistillSettings`):
- One code path for 1 to N processes (``torchrun`` / ``accelerate launch``; the process group is joined from the
  launcher's environment, :func:`ppcl.distill.sharding.init_processes`): with N > 1 every unit's trainable state
  (fp32 master weights, gradients, AdamW moments) is sharded over all ranks with FSDP2, one FSDP unit per plug
  (:mod:`ppcl.distill.sharding`); gradients are reduce-scattered by FSDP (mean over ranks), no hand-written
  all-reduce. The frozen teacher is replicated. One process (no process group) trains the same units unsharded:
  the same numbers, no collectives, and the same checkpoint format.
- Each process takes every ``world``-th batch and the noise of its rows of the global batch
  (:func:`ppcl.distill.streams.step_inputs`): N processes with batch B train like one with batch N*B. The losses
  logged (metrics.jsonl, ``on_step``) are the means over the ranks, i.e. the global batch's.
- Per-plug backward (non-sequential mode): each unit's loss is backpropagated as soon as that unit has run on its
  captured teacher call, the output-level term last (:func:`ppcl.distill.losses.nonsequential_losses`); the
  gradients are those of one backward of the total, and only one unit's activations are alive at a time.
  Sequential mode (the ablation) keeps one backward of the total: its units feed each other.
- Mixed precision: bf16 autocast on CUDA, fp32 master weights, the frozen teacher in bf16; sharded units also
  compute with bf16 weights gathered by FSDP (gradients reduced in fp32); none on CPU.
- ``ema_decay`` > 0: a moving average of the weights (elementwise on each rank's shards, warmed up) is kept
  beside them, saved in every checkpoint, and written as ``plugs.safetensors``; training and the logged losses use
  the trained weights, never the average.
- Checkpoints: torch.distributed.checkpoint, every rank writes its shard (:mod:`ppcl.distill.checkpoint`);
  the final ``plugs.safetensors`` is the full fp32 state, gathered and written by rank 0.
- A non-finite loss (on any rank) stops the run with a one-line error naming the last good checkpoint; nothing
  final is written.
"""

from __future__ import annotations

import contextlib
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
from ppcl.distill.checkpoint import PendingCheckpoint, resume_point, restore_training, save_checkpoint, trim_metrics
from ppcl.distill.losses import (
    Losses,
    TeacherStates,
    export_placements,
    nonsequential_losses,
    sequential_losses,
    teacher_pass,
    total_loss,
)
from ppcl.distill.optim import make_optimizer, make_scheduler, optimizer_name, uses_8bit_adam
from ppcl.distill.sharding import (
    SHARDING,
    Processes,
    everyone,
    init_processes,
    shard_units,
    sharding_record,
    training_mesh,
)
from ppcl.distill.projections import fit_width_units
from ppcl.distill.settings import DistillSettings, resolve_settings
from ppcl.distill.streams import BatchStream, step_inputs, take, training_stream, training_uncond
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
        on_checkpoint: ``on_checkpoint(folder)`` on EVERY rank after each checkpoint is complete on disk (its
            marker written by rank 0), before training goes on; with several nodes each node's folder holds only its
            own ranks' shards, so the hook coordinates who copies what (``ppcl.distill_s3`` mirrors it to S3 here).
    Returns: :class:`DistillResult` (``final_losses``: mean over the last 10 steps, per ``unit/stream``).
    """
    settings = resolve_settings(settings, overrides)
    session = Session(model, plan, out, data, settings, resume=resume, stop_after=stop_after, on_step=on_step,
                      on_checkpoint=on_checkpoint, progress=progress)
    with session:
        for step in range(session.start, session.end):
            t0 = time.perf_counter()
            session.train_step(step, session.inputs(step), t0=t0)
    return session.finish()


def distill_many(
    model: Any,
    runs: list[tuple[Any, str | Path, DistillSettings]],
    *,
    data: str | Path | list[dict[str, Any]] | None = None,
    progress: bool = True,
) -> list[DistillResult]:
    """Several distillations of one teacher on the same data, in lockstep with ONE teacher pass per step for all.

    Each run is ``(plan, out, settings)`` and writes exactly what :func:`distill` writes for it alone (bit for bit
    on the CPU: ``tests/test_distill.py``): the data order and each step's noise depend only on the seed, batch
    size, timestep sampler and data, so the teacher pass of step k is the same for every run, and here it runs once
    for the union of the runs' units (hooks at every block any of them starts or ends at). The teacher is loaded
    once and shared. What a run costs beyond that pass (its plugs, the output-level term's student, backward,
    AdamW) is unchanged, so N runs cost one teacher pass + N times the rest per step instead of N times both: the
    reference benchmark trains its table's runs this way (docs/benchmark.md).

    The runs are fresh (no resume) and must share the settings a step's inputs depend on and the steps
    (``_LOCKSTEP_FIELDS``: a one-line error before anything is written); the inputs themselves are compared on every
    step too, and a run whose inputs differ stops the group with a one-line error. Each run's ``metrics.jsonl``
    counts the shared teacher pass in its ``step_time_s``. One progress bar for the group."""
    if not runs:
        return []
    for i, (_, out, settings) in enumerate(runs[1:], 2):  # checked before anything is written
        for field in _LOCKSTEP_FIELDS:
            mine, lead = getattr(settings, field), getattr(runs[0][2], field)
            if mine != lead:
                what = "steps" if field == "steps" else "batches and noise"
                raise PPCLError(f"distill_many: run {i} ({out}) has {field} {mine!r}, run 1 {lead!r}: runs in "
                                f"lockstep share one teacher pass per step, so they need the same {what}")
    sessions: list[Session] = []
    with contextlib.ExitStack() as stack:  # a failure anywhere closes every session opened so far
        for i, (plan, out, settings) in enumerate(runs):
            shared = (sessions[0].t.pipe, sessions[0].t.adapter) if sessions else None
            sessions.append(stack.enter_context(Session(model, plan, out, data, settings, teacher=shared,
                                                        progress=progress and i == 0, desc=f"distill x{len(runs)}")))
        first = sessions[0]
        union = [u for s in sessions for u in s.t.units]
        full = any(s.settings.output_loss_weight > 0 for s in sessions)
        for step in range(first.start, first.end):
            t0 = time.perf_counter()
            inputs = [s.inputs(step) for s in sessions]
            for i, (s, x) in enumerate(zip(sessions[1:], inputs[1:]), 2):
                if not _same_inputs(inputs[0], x):
                    raise PPCLError(f"distill_many: run {i} ({s.run}) draws other inputs than run 1 at step "
                                    f"{step + 1}: the runs need the same seed, batch size, timesteps and data")
            with first.t.procs.autocast(), torch.no_grad():
                teacher = teacher_pass(first.t.adapter, inputs[0], union, full=full)
            shared_s = time.perf_counter() - t0
            for s in sessions:
                s.train_step(step, inputs[0], teacher, t0=time.perf_counter() - shared_s)
    return [s.finish() for s in sessions]


#: the settings every run of :func:`distill_many` must share: the steps, and what a step's inputs depend on
#: (:func:`ppcl.distill.streams.training_stream` and :func:`~ppcl.distill.streams.step_inputs`)
_LOCKSTEP_FIELDS = ("steps", "seed", "batch_size", "timesteps", "guidance", "n_samples", "resolution",
                    "mixed_precision", "uncond_ratio")


def _same_inputs(a: Any, b: Any) -> bool:
    """Whether two steps' model inputs are the same (tensors equal in dtype, shape and every value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_inputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_inputs(x, y) for x, y in zip(a, b))
    return a == b


class Session:
    """One run between its start and its outputs: :func:`distill` drives one, :func:`distill_many` several in
    lockstep. Opening validates every input before anything is written, then prepares the teacher (or shares
    ``teacher``: ``(pipe, adapter)`` of another session), units, data and optimiser, restored from the checkpoint
    being resumed (or, fresh, with the width projections fitted by least squares). Inside ``with``:
    :meth:`train_step` per step; then :meth:`finish` writes the outputs."""

    def __init__(self, model: Any, plan: Any, out: str | Path, data: Any, settings: DistillSettings, *,
                 resume: bool = False, stop_after: int | None = None,
                 on_step: Callable[[int, dict[str, Any]], None] | None = None,
                 on_checkpoint: Callable[[Path], None] | None = None, progress: bool = True,
                 teacher: tuple[Any, Adapter] | None = None, desc: str = "distill"):
        self.model, self.data, self.settings = model, data, settings
        self.run = Path(out)
        self._lock = outputs.hold(self.run) if outputs.rank_writes() else None  # a second writer is refused
        self.plan = as_plan(plan)
        self.phash = plan_hash(self.plan)
        last_ckpt, loaded = resume_point(self.run, self.phash, resume)
        self.t = prepare(model, self.plan, data, settings, teacher=teacher)
        self.start = start_or_resume(self.run, self.t, last_ckpt, loaded, settings)
        self.end = settings.steps if stop_after is None else min(settings.steps, int(stop_after))
        self.history: list[dict[str, float]] = []
        self.ckpts = Checkpoints(self.run, self.t, self.phash, settings, on_checkpoint, last_ckpt)
        self.log = StepLog(self.run / "metrics.jsonl", self.t.procs.is_main_process, progress, settings.steps,
                           self.start, on_step, desc)

    def __enter__(self) -> Session:
        self.t.table.train()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.ckpts.close()
        finally:
            self.log.__exit__(exc_type, exc, tb)
            if exc_type is not None and self._lock is not None:
                self._lock.close()

    def inputs(self, step: int) -> dict[str, Any]:
        """The next batch -> this step's model inputs (noise seeded by (seed, step), this rank's rows of the global
        batch)."""
        return self.t.noised(next(self.t.stream), step)

    def train_step(self, step: int, inputs: dict[str, Any], teacher: TeacherStates | None = None, *,
                   t0: float) -> None:
        """One optimiser step (0-based ``step``) on ``inputs``; ``teacher``: the step's teacher pass when already
        run (else run here); ``t0``: when the step began, for ``step_time_s``."""
        t, settings = self.t, self.settings
        # Losses D per unit and stream (+ the weighted output-level term), each plug's backward as it comes
        t.optimizer.zero_grad(set_to_none=True)
        losses, out_loss = step_losses(t, inputs, settings, step, teacher)
        # The mean over the ranks of what was minimised: what is logged and checked
        total, flat, out_value = mean_over_ranks(losses, out_loss, settings.output_loss_weight)
        check_finite(total, step, self.ckpts.last)
        # Clip (the global norm over every rank's gradient shards) and step (the schedule steps with it)
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(t.params, settings.max_grad_norm)
        t.optimizer.step()
        t.scheduler.step()
        update_ema(t, step, settings.ema_decay)
        # Log: one line of metrics.jsonl, the progress bar, on_step (rank 0)
        done = step + 1
        record = step_record(done, total, t.scheduler.get_last_lr()[0], flat, out_value, t0)
        self.history.append(record["losses"])
        self.log.write(done, record)
        # Maybe checkpoint: every checkpoint_every steps and at the last step (every rank writes its shard)
        self.ckpts.after_step(done)

    def finish(self) -> DistillResult:
        """Final losses; a complete run (not stopped early) writes plugs.safetensors, then run.json."""
        try:
            t, settings = self.t, self.settings
            final_losses = mean_of_last(self.history, 10)
            plug_info = plug_records(t.adapter, t.units, final_losses)
            if self.end < settings.steps:
                return DistillResult(self.run, self.end, final_losses, plug_info)
            with ema_weights(t):  # the averaged weights, when the run keeps them, are the plugs
                full_state = gather_full_state(t)  # every rank takes part; rank 0 gets the whole fp32 state
            sharding = sharding_record(SHARDING if t.mesh is not None else None, t.params, t.optimizer, t.units,
                                       t.param_dtype)
            if t.procs.is_main_process:
                write_run(self.run, self.model, self.plan, self.phash, self.data, settings, t, plug_info,
                          final_losses, full_state, sharding)
            t.procs.wait_for_everyone()
            return DistillResult(self.run, settings.steps, final_losses, plug_info)
        finally:
            if self._lock is not None:
                self._lock.close()


# ------------------------------------------------------------------------------------------------ set-up
@dataclass
class Training:
    """What the loop works with: the frozen teacher, the units and their trainable parameters, the data, the
    optimiser and schedule, on this process's device (the optimiser and schedule are made by
    :func:`start_or_resume`, after the units are fitted and sharded)."""

    #: this process's rank, device, mixed precision (:class:`ppcl.distill.sharding.Processes`)
    procs: Processes
    pipe: Any
    adapter: Adapter
    units: list[Unit]
    table: nn.ModuleDict
    #: the in-memory batches (synthetic set or a list given as data); None for a latent cache
    batches: list[dict[str, Any]] | None
    stream: BatchStream
    #: ``noised(batch, step)`` -> the model inputs of that step (:func:`ppcl.distill.streams.step_inputs`)
    noised: Callable[[dict[str, Any], int], dict[str, Any]]
    #: the resolved mixed precision ("bf16" or "no")
    mixed_precision: str
    #: the device mesh the units are sharded over; None for one process (nothing sharded)
    mesh: Any = None
    #: the dtype sharded units compute in (FSDP2's param_dtype; None: fp32)
    param_dtype: torch.dtype | None = None
    #: a gloo group for asynchronous checkpoint writes (several ranks), else None (synchronous)
    async_group: Any = None
    #: ``ema_decay`` > 0: the moving average of every trainable tensor, by its name in ``table`` (shards when
    #: sharded, like the parameters), saved in checkpoints and written as the final plugs
    ema: dict[str, torch.Tensor] | None = None
    #: ``output_loss_ratios``: the students the output-level term takes turns with (computed once)
    placements: list[list[Unit]] | None = None
    params: list[nn.Parameter] | None = None
    optimizer: Any = None
    scheduler: Any = None


def load_teacher(model: Any, device: Any = None, dtype: torch.dtype = torch.float32, *,
                 encoders: bool = True) -> tuple[Any, Adapter]:
    """The teacher pipeline and its family adapter, the transformer on ``device`` in ``dtype``.

    A folder is read by :func:`ppcl.arch.load_pipeline`'s lean path: the transformer goes from safetensors to
    ``device`` in ``dtype`` tensor by tensor, never as a float32 copy on the host or the device. ``encoders``
    False (the data is a latent cache, which holds the latents and text embeddings): only the transformer and
    the scheduler (its config sets the timestep shift) are loaded; text encoders, tokenizers and VAE are never
    read. True (the built-in synthetic set is computed from the pipeline's own encoders): every component, on
    ``device`` in ``dtype``. A loaded pipeline given as ``model`` has its transformer moved and cast in place.
    """
    from ppcl.arch import get_adapter, load_pipeline

    if isinstance(model, (str, Path)):
        pipe = load_pipeline(model, device=None if device is None else str(device), dtype=dtype,
                             components=None if encoders else ("transformer", "scheduler"))
    else:
        pipe = model
        pipe.transformer.to(device)
        if dtype != torch.float32:
            pipe.transformer.to(dtype)
    return pipe, get_adapter(pipe)


def prepare(model: Any, plan_obj: Any, data: Any, settings: DistillSettings,
            teacher: tuple[Any, Adapter] | None = None) -> Training:
    """The processes (group, device, mixed precision), the frozen teacher on the device (``teacher``: the
    ``(pipe, adapter)`` already loaded by another run of :func:`distill_many`), the plan's units (fp32 master
    weights, not yet sharded), the batch stream; nothing is written."""
    mp = settings.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    procs = init_processes(mp)
    device = procs.device
    # 8-bit asked for where it cannot run (CUDA without bitsandbytes, or sharded): refused before the teacher loads
    uses_8bit_adam(settings, device, procs.num_processes)

    teacher_dtype = torch.bfloat16 if mp == "bf16" else torch.float32
    pipe, adapter = teacher if teacher is not None else load_teacher(model, device, teacher_dtype,
                                                                     encoders=data is None)
    check_plan_family(plan_obj, adapter, "distill")
    freeze(adapter.transformer)

    units = build_units(adapter, plan_obj, settings.init)
    if not units:
        raise PPCLError("the plan has no intervals and no width ops: nothing to distill")
    table = unit_table(units).to(device)
    batches, stream = training_stream(pipe, data, settings)
    noised = step_inputs(pipe, adapter, settings, device, teacher_dtype, procs.process_index,
                         procs.num_processes, uncond=training_uncond(pipe, adapter, data, settings))
    # the exported subsets the output-level term trains in turn: an unreachable ratio is refused before any step
    placements = export_placements(adapter, units, settings.output_loss_ratios,
                                   getattr(plan_obj, "serves", None)) \
        if settings.output_loss_ratios and settings.output_loss_weight > 0 else None
    mesh = training_mesh(device)
    t = Training(procs, pipe, adapter, units, table, batches, stream, noised, mp, mesh, placements=placements)
    if mesh is not None:
        t.param_dtype = torch.bfloat16 if mp == "bf16" else None
        # Checkpoints are written in the background (dcp.async_save) whenever the state is sharded, on CUDA and on
        # the CPU alike (so the 2-process CPU test runs the path the GPU runs); the writer's collectives get their
        # own gloo group, never interleaved with the training's collectives.
        t.async_group = torch.distributed.new_group(backend="gloo")
    return t


def start_or_resume(
    run: Path, t: Training, ckpt: Path | None, loaded: dict[str, Any] | None, settings: DistillSettings
) -> int:
    """On a fresh run fit the width projections (rank 0's fit is every rank's); shard the units and make the
    optimiser and schedule; restore the checkpoint ``loaded`` (and cut metrics.jsonl back to it); then create the
    RUN folder (rank 0). Returns the first step to train."""
    start_step = 0
    if loaded is None:
        # Least-squares init of width projections (fresh runs only: a resumed run has them in its checkpoint).
        fit_projections(t, settings)
        if t.mesh is not None:  # each rank fitted on its own batches: FSDP shards rank 0's copy, so all must hold it
            for tensor in t.table.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
    if t.mesh is not None:
        shard_units(t.units, t.table, t.mesh, t.param_dtype)
    t.params = [p for p in t.table.parameters() if p.requires_grad]
    t.optimizer = make_optimizer(t.params, settings, t.procs.device)
    t.scheduler = make_scheduler(t.optimizer, settings)
    if settings.ema_decay > 0:
        t.ema = {n: p.detach().clone() for n, p in t.table.named_parameters() if p.requires_grad}
    if loaded is not None:
        start_step = restore_training(ckpt, loaded, t.table, t.optimizer, t.scheduler, t.stream, t.ema)
        if t.procs.is_main_process:
            trim_metrics(run / "metrics.jsonl", start_step)
    if t.procs.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoints").mkdir(exist_ok=True)
    t.procs.wait_for_everyone()
    return start_step


def fit_projections(t: Training, settings: DistillSettings) -> None:
    """Fit every width projection (:func:`ppcl.distill.projections.fit_width_units`) on the first
    ``lsq_batches`` batches, noised with negative step numbers (never a training step's noise); a latent cache's
    stream is rewound to its start afterwards."""
    if any(u.kind in ("width", "text_freeze") for u in t.units):
        fit_batches = t.batches if t.batches is not None else take(t.stream, settings.lsq_batches)
        fit_width_units(t.adapter, t.units, list(fit_batches)[: settings.lsq_batches],
                        lambda b, j: t.noised(b, -1 - j), settings.ridge, t.procs.autocast)
        if t.batches is None:
            t.stream.restore({"epoch": 0, "index": 0})


# ------------------------------------------------------------------------------------------------ one step
def check_finite(total: torch.Tensor, step: int, last_ckpt: Path | None) -> None:
    """Stop on a non-finite loss, naming the checkpoint a resumed run would start from."""
    if not torch.isfinite(total).item():
        where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was written"
        raise PPCLError(f"loss is not finite at step {step + 1}: training stopped{where}")


def step_losses(t: Training, inputs: dict[str, Any], settings: DistillSettings, step: int,
                teacher: TeacherStates | None = None) -> tuple[Losses, torch.Tensor | None]:
    """One step's losses with their gradients accumulated: non-sequential mode backpropagates each unit's loss
    as soon as it exists (then the output-level term); sequential mode one backward of the total. ``teacher``:
    the step's teacher pass when already run (:func:`distill_many`)."""
    device_type = t.procs.device.type

    def backward(loss: torch.Tensor) -> None:
        with torch.autocast(device_type, enabled=False):  # backward runs in the forward's dtypes, not autocast's
            loss.backward()

    with t.procs.autocast():
        if settings.mode == "sequential":
            losses, out_loss = sequential_losses(t.adapter, inputs, t.units, settings, step=step, teacher=teacher)
        else:
            losses, out_loss = nonsequential_losses(t.adapter, inputs, t.units, settings, step=step,
                                                    backward=backward, placements=t.placements, teacher=teacher)
    if settings.mode == "sequential":
        backward(total_loss(losses, out_loss, settings.output_loss_weight))
    return losses, out_loss


def mean_over_ranks(losses: Losses, out_loss: torch.Tensor | None, weight: float
                    ) -> tuple[torch.Tensor, dict[str, float], float | None]:
    """``(total, per unit/stream, output term)`` averaged over the ranks (one small all-reduce; the global batch's
    losses, since every rank's batch has the same size); one process: its own. ``total`` is a 0-d tensor."""
    keys = [(n, s) for n, per in losses.items() for s in per]
    values = [losses[n][s].detach().float() for n, s in keys]
    if out_loss is not None:
        values.append(out_loss.detach().float())
    vec = torch.stack(values) if values else torch.zeros(0)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        vec = vec.clone()
        torch.distributed.all_reduce(vec)
        vec /= torch.distributed.get_world_size()
    flat = {f"{n}/{s}": float(v) for (n, s), v in zip(keys, vec[: len(keys)])}
    out_value = float(vec[-1]) if out_loss is not None else None
    d_terms = vec[: len(keys)]
    total = d_terms.sum() if len(keys) else torch.zeros(())
    if out_value is not None:
        total = total + weight * vec[-1]
    return total, flat, out_value


def step_record(done: int, total: torch.Tensor, lr: float, flat: dict[str, float], out_value: float | None,
                t0: float) -> dict[str, Any]:
    """One line of metrics.jsonl: ``step`` (1-based), ``loss`` (the total), ``lr``, ``losses`` per
    ``unit/stream``, ``step_time_s``, and ``output_loss`` when that term is on."""
    record = {"step": done, "loss": float(total), "lr": lr, "losses": dict(flat),
              "step_time_s": time.perf_counter() - t0}
    if out_value is not None:
        record["output_loss"] = out_value
    return record


class StepLog:
    """Rank 0's per-step outputs: a line appended to metrics.jsonl, the progress bar, the ``on_step`` hook."""

    def __init__(self, path: Path, main: bool, progress: bool, total: int, initial: int,
                 on_step: Callable[[int, dict[str, Any]], None] | None, desc: str = "distill"):
        self.main, self.on_step, self.bar = main, on_step, None
        if progress and main:
            from ppcl.progress import progress as progress_bar

            self.bar = progress_bar(total=total, initial=initial, desc=desc, unit="step")
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


class Checkpoints:
    """When the loop writes checkpoints (:func:`ppcl.distill.checkpoint.save_checkpoint`) and completes them: a
    synchronous save at once; a background one (several ranks) at the first step after which every rank's write has
    finished, at the latest before the next save or at the end. ``last``: the newest complete checkpoint."""

    def __init__(self, run: Path, t: Training, phash: str, settings: DistillSettings,
                 on_checkpoint: Callable[[Path], None] | None, last: Path | None):
        self.run, self.t, self.phash, self.settings, self.on_checkpoint, self.last = (
            run, t, phash, settings, on_checkpoint, last)
        self.pending: PendingCheckpoint | None = None

    def after_step(self, done: int) -> None:
        t, settings = self.t, self.settings
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            self.close()
            self.pending = save_checkpoint(self.run, done, t.table, t.optimizer, t.scheduler, t.stream.state(),
                                           self.phash, settings.keep_checkpoints,
                                           local_main=t.procs.is_local_main_process,
                                           on_checkpoint=self.on_checkpoint, async_group=t.async_group,
                                           ema=t.ema)
            if t.async_group is None:
                self.close()
        elif self.pending is not None and everyone(self.pending.future.done(), t.procs.device):
            self.close()

    def close(self) -> None:
        """Complete the pending checkpoint, if any (waits for its background write)."""
        if self.pending is not None:
            self.last, self.pending = self.pending.finish(), None


def update_ema(t: Training, step: int, decay: float) -> None:
    """``ema <- d * ema + (1 - d) * weights`` after the optimiser step of ``step`` (0-based), with the usual
    warm-up ``d = min(decay, (1 + step) / (10 + step))`` so the first steps' weights do not dominate. Elementwise on
    each rank's shards: no communication."""
    if t.ema is None:
        return
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():  # t.ema holds the trainable tensors in t.params' order (both from the table, in order)
        torch._foreach_lerp_(list(t.ema.values()), [p.detach() for p in t.params], 1.0 - d)


@contextlib.contextmanager
def ema_weights(t: Training):
    """Inside, the units hold the moving average (``t.ema``) instead of the trained weights; nothing without it."""
    if t.ema is None:
        yield
        return
    named = dict(t.table.named_parameters())
    with torch.no_grad():
        saved = {n: named[n].detach().clone() for n in t.ema}
        for n, e in t.ema.items():
            named[n].copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                named[n].copy_(w)


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


def gather_full_state(t: Training) -> dict[str, torch.Tensor]:
    """The units' whole fp32 state on the CPU, keys ``<unit>.<param>``: gathered from every rank's shards (every
    rank must call it; rank 0 gets the tensors, the others an empty dict), or this process's own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(t.table, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a copy: on one CPU process the state dict holds the parameters' own storage, which ema_weights puts back
    return {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in sd.items()}


def write_run(run: Path, model: Any, plan_obj: Any, phash: str, data: Any, settings: DistillSettings, t: Training,
              plug_info: list[dict[str, Any]], final_losses: dict[str, float], full_state: dict[str, torch.Tensor],
              sharding: dict[str, Any]) -> None:
    """``RUN/plugs.safetensors`` (``full_state``: fp32, keys ``<unit>.<param>``), then ``RUN/run.json``, each
    atomically (rank 0)."""
    from safetensors.torch import save_file

    adapter = t.adapter
    with atomic_path(run / "plugs.safetensors") as tmp:
        save_file(full_state, str(tmp))
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
        "mixed_precision": t.mixed_precision,
        "data": str(data) if isinstance(data, (str, Path)) else ("synthetic" if data is None else "in-memory"),
        "steps": settings.steps,
        "world_size": t.procs.num_processes,
        # engine ("fsdp2" per unit, or "none" on one process) and each rank's MEASURED share of the trainable state
        "sharding": sharding,
        "plugs": plug_info,
        "final_losses": final_losses,
    })
