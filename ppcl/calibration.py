"""Training/calibration inputs: batches of clean latents + text conditions, noised the flow-matching way.

A *batch* is a dict ``{"latents": (B, C, h, w) float, <text tensors>...}`` — exactly what the latent cache
(``ppcl.data.cache``) yields, so probe and distill take the cache or the built-in synthetic set interchangeably.
Text tensors keep the family's own names (``prompt_embeds``, ``pooled_prompt_embeds``, ``prompt_embeds_mask``);
only the adapter interprets them.

Noising (flow matching, as the teachers were trained): ``x_t = (1 - sigma) x0 + sigma * noise``; the velocity
target is ``noise - x0``. ``sigma`` is drawn uniform or logit-normal (mean 0, std 1, as SD3 training) and then
shifted with the teacher scheduler's flow shift (:func:`ppcl.arch.shift_sigmas`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ppcl.arch import Adapter, shift_sigmas
from ppcl.errors import PPCLError

SIGMA_SCHEMES = ("uniform", "logit_normal")

#: Built-in calibration prompts: varied content so text states are not degenerate.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red circle above a blue square",
    "two green triangles on a white background",
    "a photograph of a mountain lake at sunrise",
    "a cat sitting on a wooden chair",
    "a city street at night with neon signs",
    "a bowl of fruit on a kitchen table",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse",
    "a close-up portrait of an old man with a beard",
    "a yellow star to the left of a purple circle",
    "a sailing boat on a stormy sea",
    "a plate of pasta with basil leaves",
    "a snowy forest with tall pine trees",
    "a vintage car parked in front of a diner",
    "the text 'hello world' written on a blackboard",
    "an orange hexagon below a black square",
)


def text_keys(batch: dict[str, Any]) -> list[str]:
    """The text-condition tensor names of a batch (everything but latents and bookkeeping fields)."""
    return [k for k, v in batch.items() if k != "latents" and isinstance(v, torch.Tensor)]


def sample_sigmas(n: int, scheme: str = "uniform", generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` noise levels in (0, 1) before the scheduler shift: uniform, or logit-normal(0, 1)."""
    if scheme == "uniform":
        return torch.rand(n, generator=generator).clamp(1e-4, 1 - 1e-4)
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise PPCLError(f"unknown timestep sampling '{scheme}': expected one of {', '.join(SIGMA_SCHEMES)}")


@dataclass
class Noised:
    """One noised batch: the transformer's forward kwargs, the velocity target in output layout, and sigma."""

    model_inputs: dict[str, Any]
    target: torch.Tensor
    sigma: torch.Tensor


def noise_batch(
    adapter: Adapter,
    scheduler_config: dict[str, Any],
    batch: dict[str, Any],
    *,
    sigma: torch.Tensor | None = None,
    scheme: str = "uniform",
    generator: torch.Generator | None = None,
    guidance: float | None = None,
    shift: bool = True,
    noise: torch.Tensor | None = None,
) -> Noised:
    """Noise ``batch["latents"]`` at ``sigma`` (drawn with ``scheme`` when None; shifted like the teacher's
    scheduler unless ``shift=False``) and build the transformer inputs; ``noise`` (the latents' shape): use it
    instead of a draw.

    Noise is drawn on the CPU from ``generator`` so results do not depend on the device.
    """
    x0 = batch["latents"]
    b = x0.shape[0]
    if sigma is None:
        sigma = sample_sigmas(b, scheme, generator)
        if shift:
            sigma = shift_sigmas(sigma, scheduler_config, adapter.image_seq_len(x0))
    sigma = sigma.to(device=x0.device, dtype=torch.float32)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device=x0.device, dtype=torch.float32)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    xt = ((1 - s) * x0.float() + s * noise).to(x0.dtype)
    text = {k: batch[k] for k in text_keys(batch)}
    inputs = adapter.model_inputs(xt, text, sigma.to(x0.dtype), guidance=guidance)
    target = adapter.to_output_layout((noise - x0.float()).to(x0.dtype))
    return Noised(inputs, target, sigma)


def _procedural_images(n: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images in [-1, 1], ``(n, 3, R, R)``: low-frequency colour fields plus a few shapes, so the
    VAE sees image-like statistics rather than white noise."""
    r = resolution
    coarse = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 1
    img = torch.nn.functional.interpolate(coarse, size=(r, r), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, r), torch.linspace(0, 1, r), indexing="ij")
    for _ in range(2):
        c = torch.rand(n, 2, generator=generator)
        rad = 0.1 + 0.2 * torch.rand(n, generator=generator)
        col = torch.rand(n, 3, generator=generator) * 2 - 1
        mask = ((xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2) < rad[:, None, None] ** 2
        img = torch.where(mask[:, None], col[:, :, None, None].expand_as(img), img)
    return img.clamp(-1, 1)


@torch.no_grad()
def synthetic_batches(
    pipe: Any,
    *,
    n_samples: int,
    batch_size: int,
    resolution: int = 64,
    prompts: list[str] | None = None,
    seed: int = 0,
    max_sequence_length: int | None = None,
) -> Iterator[dict[str, Any]]:
    """The built-in calibration set: procedural images through the pipeline's own VAE and prompts through its own
    text encoders, yielded as cache-shaped batches. Deterministic for a seed.

    ``max_sequence_length`` None: the pipeline folder's ``ppcl.json`` default
    (:func:`ppcl.arch.generation_defaults`), else the pipeline's own default."""
    if n_samples <= 0 or batch_size <= 0:
        raise PPCLError(f"calibration needs positive n_samples and batch_size (got {n_samples}, {batch_size})")
    from ppcl.arch import get_adapter

    adapter = get_adapter(pipe)
    if max_sequence_length is None:
        from ppcl.arch import generation_defaults

        max_sequence_length = generation_defaults(pipe).get("max_sequence_length")
    prompts = list(prompts or DEFAULT_PROMPTS)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n_samples, batch_size):
        b = min(batch_size, n_samples - start)
        pixels = _procedural_images(b, resolution, g)
        batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(b)]
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        text = adapter.encode_prompts(pipe, batch_prompts, **kw)
        latents = adapter.encode_images(pipe, pixels)
        yield {"latents": latents.float(), **{k: v for k, v in text.items()}}


def num_batches(n_samples: int, batch_size: int) -> int:
    return math.ceil(n_samples / batch_size)
