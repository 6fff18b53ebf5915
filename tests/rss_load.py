"""Peak host memory of loading a distillation teacher, old path vs lean path (run as its own process).

    python tests/rss_load.py PIPE WARM_PIPE new,old   -> one JSON line per mode: baseline, peak, growth (bytes)

``old``: the loading of ppcl before issue 15 (the whole pipeline in float32 on the host, then the transformer
cast to bf16). ``new``: :func:`ppcl.distill.load_teacher` for a latent-cache run in bf16 (transformer and
scheduler only, each tensor read in bf16). Before measuring, the process imports everything and loads a tiny
pipeline once (diffusers imports its model classes lazily, at the first load), then resets the kernel's
high-water mark (``/proc/self/clear_refs``): ``peak`` is the largest resident set of the load alone
(anonymous memory and mapped file pages alike, as a container's memory limit counts them). Every weight is
then read once (a reduction, no copy), so memory-mapped weights count as resident as they will in training.
Modes run in the given order in this one process, the lean one first (what it frees is unmapped, so the old
path after it starts from the same baseline).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def measure(pipe_dir: str, mode: str) -> dict:
    import gc

    import torch
    from diffusers import DiffusionPipeline

    from ppcl.distill import load_teacher

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError as e:  # not Linux, or a kernel that refuses it: no measurement rather than a wrong one
        return {"mode": mode, "error": f"cannot reset the high-water mark: {e}"}
    baseline = _status("VmRSS")
    if mode == "old":
        pipe = DiffusionPipeline.from_pretrained(pipe_dir)
        pipe.transformer.to("cpu")
        pipe.transformer.to(torch.bfloat16)
    else:
        pipe, _ = load_teacher(pipe_dir, "cpu", torch.bfloat16, encoders=False)
    assert pipe.transformer.dtype == torch.bfloat16
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.sum()
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    peak = _status("VmHWM")
    del pipe
    return {"mode": mode, "baseline": baseline, "peak": peak, "growth": peak - baseline,
            "transformer_bf16_bytes": weights}


def main(pipe_dir: str, warm_dir: str, modes: str) -> None:
    import torch
    from diffusers import DiffusionPipeline

    from ppcl.distill import load_teacher

    load_teacher(warm_dir, "cpu", torch.bfloat16, encoders=False)  # lazy imports of the lean path
    DiffusionPipeline.from_pretrained(warm_dir)  # ... and of every component class (the old path)
    for mode in modes.split(","):
        print(json.dumps(measure(pipe_dir, mode)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
