"""Benchmark (slow): a distill step reading the latent cache vs the same step encoding its batch on the fly.

Run: ``.venv/bin/python -m pytest tests/bench_cache.py -m slow -s``. On the fly, every step would also run the
teacher's text encoders and VAE on the batch; the cache removes exactly that work. Both costs are measured in
one run on the same tiny FLUX pipeline and batch size, and the ratio is printed.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from ppcl.arch import get_adapter, load_pipeline
from ppcl.calibration import DEFAULT_PROMPTS, _procedural_images
from ppcl.data.encode import encode_shards
from ppcl.data.shard import shard_source
from ppcl.data.synth import write_synth
from ppcl.distill import distill
from ppcl.plan import make_plan, save_plan

BATCH = 4
RES = 64
STEPS = 12


@pytest.mark.slow
def test_distill_step_with_cache_vs_encoding_on_the_fly(tiny_pipe_dir, tmp_path):
    torch.set_num_threads(1)
    teacher = tiny_pipe_dir["flux"]
    write_synth(tmp_path / "synth", n=32, size=RES, seed=0)
    shard_source(str(tmp_path / "synth"), str(tmp_path / "shards"), 2, progress=False)
    encode_shards(str(teacher), str(tmp_path / "shards"), str(tmp_path / "cache"), resolution=RES, progress=False)

    pipe = load_pipeline(teacher, device="cpu")
    adapter = get_adapter(pipe)
    plan = make_plan(adapter, [(1, 2), (5, 7)])
    save_plan(plan, tmp_path / "plan.json")

    steps: list[float] = []
    distill(pipe, tmp_path / "plan.json", tmp_path / "run", data=str(tmp_path / "cache"), steps=STEPS,
            batch_size=BATCH, checkpoint_every=10_000, progress=False,
            on_step=lambda step, rec: steps.append(rec["step_time_s"]))  # fmt: skip
    step_s = statistics.median(steps[2:])  # the first steps pay one-time allocation costs

    g = torch.Generator().manual_seed(0)
    encode: list[float] = []
    with torch.inference_mode():
        for i in range(STEPS):
            pixels = _procedural_images(BATCH, RES, g)
            prompts = [DEFAULT_PROMPTS[(i * BATCH + j) % len(DEFAULT_PROMPTS)] for j in range(BATCH)]
            t0 = time.perf_counter()
            adapter.encode_prompts(pipe, prompts)
            adapter.encode_images(pipe, pixels)
            encode.append(time.perf_counter() - t0)
    encode_s = statistics.median(encode[2:])

    ratio = (step_s + encode_s) / step_s
    print(json.dumps({"bench": "distill step, on-the-fly encoding vs cache", "batch": BATCH, "resolution": RES,
                      "step_cached_s": round(step_s, 4), "encode_batch_s": round(encode_s, 4),
                      "on_the_fly_over_cached": round(ratio, 2)}))  # fmt: skip
    assert ratio > 1.0
