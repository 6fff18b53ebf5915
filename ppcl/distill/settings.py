"""Every knob of a distillation run (:class:`DistillSettings`, recorded in ``run.json``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ppcl.errors import PPCLError
from ppcl.plugs import LOSS_EPS

MODES = ("nonsequential", "sequential")


@dataclass
class DistillSettings:
    """Every knob of a distillation run (recorded in run.json)."""

    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float | None = 1.0
    mode: str = "nonsequential"
    #: plug initialisation: ``middle`` | ``first`` | ``last``; None -> the plan's ``init``
    init: str | None = None
    timesteps: str = "uniform"
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    output_loss_weight: float = 0.0
    #: non-sequential only: probability that each depth plug is in place for the output-level term (1: all of
    #: them; < 1: a random subset per step, at least one, so each plug also learns to work without the others)
    output_loss_keep: float = 1.0
    gradient_checkpointing: bool = False
    #: ``auto`` (bf16 on CUDA, none on CPU) | ``no`` | ``bf16``
    mixed_precision: str = "auto"
    loss_eps: float = LOSS_EPS
    #: built-in synthetic data (when no cache is given): samples and image size
    n_samples: int = 16
    resolution: int = 64
    #: batches whose normal equations initialise width projections, and the relative ridge
    lsq_batches: int = 8
    ridge: float = 1e-4
    guidance: float | None = None
    use_8bit_adam: bool = True

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise PPCLError(f"distill needs steps >= 1 and batch_size >= 1 (got {self.steps}, {self.batch_size})")
        if self.mode not in MODES:
            raise PPCLError(f"unknown distill mode '{self.mode}': expected {' or '.join(MODES)}")
        if self.timesteps not in ("uniform", "logit_normal"):
            raise PPCLError(f"unknown timestep sampling '{self.timesteps}': expected uniform or logit_normal")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise PPCLError(f"unknown mixed precision '{self.mixed_precision}': expected auto, no or bf16")
        if self.checkpoint_every < 1:
            raise PPCLError(f"checkpoint_every must be >= 1 (got {self.checkpoint_every})")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise PPCLError(f"learning rate must be positive (got {self.lr})")
        if not 0 < self.output_loss_keep <= 1:
            raise PPCLError(f"output_loss_keep must be in (0, 1] (got {self.output_loss_keep})")
