"""Checkpoints of a distillation run and the RNG state they carry: written atomically, read back bit-exact.

``RUN/checkpoints/step-XXXXXX/``: ``plugs.safetensors`` (plug weights), ``training_state.pt`` (optimizer +
scheduler), ``rng.pt`` (torch / CUDA generator states), ``state.json`` (step, plan hash, data position, python /
numpy generator states). The noise of each step is seeded by ``(seed, step, rank)`` (:mod:`ppcl.distill.streams`),
so it needs no state here; the global generators are still saved for anything else that draws.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppcl.atomic import atomic_path
from ppcl.distill.streams import BatchStream
from ppcl.errors import PPCLError

CHECKPOINT_VERSION = 1


def checkpoint_dirs(run: Path) -> list[Path]:
    """``RUN/checkpoints/step-XXXXXX`` folders, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def rng_state() -> dict[str, Any]:
    """The global torch (and CUDA) generator states (``rng.pt``)."""
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _json_rng() -> dict[str, Any]:
    """The python and numpy generator states as JSON (``state.json``'s ``rng``)."""
    py = random.getstate()
    npst = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }


def _restore_json_rng(st: dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(run: Path, step: int, units_table: nn.ModuleDict, optimizer, scheduler, data_state: dict,
                    phash: str, keep: int) -> Path:
    """Write ``RUN/checkpoints/step-XXXXXX`` atomically; drop older ones beyond ``keep``."""
    from safetensors.torch import save_file

    final = run / "checkpoints" / f"step-{step:06d}"
    with atomic_path(final, directory=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in units_table.state_dict().items()},
                  str(tmp / "plugs.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "training_state.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({
            "version": CHECKPOINT_VERSION, "step": step, "plan_hash": phash, "data": data_state, "rng": _json_rng(),
        }))
    for old in checkpoint_dirs(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, phash: str) -> dict[str, Any]:
    """Read and validate one checkpoint folder; any damage -> one-line PPCLError naming the folder."""
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {state.get('version')} (expected {CHECKPOINT_VERSION})")
        plugs = load_file(str(ckpt / "plugs.safetensors"))
        training = torch.load(ckpt / "training_state.pt", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged checkpoint
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PPCLError(f"corrupt or truncated checkpoint {ckpt}: {msg}") from None
    if state.get("plan_hash") != phash:
        raise PPCLError(f"cannot resume from {ckpt}: it was trained for a different plan (plan hash differs)")
    return {"state": state, "plugs": plugs, "training": training, "rng": rng}


def resume_point(run: Path, phash: str, resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint a run continues from and its contents, ``(None, None)`` for a fresh start; checked before
    anything is written: an occupied ``run`` without ``resume``, a checkpoint of another plan, a complete run."""
    if run.exists() and not resume and any(run.iterdir()):
        raise PPCLError(f"output {run} already exists: pass --resume to continue it, or choose another --out")
    ckpts = checkpoint_dirs(run) if resume else []
    loaded = load_checkpoint(ckpts[-1], phash) if ckpts else None
    if resume and not ckpts and (run / "run.json").exists():
        old = json.loads((run / "run.json").read_text())
        if old.get("plan_hash") != phash:
            raise PPCLError(f"cannot resume {run}: it was trained for a different plan (plan hash differs)")
        raise PPCLError(f"run {run} is already complete (run.json exists); nothing to resume")
    return (ckpts[-1] if ckpts else None), loaded


def restore_training(
    ckpt: Path, loaded: dict[str, Any], table: nn.ModuleDict, optimizer, scheduler, stream: BatchStream,
    device: torch.device,
) -> int:
    """Put a loaded checkpoint back: plug weights, optimizer and schedule, data position, every RNG. Returns the
    step it was written at."""
    try:
        table.load_state_dict({k: v.to(device) for k, v in loaded["plugs"].items()}, strict=True)
        optimizer.load_state_dict(loaded["training"]["optimizer"])
        scheduler.load_state_dict(loaded["training"]["scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise PPCLError(f"checkpoint {ckpt} does not match this plan/model: {str(e).splitlines()[0]}") from None
    stream.restore(loaded["state"]["data"])
    torch.set_rng_state(loaded["rng"]["torch"])
    if "cuda" in loaded["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(loaded["rng"]["cuda"])
    _restore_json_rng(loaded["state"]["rng"])
    return int(loaded["state"]["step"])


def trim_metrics(path: Path, upto: int) -> None:
    """Keep metrics of steps <= ``upto`` only (a resumed run rewrites what followed its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                keep.append(line)
        except (ValueError, KeyError):
            break
    with atomic_path(path) as tmp:
        tmp.write_text("".join(l + "\n" for l in keep))
