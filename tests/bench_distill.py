"""Benchmarks of distill and export (slow; ``pytest -m slow tests/bench_distill.py`` or run as a script).

1. Distill step time / teacher no-grad forward time <= 1 + 3.5 K / L (K plugs, L blocks): the non-sequential step
   runs the teacher once (stopping after the last interval end) plus each plug's forward and backward only.
2. Pruned forward latency / teacher forward latency <= 1.1 x the pruned/teacher parameter ratio.

Small config: Qwen-Image-shaped transformer, 20 blocks, width 128 (4 heads x 32), 256 image + 32 text tokens,
batch 2, fp32 on CPU (or the GPU when present; the device is printed).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from ppcl.arch import get_adapter
from ppcl.distill import DistillSettings, build_units, nonsequential_losses, student_layout
from ppcl.export import build_pruned_transformer
from ppcl.plan import make_plan
from ppcl.plugs import freeze
from ppcl.arch.tiny import tiny_transformer

INTERVALS = [[2, 4], [8, 10], [13, 16]]


def _setup(device):
    torch.manual_seed(0)
    t = tiny_transformer("qwenimage", seed=0, num_layers=20, num_attention_heads=4, attention_head_dim=32,
                         axes_dims_rope=(8, 12, 12))
    adapter = get_adapter(freeze(t.to(device)))
    latents = torch.randn(2, 16, 32, 32, device=device)
    text = {"prompt_embeds": torch.randn(2, 32, 32, device=device),
            "prompt_embeds_mask": torch.ones(2, 32, dtype=torch.long, device=device)}
    inputs = adapter.model_inputs(latents, text, torch.full((2,), 0.5, device=device))
    return adapter, inputs


def _time(fn, device, reps=7, warmup=2):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure(device=None) -> dict[str, float]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter, inputs = _setup(device)
    plan = make_plan(adapter, INTERVALS)
    units = build_units(adapter, plan)
    for u in units:
        u.module.to(device)
    params = [p for u in units for p in u.module.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    settings = DistillSettings()

    def teacher():
        with torch.no_grad():
            adapter.forward(inputs)

    def step():
        losses, _ = nonsequential_losses(adapter, inputs, units, settings)
        total = sum(v for per in losses.values() for v in per.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    t_teacher = _time(teacher, device)
    t_step = _time(step, device)
    K, L = len(INTERVALS), adapter.num_blocks
    lists, keep, _ = student_layout(adapter, units)
    pruned = build_pruned_transformer(adapter, units, [], lists, keep).to(device)
    pruned_adapter = get_adapter(pruned)

    def pruned_fwd():
        with torch.no_grad():
            pruned_adapter.forward(inputs)

    t_pruned = _time(pruned_fwd, device)
    ratio_params = sum(p.numel() for p in pruned.parameters()) / adapter.total_parameters()
    return {
        "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "K": K, "L": L,
        "teacher_forward_s": t_teacher, "distill_step_s": t_step,
        "step_over_teacher": t_step / t_teacher, "step_bound": 1 + 3.5 * K / L,
        "pruned_forward_s": t_pruned, "latency_ratio": t_pruned / t_teacher, "param_ratio": ratio_params,
        "latency_bound": 1.1 * ratio_params,
    }


@pytest.mark.slow
def test_distill_and_export_speed():
    torch.set_num_threads(2)
    m = measure()
    print(m)
    assert m["step_over_teacher"] <= m["step_bound"], m
    assert m["latency_ratio"] <= m["latency_bound"], m


if __name__ == "__main__":
    torch.set_num_threads(2)
    for k, v in measure().items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
