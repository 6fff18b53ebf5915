"""Cost: transformer parameters, latency per denoising step, peak memory.

Latency is measured on the transformer alone, at the generation resolution, with the exact inputs the stock
pipeline feeds it: :func:`capture_transformer_call` records the first transformer call of a real one-image
generation (and counts calls per step, 2 for families whose pipeline runs CFG as two calls), then
:func:`measure_latency` replays it: ``warmup`` untimed forwards, ``repeats`` timed ones, device synchronised,
median reported with min and max. Timing the transformer (not the whole pipeline) isolates what pruning
changes; text encoding and VAE decoding are identical for every model.

Speedup is a PAIRED measurement (:func:`measure_paired`): teacher and model replay the same captured call
alternately in one process (ABAB...), and the speedup is the median of the per-pair ratios, with their
interquartile spread. Timing the two in different processes or at different times (as two pipeline branches
would) lets the machine's load change between them: a busy 2-core machine once made one teacher look 10x
slower in one branch than in the other. Pairs see the same load, so their ratio survives it; when even the
pairs disagree (spread above :data:`SPREAD_LIMIT`) the speedup is flagged unreliable rather than reported bare.
On CUDA each forward is timed with CUDA events (device time, no host-side launch jitter); on CPU with
``time.perf_counter`` around synchronised calls.

Peak memory (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated`` after resetting the peak; on CPU
the process's peak RSS (``VmHWM``), reset before loading the model through ``/proc/self/clear_refs`` (Linux),
after a garbage collection and ``malloc_trim`` so memory freed by the previous model is returned to the OS.
The baseline just before loading is recorded too, so ``peak - baseline`` is what this model added.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ppcl.evaluate.metrics import Latency, Memory, Speedup

#: a paired speedup whose interquartile range exceeds this fraction of its median is flagged unreliable: the middle
#: half of the pairs then disagree by more than 20%, more than the difference between neighbouring ratios of a demo
SPREAD_LIMIT = 0.2


# ---------------------------------------------------------------- capture + latency
@dataclass
class CapturedCall:
    """The first transformer call of a generation (tensors cloned) and how many calls the generation made."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    calls: int = 0


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def capture_transformer_call(transformer: nn.Module) -> Iterator[CapturedCall]:
    """Record the first call's arguments and count all calls of ``transformer`` inside the block."""
    captured = CapturedCall()

    def hook(module, args, kwargs):
        if captured.calls == 0:
            captured.args, captured.kwargs = _clone(args), _clone(kwargs)
        captured.calls += 1

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device: torch.device):
    """A function running ``fn()`` once and returning its seconds: CUDA events on CUDA, perf_counter otherwise."""
    if device.type == "cuda":
        def timed(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # ms -> s
        return timed

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed


def timer_name(device: torch.device | str) -> str:
    return "cuda_events" if torch.device(device).type == "cuda" else "perf_counter"


def latency_from_times(times: list[float], *, warmup: int, calls_per_step: int, timer: str) -> Latency:
    med = statistics.median(times)
    return Latency(median_s=med, min_s=min(times), max_s=max(times), spread=(max(times) - min(times)) / med,
                   repeats=len(times), warmup=warmup, calls_per_step=calls_per_step, per_step_s=med * calls_per_step,
                   timer=timer)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def measure_latency(transformer: nn.Module, call: CapturedCall, *, warmup: int = 2, repeats: int = 10,
                    calls_per_step: int = 1) -> Latency:
    """Time ``transformer(*call.args, **call.kwargs)``: ``warmup`` untimed runs, then ``repeats`` timed ones.

    Each timed run is bracketed by device synchronisation (CUDA events on CUDA); seconds per forward. Returns
    median, min, max.
    """
    device = _device_of(transformer)
    timed = _timer(device)
    for _ in range(warmup):
        transformer(*call.args, **call.kwargs)
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        times.append(timed(lambda: transformer(*call.args, **call.kwargs)))
    synchronize(device)
    return latency_from_times(times, warmup=warmup, calls_per_step=calls_per_step, timer=timer_name(device))


@dataclass
class PairedTiming:
    """What :func:`measure_paired` measured: seconds per forward of each, in pair order."""

    teacher_s: list[float]
    model_s: list[float]
    warmup: int
    timer: str

    def speedup(self, teacher_calls_per_step: int = 1, model_calls_per_step: int = 1,
                spread_limit: float = SPREAD_LIMIT) -> Speedup:
        """Per-pair ratios of per-step time, teacher / model; their median, quartiles and spread."""
        ratios = sorted(t * teacher_calls_per_step / (m * model_calls_per_step)
                        for t, m in zip(self.teacher_s, self.model_s))
        med = statistics.median(ratios)
        if len(ratios) >= 2:
            q25, _, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
        else:
            q25 = q75 = ratios[0]
        spread = (q75 - q25) / med
        return Speedup(median=med, q25=q25, q75=q75, min=ratios[0], max=ratios[-1], spread=spread,
                       pairs=len(ratios), spread_limit=spread_limit, reliable=spread <= spread_limit)


@torch.no_grad()
def measure_paired(teacher: nn.Module, model: nn.Module, call: CapturedCall, *, warmup: int = 2,
                   repeats: int = 10) -> PairedTiming:
    """Time ``teacher`` and ``model`` on the same captured call, alternately: ``warmup`` untimed forwards of each,
    then ``repeats`` pairs. The order inside a pair alternates (AB, BA, AB, ...) so neither always runs right
    after the other (a cache or a clock ramp favouring the second of a pair cancels out). Both modules must be
    on the call's device."""
    device = _device_of(teacher)
    timed = _timer(device)

    def fwd(m):
        return lambda: m(*call.args, **call.kwargs)

    for _ in range(warmup):
        teacher(*call.args, **call.kwargs)
        model(*call.args, **call.kwargs)
    synchronize(device)
    t_s, m_s = [], []
    for i in range(repeats):
        if i % 2 == 0:
            t_s.append(timed(fwd(teacher)))
            synchronize(device)
            m_s.append(timed(fwd(model)))
        else:
            m_s.append(timed(fwd(model)))
            synchronize(device)
            t_s.append(timed(fwd(teacher)))
        synchronize(device)
    return PairedTiming(t_s, m_s, warmup, timer_name(device))


# ---------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS counter (Linux >= 4.0)
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage, empty the CUDA cache and return freed heap pages to the OS (glibc)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Context manager measuring peak memory of what runs inside it; read :attr:`result` after the block."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.result: Memory | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0

    def __enter__(self) -> "PeakMemory":
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self._kind = "cuda_max_allocated"
        else:
            self._baseline = _rss_bytes()
            if _reset_hwm() and _hwm_bytes() is not None:
                self._kind = "cpu_peak_rss"
            else:  # no resettable kernel counter: sample RSS in a thread (peaks shorter than 5 ms may be missed)
                self._kind = "cpu_peak_rss"
                self._sampled_peak = self._baseline
                self._sampler = threading.Thread(target=self._sample, daemon=True)
                self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled_peak = max(self._sampled_peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = max(self._sampled_peak, _rss_bytes())
        else:
            peak = _hwm_bytes() or 0
        self.result = Memory(kind=self._kind, peak_bytes=int(peak), baseline_bytes=int(self._baseline),
                             model_bytes=int(max(0, peak - self._baseline)))
