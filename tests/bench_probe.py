"""Probe benchmarks (slow; run: ``.venv/bin/python -m pytest tests/bench_probe.py -m slow -s``).

- overhead: probe wall time / plain teacher forward over the same inputs, on a 12-block Qwen-Image-shaped
  transformer of width 256 with 1024 image tokens (+32 text tokens); must be <= 1.5.
- memory: peak RSS of a probe over N and 4N samples (separate subprocesses) within 10%.
- depth: the probe's own peak memory over its forwards (peak RSS after observing minus peak RSS after a plain forward, so the model,
  its inputs and the forward's activations are excluded) on 10 and 40 blocks of a width-128 Qwen-Image-shaped
  model, batch 2 of 4096 image tokens: within 10%. ``max_interval`` 8 so both depths are past the window of states a
  forward keeps (``min(L, max_interval) + 1`` of them); the moment matrices (projected to 16) and HSIC Grams
  (32 tokens; 8 KiB per block, 0.5 MiB at the default 256) are what still grows with depth, and are small here as they are at full scale.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

SETUP = """
import torch
torch.set_num_threads(1)
from ppcl.arch import get_adapter
from ppcl.calibration import noise_batch
from ppcl.arch.tiny import tiny_transformer

def bench_model():
    # 12 blocks, 2 heads x 128 = width 256; rope axes sum to the head dim
    t = tiny_transformer("qwenimage", num_layers=12, attention_head_dim=128, axes_dims_rope=(16, 56, 56))
    return get_adapter(t)

def bench_inputs(adapter, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        batch = {"latents": torch.randn(1, 16, 64, 64, generator=g),  # 32 x 32 = 1024 image tokens
                 "prompt_embeds": torch.randn(1, 32, 32, generator=g),
                 "prompt_embeds_mask": torch.ones(1, 32, dtype=torch.long)}
        yield noise_batch(adapter, {"shift": 3.0}, batch, sigma=torch.tensor([0.2 + 0.6 * (i % 4) / 3]),
                          generator=g).model_inputs
"""


def _run(code: str) -> dict:
    # a fixed mmap threshold: glibc otherwise raises it as large blocks are freed, and freed states then stay in
    # the heap, so peak RSS would measure the allocator's history rather than the live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SETUP) + textwrap.dedent(code)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_probe_overhead_vs_plain_forward():
    res = _run("""
        import json, time
        from ppcl.probe import ProbeAccumulator
        adapter = bench_model()
        inputs = list(bench_inputs(adapter, 8))
        with torch.no_grad():
            adapter.forward(inputs[0])  # warm-up
            t0 = time.perf_counter()
            for x in inputs:
                adapter.forward(x)
            plain = time.perf_counter() - t0
        acc = ProbeAccumulator(adapter, probe_dim="auto")
        acc.observe(inputs[0])  # warm-up (allocates the moments)
        acc = ProbeAccumulator(adapter, probe_dim="auto")
        t0 = time.perf_counter()
        for x in inputs:
            acc.observe(x)
        observe = time.perf_counter() - t0
        t0 = time.perf_counter()
        acc.result(family="qwenimage", model="bench", calibration=dict(
            source="synthetic", samples=8, batch_size=1, timesteps=1, sigmas=[0.5], seed=0))
        solve = time.perf_counter() - t0
        print(json.dumps({"plain": plain, "probe": observe, "solve": solve, "dim": acc.k}))
    """)
    ratio = (res["probe"] + res["solve"]) / res["plain"]  # the whole probe, end-of-run solve included
    print(f"\nprobe overhead: plain {res['plain']:.2f}s, probe {res['probe']:.2f}s over 8 forwards "
          f"+ solve {res['solve']:.2f}s -> ratio {ratio:.2f} (moment width {res['dim']}, exact)")
    assert ratio <= 1.5


@pytest.mark.slow
def test_probe_memory_does_not_grow_with_samples():
    code = """
        import json, resource
        from ppcl.probe import ProbeAccumulator
        adapter = bench_model()
        acc = ProbeAccumulator(adapter, probe_dim="auto")
        for x in bench_inputs(adapter, N):
            acc.observe(x)
        acc.result(family="qwenimage", model="bench", calibration=dict(
            source="synthetic", samples=N, batch_size=1, timesteps=1, sigmas=[0.5], seed=0))
        print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
    n = 4
    small = _run(f"N = {n}\n" + textwrap.dedent(code))["rss_mb"]
    big = _run(f"N = {4 * n}\n" + textwrap.dedent(code))["rss_mb"]
    print(f"\npeak RSS: {small:.0f} MB at N={n}, {big:.0f} MB at N={4 * n} ({big / small - 1:+.1%})")
    assert abs(big / small - 1) <= 0.10


@pytest.mark.slow
def test_probe_memory_flat_in_depth():
    code = """
        import json, resource
        from ppcl.probe import ProbeAccumulator
        t = tiny_transformer("qwenimage", num_layers=L, attention_head_dim=64, axes_dims_rope=(16, 24, 24))
        adapter = get_adapter(t)
        g = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(2, 16, 128, 128, generator=g),  # 2 x 64 x 64 = 8192 image tokens
                 "prompt_embeds": torch.randn(2, 32, 32, generator=g),
                 "prompt_embeds_mask": torch.ones(2, 32, dtype=torch.long)}
        x = noise_batch(adapter, {"shift": 3.0}, batch, sigma=torch.tensor([0.5, 0.5]), generator=g).model_inputs
        with torch.no_grad():
            adapter.forward(x)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        acc = ProbeAccumulator(adapter, probe_dim=16, max_interval=8, hsic_tokens=32)
        for _ in range(2):
            acc.observe(x)
        observed = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        acc.result(family="qwenimage", model="bench", calibration=dict(
            source="synthetic", samples=2, batch_size=1, timesteps=1, sigmas=[0.5], seed=0))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"probe_mb": observed - base, "with_result_mb": peak - base, "base_mb": base}))
    """
    res = {depth: _run(f"L = {depth}\n" + textwrap.dedent(code)) for depth in (10, 40)}
    small, big = res[10]["probe_mb"], res[40]["probe_mb"]
    print(f"\nprobe peak memory over a plain forward: {small:.1f} MB at 10 blocks, {big:.1f} MB at 40 blocks "
          f"({big / small - 1:+.1%}); with the end-of-run solve and the result's O(L^2) matrices "
          f"{res[10]['with_result_mb']:.1f} / {res[40]['with_result_mb']:.1f} MB; plain-forward peak "
          f"{res[10]['base_mb']:.0f} / {res[40]['base_mb']:.0f} MB")
    assert abs(big / small - 1) <= 0.10
