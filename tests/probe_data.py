"""Synthetic probe results for selector tests: the fields every probe.json has, around designed blocks and
intervals (``ppcl.probe_result.ProbeResult``)."""

from __future__ import annotations

from typing import Any


def synthetic_probe_data(blocks: list[dict[str, Any]], intervals: list[dict[str, Any]],
                         angular: list[list[float]] | None = None) -> dict[str, Any]:
    """A probe.json dict of ``len(blocks)`` 100-parameter Qwen-Image-like blocks (one image stream) with these
    per-block stats and interval scores; ``angular`` defaults to 0.1 everywhere."""
    L = len(blocks)
    return {
        "family": "qwenimage", "model": "synthetic", "total_params": 100 * L + 50,
        "calibration": {"source": "synthetic", "samples": 1, "batch_size": 1, "timesteps": 1, "sigmas": [0.5],
                        "seed": 0, "forwards": 1, "tokens": {"image": 1}},
        "projection": {"exact": True, "dim": 4, "model_dim": 4, "seed": 0},
        "ridge": 1e-4, "max_interval": 12, "blocks": blocks,
        "cka_matrix": {"estimator": "x", "description": "x", "states": "x", "tokens_per_forward": 4,
                       "matrices": {"image": [[1.0] * L for _ in range(L)]}},
        "angular": {"image": angular or [[0.1] * (L + 1) for _ in range(L + 1)]},
        "cosine_matrix": {"image": [[1.0] * (L + 1) for _ in range(L + 1)]},
        "intervals": intervals,
    }


def tiny_flux_batches(n: int, b: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Cache-shaped batches for the tiny FLUX transformer (random latents and text states)."""
    import torch

    from ppcl.arch.tiny import tiny_transformer_config

    cfg = tiny_transformer_config("flux")
    g = torch.Generator().manual_seed(seed)
    return [{"latents": torch.randn(b, 16, 8, 8, generator=g),
             "prompt_embeds": torch.randn(b, 6, cfg["joint_attention_dim"], generator=g),
             "pooled_prompt_embeds": torch.randn(b, cfg["pooled_projection_dim"], generator=g)} for _ in range(n)]
