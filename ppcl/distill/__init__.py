"""Pluggable distillation (method.md sections 2-3): every plug of a plan trained in one teacher pass.

The paper's *teacher-student alternating distillation* is our non-sequential, teacher-forced scheme (the default
``mode``): each plug is fed the teacher's state entering its interval and compared with the teacher's state
leaving it, so any subset of the trained plugs can be exported afterwards.

Where to read what:
- :mod:`ppcl.distill.train`: :func:`distill`, the training loop (prepare -> start -> per step: batch, inputs,
  losses with each plug's backward, clip, step, log, maybe checkpoint -> finish), one code path for 1 to N
  processes; :func:`distill_many`, several runs on the same data in lockstep with one teacher pass per step.
- :mod:`ppcl.distill.sharding`: the processes, and the units' state sharded over all ranks with FSDP2 (one FSDP
  unit per plug, :func:`shard_units`); one process trains unsharded.
- :mod:`ppcl.distill.losses`: the method: what each unit is fed and compared with, loss D, the sequential
  ablation, the optional output-level term.
- :mod:`ppcl.distill.units`: the plan's units (depth plugs, ffn_linear blocks, text_freeze groups) and plan hash.
- :mod:`ppcl.distill.projections`: least-squares init of the width projections (method.md section 3).
- :mod:`ppcl.distill.streams`: resumable batch streams and each step's noised inputs.
- :mod:`ppcl.distill.checkpoint`: sharded checkpoints and the RNG state they carry; :mod:`ppcl.distill.optim`: AdamW
  and the warm-up + cosine schedule; :mod:`ppcl.distill.settings`: :class:`DistillSettings`.
- :mod:`ppcl.distill.heldout`: held-out loss D before / after training.

RUN layout: ``RUN/plugs.safetensors`` (final plug weights, keys ``<unit>.<param>``), ``RUN/run.json`` (versioned:
plan hash, teacher, settings, what ran (optimizer, mixed precision, world size, sharding with each rank's measured
state share), per-unit source block, final losses), ``RUN/metrics.jsonl`` (one line per step),
``RUN/checkpoints/step-XXXXXX/`` (torch.distributed.checkpoint shards of the units and AdamW states, one per rank,
``rng-<rank>.pt``, and ``state.json`` written last as the completion marker: step, plan hash, schedule, data
position); outputs are written atomically.
"""

from ppcl.distill.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from ppcl.distill.heldout import heldout_losses
from ppcl.distill.losses import (
    nonsequential_losses,
    export_placements,
    output_loss_units,
    sequential_losses,
    teacher_pass,
    unit_step_losses,
)
from ppcl.distill.optim import lr_factor, make_optimizer
from ppcl.distill.projections import fit_width_units
from ppcl.distill.settings import MODES, DistillSettings
from ppcl.distill.sharding import shard_units
from ppcl.distill.streams import BatchStream, cache_stream, memory_stream
from ppcl.distill.train import RUN_VERSION, DistillResult, distill, distill_many, load_teacher
from ppcl.distill.units import (
    Unit,
    build_units,
    check_plan_family,
    load_unit_weights,
    plan_dict,
    plan_hash,
    student_layout,
    unit_table,
)

__all__ = [
    "CHECKPOINT_VERSION", "MODES", "RUN_VERSION", "BatchStream", "DistillResult", "DistillSettings", "Unit",
    "build_units", "cache_stream", "check_plan_family", "distill", "fit_width_units", "heldout_losses",
    "load_checkpoint", "load_teacher", "load_unit_weights", "lr_factor", "make_optimizer", "memory_stream",
    "export_placements", "nonsequential_losses", "output_loss_units", "plan_dict", "plan_hash", "save_checkpoint", "sequential_losses",
    "shard_units", "student_layout", "teacher_pass", "unit_step_losses", "unit_table",
]
