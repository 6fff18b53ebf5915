"""The reference benchmark's distillation step, before and after issue 19's speed work (slow; run as a script or
``pytest -m slow -s tests/bench_step.py``).

Measured in ONE run on one machine (the numbers are only comparable within a run):

1. one step of the benchmark's recipe (plan [[3,5],[6,14]] of the shipped reference teacher, batch 16, output-level
   loss weight 1, AdamW, one torch thread) as before (the output term's student run from block 0: ``student_forward``
   without ``teacher_calls``; AdamW looping over tensors, torch's CPU default) and as now (the student starts at
   the first plug; foreach AdamW), alternating blocks of steps;
2. training throughput on the machine's cores: one run on every thread vs one single-threaded run per core side by
   side (what ``ppcl bench quality`` now does), as total steps per second;
3. several runs of the table in one process (one thread): one after another vs in lockstep with one teacher pass per
   step (:func:`ppcl.distill.distill_many`, what ``ppcl bench quality`` now does in each worker), wall seconds of the
   calls (set-up included), alternating;
4. the output-level term's schedules on plan [[3,5],[6,14]] with the 0.7 subset (one thread): ``turns`` vs
   ``every_step``, median step time, alternating blocks of steps.

Usage: ``python tests/bench_step.py [--steps N]`` (prints a Markdown table and JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PLAN = [[3, 5], [6, 14]]


def _cache(work: Path, samples: int = 512) -> Path:
    from ppcl.bench.quality import REFERENCE_TEACHER
    from ppcl.data.encode import encode_shards
    from ppcl.data.shard import shard_source
    from ppcl.data.synth import write_synth

    write_synth(work / "synth", samples, size=32, seed=0)
    shard_source(str(work / "synth"), str(work / "shards"), 2, progress=False)
    encode_shards(str(REFERENCE_TEACHER), str(work / "shards"), str(work / "cache"), resolution=32, batch_size=64,
                  progress=False)
    return work / "cache"


def _plan(work: Path) -> Path:
    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.bench.quality import REFERENCE_TEACHER
    from ppcl.plan import make_plan, save_plan

    save_plan(make_plan(get_adapter(load_pipeline(REFERENCE_TEACHER)), PLAN), work / "plan.json")
    return work / "plan.json"


def step_times(cache: Path, plan: Path, steps: int, rounds: int = 4) -> dict[str, float]:
    """Median step seconds with the student run from block 0 ("before") and from the first plug ("after"), in one
    process, alternating ``rounds`` blocks of ``steps`` steps (first 3 of each block dropped)."""
    import torch

    import ppcl.distill.losses as L
    import ppcl.distill.train as T
    from ppcl.bench.quality import REFERENCE_TEACHER
    from ppcl.distill import distill

    torch.set_num_threads(1)
    real, real_opt = L.student_forward, T.make_optimizer

    def from_block_0(*a, **kw):
        kw.pop("teacher_calls", None)
        return real(*a, **kw)

    def looped_adamw(params, settings, device):  # torch's CPU default: a Python loop over the tensors
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, foreach=False)

    times: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                L.student_forward = from_block_0 if name == "before" else real
                T.make_optimizer = looped_adamw if name == "before" else real_opt
                try:
                    run = Path(d) / f"{name}{r}"
                    distill(str(REFERENCE_TEACHER), str(plan), run, data=str(cache), steps=steps, batch_size=16,
                            lr=1e-2, warmup_steps=2, checkpoint_every=10**9, mixed_precision="no", progress=False,
                            output_loss_weight=1.0)
                finally:
                    L.student_forward, T.make_optimizer = real, real_opt
                lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
                times[name] += [l["step_time_s"] for l in lines[3:]]
    return {k: statistics.median(v) for k, v in times.items()}


_WORKER = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from ppcl.bench.quality import REFERENCE_TEACHER
from ppcl.distill import distill
distill(str(REFERENCE_TEACHER), sys.argv[2], sys.argv[3], data=sys.argv[4], steps=int(sys.argv[5]), batch_size=16,
        lr=1e-2, warmup_steps=2, checkpoint_every=10**9, mixed_precision="no", progress=False, output_loss_weight=1.0)
"""


def throughput(cache: Path, plan: Path, steps: int) -> dict[str, float]:
    """Total training steps per second: one process on every core vs one single-threaded process per core."""
    cores = len(os.sched_getaffinity(0))
    out = {"cores": cores}
    with tempfile.TemporaryDirectory() as d:
        for name, procs, threads in (("one run x all threads", 1, cores), ("runs side by side x 1 thread", cores, 1)):
            t = time.time()
            ps = [subprocess.Popen([sys.executable, "-c", _WORKER, str(threads), str(plan), f"{d}/{name}{i}",
                                    str(cache), str(steps)]) for i in range(procs)]
            assert all(p.wait() == 0 for p in ps)
            loops = []
            for i in range(procs):
                lines = [json.loads(l) for l in Path(f"{d}/{name}{i}/metrics.jsonl").read_text().splitlines()]
                loops.append(sum(l["step_time_s"] for l in lines))
            out[name] = procs * steps / max(loops)  # steps per second of the training loops (set-up excluded)
            out[name + " (wall s)"] = time.time() - t
    return out


#: four plans of the table's runs (ppcl / angular, shortgpt, uniform, random at keep 0.5 on the reference teacher)
GROUP = [[[3, 5], [6, 14]], [[1, 2], [4, 5], [6, 14]], [[1, 5], [6, 9]], [[1, 4], [6, 7], [8, 13]]]


def lockstep(cache: Path, work: Path, steps: int, rounds: int = 2) -> dict[str, float]:
    """Wall seconds of the four GROUP runs (the table's recipe: output-level term in turn with the 0.7 subsets) one
    after another vs in lockstep (:func:`ppcl.distill.distill_many`), one thread, alternating ``rounds`` times;
    the medians, and whether the lockstep plugs are the separate runs' byte for byte."""
    import torch

    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.bench.quality import REFERENCE_TEACHER
    from ppcl.distill import DistillSettings, distill, distill_many
    from ppcl.plan import make_plan, save_plan

    torch.set_num_threads(1)
    adapter = get_adapter(load_pipeline(REFERENCE_TEACHER))
    plans = []
    for i, iv in enumerate(GROUP):
        save_plan(make_plan(adapter, iv), work / f"group{i}.json")
        plans.append(work / f"group{i}.json")
    s = DistillSettings(steps=steps, batch_size=16, lr=1e-2, warmup_steps=2, checkpoint_every=10**9,
                        mixed_precision="no", output_loss_weight=1.0, output_loss_ratios=[0.7])
    times: dict[str, list[float]] = {"one after another": [], "lockstep": []}
    same = True
    for r in range(rounds):
        for name in ("one after another", "lockstep") if r % 2 == 0 else ("lockstep", "one after another"):
            out = work / f"{name}{r}"
            t = time.perf_counter()
            if name == "lockstep":
                distill_many(str(REFERENCE_TEACHER), [(p, out / str(i), s) for i, p in enumerate(plans)],
                             data=str(cache), progress=False)
            else:
                for i, p in enumerate(plans):
                    distill(str(REFERENCE_TEACHER), str(p), out / str(i), data=str(cache), settings=s,
                            progress=False)
            times[name].append(time.perf_counter() - t)
        for i in range(len(plans)):
            same &= (work / f"lockstep{r}" / str(i) / "plugs.safetensors").read_bytes() == \
                (work / f"one after another{r}" / str(i) / "plugs.safetensors").read_bytes()
    return {**{k: statistics.median(v) for k, v in times.items()}, "identical_plugs": same}


def schedules(cache: Path, plan: Path, steps: int, rounds: int = 4) -> dict[str, float]:
    """Median step seconds of ``output_loss_schedule`` turns and every_step (0.7 subset), one thread, alternating
    ``rounds`` blocks of ``steps`` steps (first 3 of each block dropped)."""
    import torch

    from ppcl.bench.quality import REFERENCE_TEACHER
    from ppcl.distill import distill

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"turns": [], "every_step": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            for name in ("turns", "every_step") if r % 2 == 0 else ("every_step", "turns"):
                run = Path(d) / f"{name}{r}"
                distill(str(REFERENCE_TEACHER), str(plan), run, data=str(cache), steps=steps, batch_size=16,
                        lr=1e-2, warmup_steps=2, checkpoint_every=10**9, mixed_precision="no", progress=False,
                        output_loss_weight=1.0, output_loss_ratios=[0.7], output_loss_schedule=name)
                lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
                times[name] += [l["step_time_s"] for l in lines[3:]]
    return {k: statistics.median(v) for k, v in times.items()}


def measure(steps: int = 60) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cache, plan = _cache(work), _plan(work)
        st = step_times(cache, plan, steps)
        tp = throughput(cache, plan, 3 * steps)
        ls = lockstep(cache, work, 2 * steps)
        sc = schedules(cache, plan, steps)
    return {"schedule_step_s": sc, "every_step_cost": sc["every_step"] / sc["turns"], "step_s": st,
            "step_speedup": st["before"] / st["after"], "throughput_steps_per_s": tp,
            "throughput_gain": tp["runs side by side x 1 thread"] / tp["one run x all threads"],
            "lockstep_s": ls, "lockstep_gain": ls["one after another"] / ls["lockstep"]}


@pytest.mark.slow
def test_step_speed():
    r = measure(30)
    print(json.dumps(r, indent=2))
    assert r["step_speedup"] > 1.0
    assert r["lockstep_gain"] > 1.0 and r["lockstep_s"]["identical_plugs"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    r = measure(ap.parse_args().steps)
    st, tp = r["step_s"], r["throughput_steps_per_s"]
    print(f"| step (1 thread, batch 16) | {st['before'] * 1e3:.1f} ms | {st['after'] * 1e3:.1f} ms | "
          f"{r['step_speedup']:.2f}x |")
    print(f"| steps/s on {tp['cores']} cores | {tp['one run x all threads']:.2f} (one run) | "
          f"{tp['runs side by side x 1 thread']:.2f} (side by side) | {r['throughput_gain']:.2f}x |")
    ls = r["lockstep_s"]
    print(f"| {len(GROUP)} runs x {2 * ap.parse_args().steps} steps, 1 thread | {ls['one after another']:.1f} s "
          f"(one after another) | {ls['lockstep']:.1f} s (lockstep) | {r['lockstep_gain']:.2f}x |")
    sc = r["schedule_step_s"]
    print(f"| step, output term in turns vs every step (1 thread) | {sc['turns'] * 1e3:.1f} ms | "
          f"{sc['every_step'] * 1e3:.1f} ms | {r['every_step_cost']:.2f}x the cost |")
    print(json.dumps(r, indent=2))
