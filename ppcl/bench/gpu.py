"""``ppcl bench gpu``: the one GPU check (issue 15 item 6; scale.md, "What a GPU session must bring back").

Real-width blocks of the two flagship teachers, built from their committed configs (``assets/configs``) with the
layer counts cut down and random weights, so nothing is downloaded: 6 Qwen-Image blocks (two plugs, [1, 2] and
[3, 4]) and 4 dual + 4 single FLUX.1-dev blocks (one plug in each kind, [1, 2] and [5, 6]), batch 1 at
1024 x 1024 (4096 image + 512 text tokens). Per model it measures:

- **memory**: the peak of one distill run (the teacher's load, fp32 then cast to bf16; then the set-up and the
  first training steps, the optimiser states in place) read from ``torch.cuda.max_memory_allocated``, against the
  prediction of the planner (:func:`ppcl.resources.distill_memory` on meta tensors, same model, plan, settings),
  per phase (issue 15's target: within 10 %);
- **distill step / teacher forward**: CUDA-event medians of the training step (losses, backward, clip, AdamW
  step; the loop of ``ppcl.distill.train``) and of one no-grad teacher forward (target: <= 1 + 3.5 K / L, K plugs,
  L blocks);
- **probe overhead**: a forward through :class:`ppcl.probe.ProbeAccumulator` (hooks, streamed moments) over a
  plain forward;
- **pruned speedup vs the FLOP limit**: the depth-pruned student the export writes for the plan (the teacher's
  class with the kept blocks, ``adapter.pruned_config``) against the teacher, forward time ratio next to the
  FLOP ratio, FLOPs counted by ``torch.utils.flop_counter`` on meta tensors (the same count whatever the device;
  CPU's fused attention kernel has no FLOP formula).

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (device name, torch / CUDA versions, settings). With
``--device cpu --small`` (tiny widths, 64 px, 8 text tokens, fp32) the same code runs end to end in seconds; its
peaks come from torch's profiler (the CPU allocator's running total), as CPU has no ``max_memory_allocated``.
Decisions: AdamW in fp32 (``use_8bit_adam`` false: bitsandbytes is optional and the planner models it apart),
no gradient checkpointing (the distill defaults); warm-up repeats before every timing; medians, not means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ppcl.errors import PPCLError

#: The committed diffusers configs of the real teachers (also read by the tests, through tests/data/configs).
CONFIGS = Path(__file__).parent / "assets" / "configs"
GIB = 2**30


@dataclass(frozen=True)
class Case:
    """One model of the check: the config folder, its reduced layer counts, the plan's intervals (0-based,
    inclusive, each replaced by one plug)."""

    config: str
    layers: dict[str, int]
    intervals: tuple[tuple[int, int], ...]


CASES = (
    Case("qwen-image", {"num_layers": 6}, ((1, 2), (3, 4))),
    Case("flux1-dev", {"num_layers": 4, "num_single_layers": 4}, ((1, 2), (5, 6))),
)
#: ``--small``: the real structure at tiny width (2 heads of 16, rope axes summing to the head dim); only the keys
#: a config has are replaced.
SMALL_WIDTH = {"num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6],
               "joint_attention_dim": 32, "pooled_projection_dim": 16}


@dataclass
class GpuCheckSettings:
    device: str = "cuda"
    #: tiny widths and sequences (the CPU smoke run)
    small: bool = False
    batch_size: int = 1
    resolution: int = 1024
    text_tokens: int = 512
    #: untimed runs before every timing (kernel selection, allocator warm-up; >= 2 so the peak covers a step
    #: that starts with the optimiser states in place)
    warmup: int = 2
    repeats: int = 5
    seed: int = 0

    @classmethod
    def smoke(cls, device: str = "cpu") -> "GpuCheckSettings":
        return cls(device=device, small=True, resolution=64, text_tokens=8, warmup=2, repeats=2)


def case_config(case: Case, small: bool = False) -> dict[str, Any]:
    """The committed config of ``case`` with its reduced layer counts (and, ``small``, tiny widths)."""
    cfg = json.loads((CONFIGS / case.config / "config.json").read_text())
    cfg.update(case.layers)
    if small:
        cfg.update({k: v for k, v in SMALL_WIDTH.items() if k in cfg})
    return cfg


def _build(cfg: dict[str, Any], device: torch.device | str):
    """The transformer of ``cfg``, its parameters created on ``device`` in fp32 (default init: random weights)."""
    import diffusers

    with torch.device(device):
        return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


# ------------------------------------------------------------------------------------------ measuring
class Peak:
    """Peak bytes of tensors over a region, on top of ``held`` bytes already live when it starts.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (it counts what is live at the
    reset, so ``held`` is not added; what a previous case left behind is subtracted). CPU: the largest "Total
    Allocated" of torch's memory profiler over the region, less its value at the start, plus ``held``."""

    def __init__(self, device: torch.device, held: int = 0):
        self.device, self.held, self.bytes = device, held, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.residual = torch.cuda.memory_allocated(self.device) - self.held
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.residual
            return None
        self.prof.__exit__(*exc)
        if exc[0] is None:
            with tempfile.TemporaryDirectory() as tmp:
                trace = Path(tmp) / "trace.json"
                self.prof.export_chrome_trace(str(trace))
                events = json.loads(trace.read_text())["traceEvents"]
            mem = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
            # the running total is the allocator's, over the whole process: count from where the region began
            start = mem[0]["Total Allocated"] - mem[0]["Bytes"] if mem else 0
            self.bytes = self.held + max((m["Total Allocated"] - start for m in mem), default=0)
        return None


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds after ``warmup`` untimed calls: CUDA events around each call
    (GPU time of the work it queued; the end event is waited for), ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def forward_flops(transformer, inputs: dict[str, Any]) -> int:
    """FLOPs of one no-grad forward of ``transformer`` (meta tensors) counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    from ppcl.arch import get_adapter

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        get_adapter(transformer).forward(inputs)
    return int(counter.get_total_flops())


def _inputs(adapter, knobs, settings, device, dtype, step: int) -> dict[str, Any]:
    """The model inputs of training step ``step``, as the planner draws them (cache-shaped zeros, seeded noise)."""
    from ppcl.calibration import noise_batch
    from ppcl.resources import example_batch

    batch = example_batch(adapter, knobs, device, dtype)
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 7_919)
    return noise_batch(adapter, {}, batch, scheme=settings.timesteps, generator=g,
                       guidance=settings.guidance).model_inputs


def _kept_blocks(adapter, plan) -> dict[str, list[int]]:
    """Local block indices per block list of the depth-pruned student: blocks outside every interval, and each
    interval's plug in its first block's place."""
    dropped = {b for s, e in plan.intervals for b in range(s + 1, e + 1)}
    keep: dict[str, list[int]] = {}
    for i in range(adapter.num_blocks):
        if i not in dropped:
            name, local = adapter.locate(i)
            keep.setdefault(name, []).append(local)
    return keep


# ---------------------------------------------------------------------------------------------- one case
def run_case(case: Case, s: GpuCheckSettings) -> dict[str, Any]:
    """Every measurement of one model (module doc); bytes, milliseconds, FLOPs."""
    from ppcl.arch import get_adapter
    from ppcl.distill import DistillSettings
    from ppcl.plan import make_plan
    from ppcl.plugs import freeze
    from ppcl.resources import DistillKnobs, distill_memory

    device = torch.device(s.device)
    cuda = device.type == "cuda"
    mp = "bf16" if cuda else "no"  # distill's mixed_precision auto
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = case_config(case, s.small)
    knobs = DistillKnobs(batch_size=s.batch_size, resolution=s.resolution, text_tokens=s.text_tokens,
                         mixed_precision=mp)
    # the planner builds its settings from the knobs the same way
    settings = DistillSettings(batch_size=s.batch_size, mixed_precision=mp, use_8bit_adam=False,
                               resolution=s.resolution, seed=s.seed)

    # Planner and FLOPs: meta tensors, no weights
    meta = get_adapter(_build(cfg, "meta"))
    plan = make_plan(meta, [list(iv) for iv in case.intervals])
    est = distill_memory(meta, plan, knobs, round_to=None if cuda else 1)
    keep = _kept_blocks(meta, plan)
    meta_inputs = _inputs(meta, knobs, settings, "meta", torch.float32, 0)
    flops_teacher = forward_flops(meta.transformer, meta_inputs)
    flops_student = forward_flops(_build(meta.pruned_config(keep), "meta"), meta_inputs)
    del meta, meta_inputs

    # Load: the teacher in fp32 on the device, frozen, cast to bf16 (distill's prepare). It is built there rather
    # than moved from the host (a random init of billions of weights is slow on CPU); the peak region starts once
    # the fp32 weights are in place, which is where distill's move leaves them
    torch.manual_seed(s.seed)
    adapter = get_adapter(_build(cfg, device))
    fp32_bytes = _tensor_bytes(adapter.transformer)
    with Peak(device, held=fp32_bytes) as load:
        freeze(adapter.transformer)
        adapter.transformer.to(dtype)
    teacher_bytes = _tensor_bytes(adapter.transformer)
    training, step_ms, optimizer_ran, trainable, inputs = _measure_training(adapter, plan, knobs, settings, s,
                                                                            teacher_bytes)
    forward_ms, probe_ms, student_ms = _measure_inference(adapter, inputs, keep, s)
    blocks, plugs = adapter.num_blocks, len(case.intervals)
    del adapter, inputs
    _release(device)

    predicted = {ph: est.phases[ph]["tensor_peak"] for ph in ("load", "training")}
    measured = {"load": load.bytes, "training": training.bytes}
    return {
        "model": case.config, "class": cfg["_class_name"], "config": {k: cfg[k] for k in (*case.layers, *(
            k for k in SMALL_WIDTH if k in cfg), "num_attention_heads", "attention_head_dim") if k in cfg},
        "blocks": blocks, "plugs": plugs, "intervals": [list(iv) for iv in case.intervals],
        "kept_blocks": keep, "trainable_parameters": trainable, "optimizer": optimizer_ran,
        "teacher_parameters": plan.params.teacher, "student_parameters": plan.params.student,
        "memory": {
            "measured_bytes": measured, "predicted_bytes": predicted,
            # CUDA: bytes live at a region's start besides the teacher (a previous case's leftovers, cuBLAS
            # workspaces), left out of the measured peak
            "residual_bytes": {"load": getattr(load, "residual", 0), "training": getattr(training, "residual", 0)},
            "error": {ph: (predicted[ph] - measured[ph]) / measured[ph] if measured[ph] else None for ph in measured},
            "predicted_breakdown_bytes": est.phases["training"]["breakdown"],
            "planner_peak_bytes_with_constants": est.peak_bytes,
            "target": "|predicted - measured| <= 10 % of measured",
        },
        "time_ms": {"distill_step": step_ms, "teacher_forward": forward_ms, "probe_forward": probe_ms,
                    "student_forward": student_ms},
        "step_over_forward": step_ms / forward_ms,
        "step_over_forward_target": 1 + 3.5 * plugs / blocks,
        "probe_overhead": probe_ms / forward_ms,
        "pruned_speedup": forward_ms / student_ms,
        "flop_limit": flops_teacher / flops_student,
        "flops": {"teacher_forward": flops_teacher, "student_forward": flops_student},
    }


def _measure_training(adapter, plan, knobs, settings, s: GpuCheckSettings, teacher_bytes: int):
    """The peak over distill's set-up and warm-up steps (losses under autocast, backward, clip, AdamW; the second
    step starts with the optimiser states in place), then the median timed step. Returns the :class:`Peak`, the step
    milliseconds, the optimizer's name, the trainable parameter count and the step's inputs (reused by the forward
    timings)."""
    from ppcl.distill import build_units, make_optimizer, nonsequential_losses, unit_table
    from ppcl.distill.losses import total_loss
    from ppcl.distill.optim import make_scheduler, optimizer_name

    device = torch.device(s.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if cuda else contextlib.nullcontext
    with Peak(device, held=teacher_bytes) as training:
        inputs = _inputs(adapter, knobs, settings, device, dtype, 1)
        units = build_units(adapter, plan, settings.init)
        table = unit_table(units).to(device)
        params = [p for p in table.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, settings, device)
        for g in optimizer.param_groups:  # torch picks foreach for CUDA tensors; on CPU too, so the CPU run has
            g["foreach"] = True           # the step temporaries the planner counts for CUDA
        scheduler = make_scheduler(optimizer, settings)
        table.train()

        def step() -> None:
            with autocast():
                losses, out_loss = nonsequential_losses(adapter, inputs, units, settings, step=1)
            total = total_loss(losses, out_loss, settings.output_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()

        for _ in range(s.warmup):
            step()
    step_ms = median_ms(step, device, 0, s.repeats)
    result = training, step_ms, optimizer_name(optimizer), sum(p.numel() for p in params), inputs
    del units, table, params, optimizer, scheduler, step
    _release(device)
    return result


def _measure_inference(adapter, inputs: dict[str, Any], keep: dict[str, list[int]], s: GpuCheckSettings
                       ) -> tuple[float, float, float]:
    """Medians (ms) of a no-grad teacher forward, the same forward through :class:`ppcl.probe.ProbeAccumulator`,
    and the depth-pruned student's forward (kept blocks ``keep``), as the probe and a deployed student run them:
    weights and inputs in the compute dtype, no autocast."""
    from ppcl.arch import get_adapter
    from ppcl.plugs import freeze
    from ppcl.probe import ProbeAccumulator

    device = torch.device(s.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def forward() -> None:
        with torch.no_grad():
            adapter.forward(inputs)

    forward_ms = median_ms(forward, device, s.warmup, s.repeats)
    acc = ProbeAccumulator(adapter)

    def probe() -> None:
        with torch.no_grad():
            acc.observe(inputs)

    probe_ms = median_ms(probe, device, s.warmup, s.repeats)
    del acc
    _release(device)
    student = get_adapter(_build(adapter.pruned_config(keep), device).to(dtype))
    freeze(student.transformer)

    def student_forward() -> None:
        with torch.no_grad():
            student.forward(inputs)

    student_ms = median_ms(student_forward, device, s.warmup, s.repeats)
    del student
    _release(device)
    return forward_ms, probe_ms, student_ms


def _tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _release(device: torch.device) -> None:
    """Free what the last measurement left (so the next peak starts from the teacher alone)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the check
def check_device(device: str) -> torch.device:
    """``device`` as a torch device; one-line error when it is CUDA and this machine has none."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PPCLError(f"--device {device}: expected cuda, cuda:N or cpu") from None
    if dev.type not in ("cuda", "cpu"):
        raise PPCLError(f"--device {device}: expected cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PPCLError(f"--device {device}: no CUDA device here (torch {torch.__version__}, "
                        f"torch.cuda.is_available() is false); on CPU run --device cpu --small")
    return dev


def run_gpu_check(out: str | Path, s: GpuCheckSettings | None = None, *, cases: tuple[Case, ...] = CASES,
                  isolate: bool | None = None) -> dict[str, Any]:
    """Run every case of ``cases``; write ``out/gpu_check.json`` and ``out/gpu_check.md``; return the report.

    ``isolate`` (default: on CUDA) runs each case in a child process of its own: a CUDA fault (an illegal memory
    access is sticky, every later call in that process fails) then costs that case only, the other cases' numbers
    are still written, and the failed case is run once more with ``CUDA_LAUNCH_BLOCKING=1`` so its log names the
    kernel that faulted rather than a later call. A failed case is a report entry with ``error`` (its last line) and
    ``log`` (the tail of its output); ``report["failed"]`` lists them. Never raises for a failed case: the caller
    decides (``ppcl bench gpu`` exits 1 after writing)."""
    import warnings

    import diffusers

    from ppcl.atomic import atomic_path, write_json

    s = s or GpuCheckSettings()
    dev = check_device(s.device)
    if s.warmup < 2 or s.repeats < 1:
        raise PPCLError(f"--warmup must be >= 2 and --repeats >= 1 (got {s.warmup}, {s.repeats})")
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # events record on the current device's stream
    isolate = dev.type == "cuda" if isolate is None else isolate
    t0 = time.perf_counter()
    if isolate:
        results = [run_case_isolated(c, s) for c in cases]
    else:
        diffusers.utils.logging.set_verbosity_error()  # a cast warning per meta module otherwise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = [run_case(c, s) for c in cases]
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} "
                                                                             "threads)",
        "torch": torch.__version__, "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "settings": dataclasses.asdict(s),
        "cases": results,
        "failed": [r["model"] for r in results if "error" in r],
        "isolated": isolate,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", report)
    with atomic_path(out / "gpu_check.md") as tmp:
        tmp.write_text(format_gpu_check(report))
    return report


#: how much of a failed case's output the report keeps
LOG_TAIL = 6000


def run_case_isolated(case: Case, s: GpuCheckSettings, timeout: float = 1800) -> dict[str, Any]:
    """:func:`run_case` in a child process (``python -m ppcl.bench.gpu``); on failure, once more with
    ``CUDA_LAUNCH_BLOCKING=1`` (CUDA only) and the failure recorded (see :func:`run_gpu_check`)."""
    import os
    import subprocess
    import sys

    def attempt(extra_env: dict[str, str]) -> tuple[dict[str, Any] | None, str]:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "case.json"
            cmd = [sys.executable, "-m", "ppcl.bench.gpu", json.dumps(dataclasses.asdict(case)),
                   json.dumps(dataclasses.asdict(s)), str(result)]
            try:
                proc = subprocess.run(cmd, env={**os.environ, **extra_env}, capture_output=True, text=True,
                                      timeout=timeout)
            except subprocess.TimeoutExpired as e:
                return None, f"{_text(e.stdout)}{_text(e.stderr)}\ntimed out after {timeout:.0f} s"
            log = proc.stdout + proc.stderr
            if proc.returncode == 0 and result.exists():
                return json.loads(result.read_text()), log
            return None, log + f"\nexit status {proc.returncode}"

    print(f"gpu check: {case.config} ...", flush=True)
    res, log = attempt({})
    if res is not None:
        return res
    failed = {"model": case.config, "intervals": [list(iv) for iv in case.intervals],
              "error": _last_error(log), "log": log[-LOG_TAIL:]}
    if s.device.startswith("cuda"):
        res, blocking = attempt({"CUDA_LAUNCH_BLOCKING": "1"})
        if res is not None:  # passed when every kernel is waited for: a race, recorded next to the numbers
            return {**res, "failed_first": {k: failed[k] for k in ("error", "log")}}
        failed.update(blocking_error=_last_error(blocking), blocking_log=blocking[-LOG_TAIL:])
    print(f"gpu check: {case.config} FAILED: {failed['error']}", flush=True)
    return failed


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _last_error(log: str) -> str:
    """The exception line of a traceback in ``log`` (its last ``SomethingError: ...`` line, without the
    ``[rank0]:`` prefixes torch.distributed puts on stderr), else its last line."""
    import re

    lines = [re.sub(r"^(\[rank\d+\]:\s*)+", "", l).strip() for l in log.splitlines()]
    lines = [l for l in lines if l]
    for line in reversed(lines):
        m = re.match(r"^([\w.]*(Error|Exception)|timed out)\b", line)
        if m and (":" in line or m.group(1) == "timed out"):
            return line[:500]
    return lines[-1][:500] if lines else "no output"


def _case_main(argv: list[str]) -> int:
    """The child of :func:`run_case_isolated`: ``CASE_JSON SETTINGS_JSON RESULT_PATH``."""
    import warnings

    import diffusers

    case_d, settings_d, result = json.loads(argv[0]), json.loads(argv[1]), Path(argv[2])
    case = Case(case_d["config"], case_d["layers"], tuple(tuple(iv) for iv in case_d["intervals"]))
    s = GpuCheckSettings(**settings_d)
    dev = check_device(s.device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    diffusers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_case(case, s)
    result.write_text(json.dumps(res))
    return 0


def format_gpu_check(report: dict[str, Any]) -> str:
    """The Markdown table of a report: one column per model, one row per measurement."""
    s = report["settings"]
    failed = [c for c in report["cases"] if "error" in c]
    cases = [c for c in report["cases"] if "error" not in c]
    tokens = "small" if s["small"] else f"{s['resolution']} x {s['resolution']}"
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"torch {report['torch']}" + (f", CUDA {report['cuda']}" if report["cuda"] else "")
        + f"; batch {s['batch_size']}, {tokens} ({s['resolution']} px, {s['text_tokens']} text tokens), "
        f"medians of {s['repeats']} after {s['warmup']} warm-up runs; random bf16 weights (fp32 on CPU); "
        f"{report['seconds']:.0f} s in all.",
        "",
        "| | " + " | ".join(f"{c['model']} ({c['blocks']} blocks, {c['plugs']} plugs)" for c in cases) + " |",
        "|---|" + "---|" * len(cases),
    ]

    def row(name: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(c) for c in cases) + " |")

    def gib(n: int) -> str:
        return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"

    for ph in ("training", "load"):
        row(f"{ph} peak, measured", lambda c, ph=ph: gib(c["memory"]["measured_bytes"][ph]))
        row(f"{ph} peak, planner (error)", lambda c, ph=ph: (
            f"{gib(c['memory']['predicted_bytes'][ph])} ({c['memory']['error'][ph]:+.1%})"
            if c["memory"]["error"][ph] is not None else gib(c["memory"]["predicted_bytes"][ph])))
    row("distill step ms", lambda c: f"{c['time_ms']['distill_step']:.1f}")
    row("teacher forward ms", lambda c: f"{c['time_ms']['teacher_forward']:.1f}")
    row("step / forward (target <= 1 + 3.5 K/L)",
        lambda c: f"{c['step_over_forward']:.2f} (<= {c['step_over_forward_target']:.2f}: "
                  f"{'met' if c['step_over_forward'] <= c['step_over_forward_target'] else 'NOT met'})")
    row("probe forward / plain forward", lambda c: f"{c['probe_overhead']:.2f}")
    row("pruned forward speedup (FLOP limit)", lambda c: f"{c['pruned_speedup']:.2f} ({c['flop_limit']:.2f})")
    row("trainable parameters / optimizer", lambda c: f"{c['trainable_parameters']:,} / {c['optimizer']}")
    for c in failed:
        lines += ["", f"**{c['model']} failed** (intervals {c['intervals']}): `{c['error']}`"]
        if "blocking_error" in c:
            lines.append(f"rerun with CUDA_LAUNCH_BLOCKING=1: `{c['blocking_error']}`")
        lines.append("(the tail of its output is in gpu_check.json, `log`)")
    for c in cases:
        if "failed_first" in c:
            lines += ["", f"{c['model']} failed once (`{c['failed_first']['error']}`) and passed with "
                          "CUDA_LAUNCH_BLOCKING=1: its numbers above come from that run"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.exit(_case_main(sys.argv[1:]))
