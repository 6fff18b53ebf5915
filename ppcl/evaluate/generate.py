"""Image generation through the stock diffusers pipeline, identical noise for every model.

Each sample is a (prompt, seed) pair. Its initial noise comes from its own ``torch.Generator("cpu")`` seeded with
the sample's seed (diffusers draws each batch element from its own generator when given a list), so a sample's
noise does not depend on the device, on the batch it falls in, or on the model. The pipeline runs ONCE per
batch with ``output_type="latent"``; the family adapter decodes the returned latents, so the latents used for
latent fidelity and the images used for FID/CLIP/image PSNR come from the same denoising run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ppcl.errors import PPCLError


@dataclass(frozen=True)
class Sample:
    """One image to generate: ``index`` in sample order, the prompt (and its index), the seed."""

    index: int
    prompt_index: int
    prompt: str
    seed: int


def make_samples(prompts: list[str], seeds: int, seed_offset: int = 0) -> list[Sample]:
    """Seed-major order: every prompt with the first seed, then every prompt with the next seed, ..."""
    out = []
    for j in range(seeds):
        for i, p in enumerate(prompts):
            out.append(Sample(len(out), i, p, seed_offset + j))
    return out


def batched(samples: list[Sample], batch_size: int) -> Iterator[list[Sample]]:
    for i in range(0, len(samples), batch_size):
        yield samples[i : i + batch_size]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a .jsonl with "prompt" or "caption"."""
    path = Path(path)
    if not path.is_file():
        raise PPCLError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PPCLError(f"unreadable prompts file {path}: {e}") from None
    prompts: list[str] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PPCLError(f"{path}:{n}: not JSON: {e.msg}") from None
            value = row.get("prompt", row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise PPCLError(f"{path}:{n}: needs a non-empty string field 'prompt' or 'caption'")
            prompts.append(value.strip())
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PPCLError(f"prompts file has no prompts: {path}")
    return prompts


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PPCLError(f"unknown device '{device}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PPCLError(f"device '{device}' requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@torch.no_grad()
def generate(pipe, adapter, samples: list[Sample], *, steps: int, height: int, width: int,
             guidance: float | None = None, max_sequence_length: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate one batch of samples. ``guidance`` and ``max_sequence_length`` (None: the pipeline's defaults)
    become family-specific call arguments through ``adapter.pipeline_call_kwargs``.

    Returns:
        latents: what the pipeline returns with ``output_type="latent"`` (family layout, e.g. packed
            (B, N, C) for FLUX), float32 on CPU;
        images: (B, 3, height, width) float32 in [0, 1] on CPU.
    """
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
    call_kw = adapter.pipeline_call_kwargs(guidance, max_sequence_length)
    if isinstance(call_kw.get("negative_prompt"), str):
        # one negative prompt per image: a single string would be encoded as a batch of one
        call_kw["negative_prompt"] = [call_kw["negative_prompt"]] * len(samples)
    out = pipe(
        prompt=[s.prompt for s in samples],
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=generators,
        output_type="latent",
        **call_kw,
    )
    latents = out.images if hasattr(out, "images") else out[0]
    images = adapter.decode_latents(pipe, latents, height, width)
    return latents.float().cpu(), images.float().clamp(0, 1).cpu()
