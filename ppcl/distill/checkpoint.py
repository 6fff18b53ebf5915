"""Checkpoints of a distillation run: sharded (torch.distributed.checkpoint), complete or ignored, resumed exactly.

``RUN/checkpoints/step-XXXXXX/``:
- ``.metadata`` and ``__<rank>_0.distcp``: the units' weights and the AdamW states, as DCP writes them: every rank
  writes the shard it holds (:func:`torch.distributed.checkpoint.state_dict.get_state_dict`, keyed by parameter
  name, so a checkpoint of N ranks loads on M ranks or on one process, and one of the unsharded path on N);
- ``rng-<rank>.pt``: each rank's torch / CUDA generator states;
- ``state.json``, written LAST by rank 0 once every rank's files are on disk: the completion marker (step, plan
  hash, data position, scheduler, python / numpy generators, world size). A folder without it is incomplete: never
  resumed from, and replaced when its step comes again.

Why a marker instead of an atomic folder rename: the ranks write into one folder concurrently (several nodes may
each see only their own files), so no single rename can publish it; the marker is the one file whose presence
means "complete", and it is also what the S3 mirror (:mod:`ppcl.distill_s3`) uploads last.

Saving is synchronous on one process. With several ranks (CUDA or CPU) it is ``dcp.async_save`` on a separate
gloo group: the shards are copied to host memory at the checkpoint step and written by a background thread while
training goes on (a 53 GB write must not hold the ranks at a collective past its timeout); the marker, the
``on_checkpoint`` hook and the pruning of old checkpoints follow at the first step after which every rank's write
has finished (at the latest at the next checkpoint, or at the end of the run).

Resuming with another number of processes loads (DCP reshards by parameter name), but the data order is each
rank's share of the batches, so the run continues exactly only with the same number. The noise of each step is
seeded by ``(seed, step)`` (:mod:`ppcl.distill.streams`), so it needs no state here; the global generators are
still saved for anything else that draws.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppcl.distill.streams import BatchStream
from ppcl.errors import PPCLError

CHECKPOINT_VERSION = 2
MARKER = "state.json"


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank()[1] > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save / load that it assumes one process: that is what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dirs(run: Path) -> list[Path]:
    """The complete ``RUN/checkpoints/step-XXXXXX`` folders (those with their marker), oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / MARKER).is_file())


def rng_state() -> dict[str, Any]:
    """This process's global torch (and CUDA) generator states (``rng-<rank>.pt``)."""
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


def training_state(table: nn.ModuleDict, optimizer, ema: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}``: the units' weights and the optimiser state by parameter name, each rank's
    shard of it when sharded (what DCP saves and loads in place); ``"ema"`` too when the run keeps an average of
    the weights (``DistillSettings.ema_decay``)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(table, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    return state


# --------------------------------------------------------------------------------------------------------- saving
@dataclass
class PendingCheckpoint:
    """A checkpoint whose shards are written (or being written, ``future``); :meth:`finish` completes it."""

    run: Path
    folder: Path
    marker: dict[str, Any]
    keep: int
    local_main: bool
    on_checkpoint: Callable[[Path], None] | None = None
    future: Any = None
    done: bool = field(default=False)

    def finish(self) -> Path:
        """Wait for the shards, then (rank 0) the marker, (every rank) ``on_checkpoint``, and (each node's first
        process) the pruning of checkpoints beyond ``keep``. Returns the complete folder. Every rank calls it."""
        if self.done:
            return self.folder
        if self.future is not None:
            self.future.result()
        _barrier()  # every rank's shards are on disk before the marker says so
        if _rank()[0] == 0:
            tmp = self.folder / f".{MARKER}.tmp"
            tmp.write_text(json.dumps(self.marker))
            os.replace(tmp, self.folder / MARKER)
        _barrier()
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.folder)
        if self.local_main:
            prune(self.run, self.keep, self.folder.name)
        _barrier()
        self.done = True
        return self.folder


def save_checkpoint(run: Path, step: int, table: nn.ModuleDict, optimizer, scheduler, data_state: dict, phash: str,
                    keep: int, *, local_main: bool = True, on_checkpoint: Callable[[Path], None] | None = None,
                    async_group: Any = None, ema: dict[str, torch.Tensor] | None = None) -> PendingCheckpoint:
    """Write the shards of ``RUN/checkpoints/step-XXXXXX`` (every rank calls it); returns the pending checkpoint,
    which :meth:`PendingCheckpoint.finish` completes. ``async_group``: a gloo process group for ``dcp.async_save``
    (the write then runs in the background); None: a synchronous ``dcp.save``."""
    import torch.distributed.checkpoint as dcp

    rank, size = _rank()
    folder = run / "checkpoints" / f"step-{step:06d}"
    if local_main:  # a leftover of an interrupted save of this step: its marker is missing, start it over
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), folder / f"rng-{rank}.pt")
    state = training_state(table, optimizer, ema)
    future = None
    if async_group is not None:
        future = dcp.async_save(state, checkpoint_id=str(folder), process_group=async_group)
    else:
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(folder), no_dist=size == 1)
    marker = {"version": CHECKPOINT_VERSION, "step": step, "plan_hash": phash, "data": data_state,
              "scheduler": scheduler.state_dict(), "world_size": size, "rng": _json_rng()}
    return PendingCheckpoint(run, folder, marker, keep, local_main, on_checkpoint, future)


def prune(run: Path, keep: int, newest: str) -> None:
    """Delete checkpoint folders older than ``newest`` beyond the newest ``keep`` (complete or not)."""
    root = run / "checkpoints"
    older = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name < newest)
    for old in older[: max(0, len(older) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------- loading
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: only the plain classes DCP's metadata is made of may be rebuilt from it (a
    checkpoint downloaded from S3 must not run code)."""

    ALLOWED = {
        "torch": {"Size", "dtype", "device", "layout", "memory_format", *(
            n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
        "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice", "complex", "bytearray"},
    }

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") or name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _reader(ckpt: Path):
    """A DCP reader of ``ckpt`` whose metadata goes through :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(ckpt))


def _check_shards(ckpt: Path) -> None:
    """Every byte range the metadata lists is present on disk (a truncated or missing shard file is found here,
    before the teacher loads)."""
    metadata = _reader(ckpt).read_metadata()
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in need.items():
        path = ckpt / rel
        if not path.is_file():
            raise ValueError(f"{rel} is missing")
        if path.stat().st_size < size:
            raise ValueError(f"{rel} is truncated ({path.stat().st_size} of {size} bytes)")


def load_checkpoint(ckpt: Path, phash: str) -> dict[str, Any]:
    """Read and validate one checkpoint folder's marker and shard files (the tensors are loaded into the built units
    by :func:`restore_training`); any damage -> one-line PPCLError naming the folder."""
    rank, _ = _rank()
    try:
        state = json.loads((ckpt / MARKER).read_text())
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {state.get('version')} (expected {CHECKPOINT_VERSION})")
        _check_shards(ckpt)
        rng_file = ckpt / f"rng-{rank}.pt"
        rng = torch.load(rng_file if rng_file.is_file() else ckpt / "rng-0.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged checkpoint
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PPCLError(f"corrupt or truncated checkpoint {ckpt}: {msg}") from None
    if state.get("plan_hash") != phash:
        raise PPCLError(f"cannot resume from {ckpt}: it was trained for a different plan (plan hash differs)")
    return {"state": state, "rng": rng}


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
    ema: dict[str, torch.Tensor] | None = None,
) -> int:
    """Put a checkpoint back: unit weights and optimiser state (each rank reads what its shards need), the
    weights' moving average (``ema``, loaded in place), schedule, data position, every RNG. Every rank calls it.
    Returns the step it was written at."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    try:
        state = training_state(table, optimizer, ema)
        with _single_process_quiet():
            dcp.load(state, storage_reader=_reader(ckpt), no_dist=_rank()[1] == 1)
        set_state_dict(table, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(loaded["state"]["scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise PPCLError(f"checkpoint {ckpt} does not match this plan/model: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - DCP wraps a reader's failure in its own exception types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PPCLError(f"corrupt or truncated checkpoint {ckpt}: {msg}") from None
    stream.restore(loaded["state"]["data"])
    torch.set_rng_state(loaded["rng"]["torch"])
    if "cuda" in loaded["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(loaded["rng"]["cuda"])
    _restore_json_rng(loaded["state"]["rng"])
    return int(loaded["state"]["step"])


def trim_metrics(path: Path, upto: int) -> None:
    """Keep metrics of steps <= ``upto`` only (a resumed run rewrites what followed its checkpoint)."""
    from ppcl.atomic import atomic_path

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
