"""The optimiser and learning-rate schedule of a distillation run (method.md section 2's released settings).

AdamW (bitsandbytes 8-bit on CUDA when importable), linear warm-up then cosine to zero; gradient clipping at
``max_grad_norm`` happens in the training loop.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ppcl.distill.settings import DistillSettings


def make_optimizer(params: list[nn.Parameter], settings: DistillSettings, device: torch.device):
    """AdamW; bitsandbytes' 8-bit AdamW on CUDA when installed and ``use_8bit_adam``."""
    if settings.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb  # type: ignore

            return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


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
