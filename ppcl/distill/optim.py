"""The optimiser and learning-rate schedule of a distillation run (method.md section 2's released settings).

AdamW, linear warm-up then cosine to zero; gradient clipping at ``max_grad_norm`` happens in the training loop.

8-bit AdamW (``use_8bit_adam``) is bitsandbytes' ``AdamW8bit``, a CUDA kernel: asked for on CUDA it runs or the
run stops (bitsandbytes missing is a one-line error naming the fix, never a silent fp32 fallback: the memory the
resource planner promised would not hold). On any other device 8-bit is not available and plain AdamW runs, so the
CPU demo and tests work with the default settings; run.json's ``optimizer`` (:func:`optimizer_name`) records what
actually ran either way. Several processes shard the plugs' state with FSDP2 (:mod:`ppcl.distill.sharding`); the
AdamW moments are then sharded too (each rank keeps those of its own shard), and 8-bit AdamW, which cannot step
DTensor shards, is refused there with one line rather than replaced.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ppcl.distill.settings import DistillSettings
from ppcl.errors import PPCLError


def uses_8bit_adam(settings: DistillSettings, device: torch.device | str, world: int = 1) -> bool:
    """Whether a run of ``settings`` on ``device`` with ``world`` processes gets bitsandbytes' 8-bit AdamW:
    ``use_8bit_adam`` on CUDA. Raises :class:`PPCLError` there when bitsandbytes cannot be imported, and when the
    run is sharded (``world > 1``: AdamW8bit steps plain tensors, not FSDP2's DTensor shards); both are checked
    before the teacher loads, so they cost seconds, not a 40 GB load."""
    if not settings.use_8bit_adam or torch.device(device).type != "cuda":
        return False
    if world > 1:
        raise PPCLError(f"use_8bit_adam is true with {world} processes: bitsandbytes' AdamW8bit cannot step the "
                        "sharded (FSDP2 DTensor) plug parameters; set use_8bit_adam false (--no-use-8bit-adam) for "
                        "sharded fp32 AdamW, or run one process")
    try:
        import bitsandbytes  # type: ignore  # noqa: F401
    except ImportError as e:
        raise PPCLError(f"use_8bit_adam is true on CUDA but bitsandbytes is not importable ({e}): install "
                        "ppcl[cuda] (pip install 'ppcl[cuda]'), or set use_8bit_adam false "
                        "(--no-use-8bit-adam) for fp32 AdamW") from None
    return True


def make_optimizer(params: list[nn.Parameter], settings: DistillSettings, device: torch.device):
    """bitsandbytes' ``AdamW8bit`` when :func:`uses_8bit_adam`, else ``torch.optim.AdamW`` (fp32 states)."""
    if uses_8bit_adam(settings, device):
        import bitsandbytes as bnb  # type: ignore

        return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    # foreach: one multi-tensor kernel per update term instead of a Python loop over every tensor (torch's default
    # on CUDA, not on the CPU); it steps FSDP2's DTensor shards too
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """What ran, for run.json: ``"AdamW"`` or ``"AdamW8bit (bitsandbytes 0.45.0)"``."""
    name = type(optimizer).__name__
    module = type(optimizer).__module__.split(".")[0]
    if module == "torch":
        return name
    import importlib

    version = getattr(importlib.import_module(module), "__version__", "unknown version")
    return f"{name} ({module} {version})"


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, settings: DistillSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_factor`, stepped once per training step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.warmup_steps, settings.steps)
    )
