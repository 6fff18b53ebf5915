"""Sharded training state of a distillation run: PyTorch FSDP2 (``fully_shard``), one FSDP unit per plug.

What is sharded, over a 1-D :class:`~torch.distributed.device_mesh.DeviceMesh` of every rank (``"cpu"`` mesh with
gloo, ``"cuda"`` with nccl): each unit's trainable state, i.e. its fp32 master weights, their gradients
(reduce-scattered, mean over the ranks) and the AdamW moments (the optimiser is built on the sharded DTensor
parameters, so each rank keeps the moments of its own shard). A rank holds about ``1/world`` of it; the full
parameters of one unit exist only while that unit runs (``reshard_after_forward=True``, also for the units that are
their own FSDP root, where FSDP2 would otherwise keep them gathered until backward).

- One FSDP unit per plan unit (:func:`ppcl.distill.units.build_units`): a depth plug, a width block; a text_freeze
  unit is a list of blocks that are called one by one, so each member block is its own FSDP unit. A unit is
  called on its own captured teacher call (non-sequential mode) and backpropagated at once, which is exactly the
  granularity FSDP gathers and reduce-scatters at.
- Mixed precision (``param_dtype=torch.bfloat16``, CUDA's ``mixed_precision bf16``):
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the gathered weights a unit computes with are
  bf16, gradients are reduced and kept in fp32 next to the fp32 master shard. ``param_dtype=None`` (CPU, fp32):
  no policy, everything fp32.
- The frozen teacher is not sharded: every rank holds it whole (bf16 on CUDA), as it runs under ``no_grad`` and
  feeds every unit.
- No process group, or one process (``world == 1``): nothing is sharded and the units stay plain fp32 modules
  (:func:`training_mesh` returns None). FSDP2 over one rank would compute the same numbers through extra copies and
  needs a process group that a plain ``ppcl distill`` (or a test calling :func:`ppcl.distill.distill`) does not
  have; the plain path keeps today's one-process runs bit-identical to earlier versions, and the checkpoint format
  (torch.distributed.checkpoint) is the same on both paths.

:func:`shard_units` is also what the resource planner (:mod:`ppcl.resources`) calls to model the sharded layout:
keep its signature.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ppcl.distill.units import Unit

SHARDING = "fsdp2"  #: run.json's ``sharding.engine`` when the units are sharded


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class Processes:
    """This process's place in the run: its device, rank, the number of processes, and its mixed precision."""

    device: torch.device
    process_index: int
    num_processes: int
    local_process_index: int
    mixed_precision: str  # "bf16" or "no"

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        """The first process of its node: the one that manages node-local folders."""
        return self.local_process_index == 0

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            torch.distributed.barrier()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device when mixed precision is bf16, else nothing."""
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def everyone(flag: bool, device: torch.device) -> bool:
    """``flag`` held on every rank (one tiny all-reduce over the default group); one process: ``flag``."""
    if world()[1] <= 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def init_processes(mixed_precision: str) -> Processes:
    """Join the run's process group when a launcher started several processes (``torchrun`` / ``accelerate
    launch`` set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``): nccl on CUDA (one GPU per local rank),
    gloo on the CPU; a group that already exists is used as it is. One process: no group at all."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    if size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, size = world()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Processes(device, rank, size, local, mixed_precision)


def training_mesh(device: torch.device) -> Any:
    """The 1-D device mesh of every rank the units are sharded over, or None for a single process (no sharding)."""
    _, size = world()
    if size <= 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, (size,))


def fsdp_modules(units: list[Unit]) -> list[nn.Module]:
    """The modules that become FSDP units: each unit's module, each member block of a text_freeze unit."""
    return [m for u in units for m in (list(u.module) if u.members else [u.module])]


def shard_units(units: list[Unit], table: nn.ModuleDict, mesh: Any, param_dtype: torch.dtype | None) -> nn.ModuleDict:
    """Shard every unit's fp32 state over ``mesh`` with FSDP2, in place (``table`` holds the same modules and is
    returned for convenience).

    Args:
        units: the plan's units (fp32 master weights, on the CPU or already on the mesh's device: ``fully_shard``
            moves each rank's shard to the mesh's device).
        table: :func:`ppcl.distill.units.unit_table` of ``units`` (the checkpointed module).
        mesh: a 1-D DeviceMesh over all ranks (:func:`training_mesh`).
        param_dtype: the dtype a unit computes in (``torch.bfloat16``: gathered weights in bf16, gradients
            reduced in fp32), or None for no mixed precision (fp32 throughout).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for module in fsdp_modules(units):
        fully_shard(module, mesh=mesh, reshard_after_forward=True, **kwargs)
    return table


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank stores of ``t`` (its shard for a DTensor)."""
    to_local = getattr(t, "to_local", None)
    return (to_local() if to_local is not None else t).numel()


def state_share(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds of the trainable state, MEASURED from the tensors it stores: elements of its parameter
    shards, of its optimiser states (AdamW's two moments; the 0-d step counters are left out) and the global
    parameter count. The gradients have the parameters' layout."""
    opt = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                opt += local_numel(v)
    return {"param_numel": sum(local_numel(p) for p in params), "optimizer_numel": opt,
            "trainable_params": sum(p.numel() for p in params)}


def sharding_record(engine: str | None, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                    units: list[Unit], param_dtype: torch.dtype | None) -> dict[str, Any]:
    """run.json's ``sharding`` block (a collective when sharded: every rank must call it): the engine, the number of
    FSDP units, and per rank the measured local state (:func:`state_share`) and its ``share`` of the state all ranks
    hold together (1/world when sharded evenly; 1.0 for one process)."""
    rank, size = world()
    mine = state_share(params, optimizer)
    per_rank = [mine]
    if size > 1:
        per_rank = [None] * size
        torch.distributed.all_gather_object(per_rank, mine)
    whole = sum(r["param_numel"] + r["optimizer_numel"] for r in per_rank)
    for r in per_rank:  # of the state all ranks hold together (a tensor that never had a gradient has no moments)
        r["share"] = (r["param_numel"] + r["optimizer_numel"]) / max(1, whole)
    return {"engine": engine or "none", "world_size": size, "fsdp_units": len(fsdp_modules(units)) if engine else 0,
            "param_dtype": str(param_dtype or torch.float32).replace("torch.", ""), "per_rank": per_rank}
