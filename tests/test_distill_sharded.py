"""Sharded distillation on 2 CPU processes (gloo, FSDP2): the loss curve of one process, a stop and resume, and each
rank holding half of the trainable state, measured from the tensors it stores.

What is compared: 2 processes x batch 2 against 1 process x batch 4 made of the same two halves. Both ranks get
the same batch A (data ``[A, A]``); the one process gets ``A ++ A``. Each step's noise is drawn for the global
batch and each rank takes its rows (``ppcl.distill.streams.step_inputs``), and loss D is a mean over tokens, so
the two runs minimise the same objective on the same noised inputs: their curves differ only by float rounding
(FSDP's reduce-scatter mean against one backward over 4 samples).

Run as a script under ``torch.distributed.run`` this file is the worker (``main``): a run stopped after step 3 and
resumed from its step-2 checkpoint; it must end where the uninterrupted one-process run ends (float rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 4
#: the output-level term (a second backward through every FSDP unit), activation checkpointing through FSDP units,
#: a clipping norm small enough to clip every step (the global norm over both ranks' DTensor gradient shards),
#: and the moving average of the weights (kept on each rank's shards, checkpointed, gathered as the plugs)
KW = dict(steps=STEPS, checkpoint_every=2, keep_checkpoints=2, lr=2e-3, warmup_steps=1, output_loss_weight=0.5,
          gradient_checkpointing=True, max_grad_norm=0.01, progress=False, timesteps="uniform", ema_decay=0.5)


def main(pipe_dir: str, plan: str, data: str, out: str) -> None:
    """The worker: every rank runs the same two calls (the process group comes from ``torch.distributed.run``)."""
    from ppcl.distill import distill

    torch.set_num_threads(1)
    batches = torch.load(data, weights_only=True)
    distill(pipe_dir, plan, Path(out) / "cut", data=batches, stop_after=3, **KW)
    distill(pipe_dir, plan, Path(out) / "cut", data=batches, resume=True, **KW)


def _curve(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_resume_and_hold_half_the_state(tiny_pipe_dir, tmp_path):
    from safetensors.torch import load_file

    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.calibration import synthetic_batches
    from ppcl.distill import distill
    from ppcl.plan import make_plan, save_plan

    torch.set_num_threads(1)
    pipe_dir = tiny_pipe_dir["flux"]
    pipe = load_pipeline(pipe_dir)
    # intervals only: a width unit's least-squares init is fitted on each process's own rows (rank 0's fit is
    # broadcast), which would differ from the one process's fit on all four rows
    save_plan(make_plan(get_adapter(pipe), [[1, 2], [5, 8]], allow_ends=True), tmp_path / "plan.json")
    a = next(iter(synthetic_batches(pipe, n_samples=2, batch_size=2, seed=3)))
    torch.save([a, dict(a)], tmp_path / "halves.pt")
    both = {k: torch.cat([v, v]) for k, v in a.items()}

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(pipe_dir), str(tmp_path / "plan.json"), str(tmp_path / "halves.pt"), str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one = tmp_path / "one"
    distill(str(pipe_dir), tmp_path / "plan.json", one, data=[both], **KW)
    two = tmp_path / "two" / "cut"

    # The same loss curve (steps 1-2 before the stop, 3-4 after the resume): every step's total and every unit/stream
    # term (means over the ranks) within float rounding (measured: 4e-7 relative at most)
    c1, c2 = _curve(one), _curve(two)
    assert [r["step"] for r in c2] == list(range(1, STEPS + 1))
    assert c2[-1]["loss"] < c2[0]["loss"]  # it trains
    for r1, r2 in zip(c1, c2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4), (r1, r2)
        assert r2["output_loss"] == pytest.approx(r1["output_loss"], rel=1e-4)
        assert r2["losses"].keys() == r1["losses"].keys()
        for k, v in r1["losses"].items():
            assert r2["losses"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), (k, r1, r2)
    # ... and the same plugs after the resume from each rank's shard of the step-2 checkpoint (weights and AdamW
    # moments): the final file is the full fp32 state, gathered from both ranks (measured: 1.6e-6 at most)
    p1, p2 = load_file(str(one / "plugs.safetensors")), load_file(str(two / "plugs.safetensors"))
    assert p1.keys() == p2.keys() and all(p2[k].dtype == torch.float32 for k in p2)
    assert max(float((p1[k] - p2[k]).abs().max()) for k in p1) < 2e-5
    ckpt = two / "checkpoints" / f"step-{STEPS:06d}"
    assert {"__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt", "state.json"} <= {p.name for p in ckpt.iterdir()}

    # What ran, and each rank's share of the trainable state (parameter shards + AdamW moments), as measured
    meta = json.loads((two / "run.json").read_text())
    sh = meta["sharding"]
    assert meta["world_size"] == 2 and meta["optimizer"] == "AdamW" and meta["mixed_precision"] == "no"
    assert sh["engine"] == "fsdp2" and sh["world_size"] == 2 and sh["fsdp_units"] == 2
    ranks = sh["per_rank"]
    total = ranks[0]["trainable_params"]
    assert sum(r["param_numel"] for r in ranks) == total and sum(r["optimizer_numel"] for r in ranks) == 2 * total
    assert all(0.4 < r["share"] < 0.6 for r in ranks), ranks
    single = json.loads((one / "run.json").read_text())["sharding"]
    assert single["engine"] == "none" and single["per_rank"][0]["share"] == 1.0


def test_8bit_adam_is_refused_when_sharded():
    """bitsandbytes' AdamW8bit cannot step FSDP2's DTensor shards: with several CUDA processes ``use_8bit_adam`` is a
    one-line error (``distill`` checks it before loading the teacher); on the CPU 8-bit never applies, so nothing is
    refused there."""
    from ppcl.distill import DistillSettings
    from ppcl.distill.optim import uses_8bit_adam
    from ppcl.errors import PPCLError

    on = DistillSettings(use_8bit_adam=True)
    with pytest.raises(PPCLError, match="use_8bit_adam is true with 2 processes: .*--no-use-8bit-adam") as e:
        uses_8bit_adam(on, "cuda", 2)
    assert "\n" not in str(e.value)
    assert uses_8bit_adam(on, "cpu", 2) is False and uses_8bit_adam(DistillSettings(use_8bit_adam=False), "cuda", 2) \
        is False


if __name__ == "__main__":
    main(*sys.argv[1:5])
