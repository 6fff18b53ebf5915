"""Distillation with ``s3://`` inputs and RUN folder: what each node of a multi-node TrainJob runs.

:func:`distill_uris` takes the same arguments as :func:`ppcl.distill.distill`, but ``model``, ``plan``, ``data``
and ``out`` may be ``s3://`` URIs (any mix with local paths; all local -> plain :func:`ppcl.distill.distill`).

- Inputs are downloaded once into a local scratch folder (``$PPCL_SCRATCH``, default ``<tmp>/ppcl-scratch``):
  ``inputs/<sha of URI>`` (:func:`ppcl.storage.fetch`; inputs are treated as immutable, the torchrun ranks of a
  node share one copy through a lock). The plan is downloaded again on every start (it is small, and a stale
  plan would train plugs for the wrong intervals).
- Training writes a local RUN folder ``runs/<sha of out>`` as usual; every checkpoint is mirrored to
  ``OUT/checkpoints/step-XXXXXX/``: the sharded checkpoint's files (``__<rank>_0.distcp``, DCP's ``.metadata``
  as ``dcp.metadata``, ``rng-<rank>.pt``; the first process of each node uploads what its node's ranks wrote),
  ``metrics.jsonl`` (the loss curve up to that step) and LAST, from global rank 0 once every node is done,
  ``state.json``, the completion marker: a checkpoint is complete on S3 iff its ``state.json`` exists. Older
  checkpoints beyond ``keep_checkpoints`` are deleted marker first. At the end ``plugs.safetensors``,
  ``metrics.jsonl`` and LAST ``run.json`` go to ``OUT`` (run.json names the S3 URIs, not the scratch paths).
- ``resume``: the local RUN folder is rebuilt from S3 (the newest COMPLETE checkpoint and its metrics.jsonl),
  then :func:`ppcl.distill.distill` resumes from it exactly as from a local folder (bit-identical on CPU). No
  checkpoint on S3: a fresh start. A complete run on S3 (``OUT/run.json``) with the same plan: nothing to do
  (a node restarted after the job finished must not fail it; locally that is an error instead).

Design choice: checkpoints are uploaded synchronously (each node's first process, then rank 0's marker) while the
other ranks wait at a barrier, so an upload slower than the collective timeout (NCCL default 10 min) needs a
larger ``checkpoint_every`` or a longer timeout. Each node uploads only its own ranks' shards, so the upload per
node shrinks as nodes are added.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ppcl import storage
from ppcl.errors import PPCLError

MARKER = "state.json"
REMOTE_NAMES = {".metadata": "dcp.metadata"}  # local name -> object name (see _remote_name)
FINAL_FILES = ("plugs.safetensors", "metrics.jsonl", "run.json")  # run.json last: the run's completion marker


def scratch_root(scratch: str | os.PathLike | None = None) -> Path:
    """The local scratch folder: ``scratch``, else ``$PPCL_SCRATCH``, else ``<tmp>/ppcl-scratch``."""
    return Path(scratch or os.environ.get("PPCL_SCRATCH") or Path(tempfile.gettempdir()) / "ppcl-scratch")


def _key(uri: str) -> str:
    return hashlib.sha256(str(uri).rstrip("/").encode()).hexdigest()[:16]


def _global_rank() -> int:
    """This process's global rank (torchrun and ``accelerate launch`` set ``RANK``; a single process is 0)."""
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------------------------- checkpoints
def remote_checkpoints(out: str) -> dict[str, list[str]]:
    """``{"step-000004": [object URIs]}`` of every checkpoint folder under ``OUT/checkpoints/`` (complete or not)."""
    root = storage.join(out, "checkpoints") + "/"
    found: dict[str, list[str]] = {}
    for uri in storage.list_files(root):
        name = uri[len(root):].split("/", 1)[0]
        if name.startswith("step-"):
            found.setdefault(name, []).append(uri)
    return dict(sorted(found.items()))


def complete_checkpoints(out: str) -> list[str]:
    """Names of the complete checkpoints under ``OUT`` (those whose marker exists), oldest first."""
    return [n for n, files in remote_checkpoints(out).items() if any(f.endswith("/" + MARKER) for f in files)]


def _remove_checkpoint(files: list[str]) -> None:
    # The marker goes first: from then on readers see the folder as incomplete, whatever is left of it.
    for uri in sorted(files, key=lambda f: not f.endswith("/" + MARKER)):
        storage.remove(uri)


def _remote_name(name: str) -> str:
    """The object name of a checkpoint file: DCP's ``.metadata`` becomes ``dcp.metadata`` (hidden names are skipped
    when a prefix is listed, :func:`ppcl.storage.list_files`)."""
    return REMOTE_NAMES.get(name, name)


def upload_shards(ckpt: Path, out: str) -> None:
    """Upload every file of the local checkpoint folder ``ckpt`` but its marker (what this node wrote, and on one
    node all of it) to ``OUT/checkpoints/<name>/``."""
    dest = storage.join(out, "checkpoints", ckpt.name)
    for p in sorted(p for p in ckpt.iterdir() if p.is_file() and p.name != MARKER):
        storage.upload_file(p, storage.join(dest, _remote_name(p.name)))


def publish_checkpoint(ckpt: Path, out: str, *, metrics: Path | None = None, keep: int = 2) -> str:
    """After every node's :func:`upload_shards`: the loss curve ``metrics``, then the marker (the checkpoint is
    complete on S3 from here), then delete remote checkpoints older than the newest ``keep``. Returns its URI."""
    dest = storage.join(out, "checkpoints", ckpt.name)
    if metrics is not None and metrics.is_file():
        storage.upload_file(metrics, storage.join(dest, "metrics.jsonl"))
    storage.upload_file(ckpt / MARKER, storage.join(dest, MARKER))
    remote = remote_checkpoints(out)
    complete = [n for n, fs in remote.items() if any(f.endswith("/" + MARKER) for f in fs)]
    kept = set(complete[-keep:]) if keep > 0 else set(complete)
    for name, files in remote.items():
        if name < ckpt.name and name not in kept:  # never touch a newer (in-flight) folder
            _remove_checkpoint(files)
    return dest


def upload_checkpoint(ckpt: Path, out: str, *, metrics: Path | None = None, keep: int = 2) -> str:
    """Mirror the local checkpoint folder ``ckpt`` to ``OUT/checkpoints/<name>/`` (marker last), with the loss
    curve ``metrics``; then delete remote checkpoints older than the newest ``keep``. Called by every process of
    the run (:func:`ppcl.distill.distill`'s ``on_checkpoint``): global rank 0 withdraws a stale marker of this
    step, the first process of each node uploads the files its node wrote (with several nodes, each holds only
    its own ranks' shards), and once all have, global rank 0 publishes the marker. Returns its URI."""
    import torch

    dest = storage.join(out, "checkpoints", ckpt.name)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier() -> None:
        if dist:
            torch.distributed.barrier()

    if _global_rank() == 0:  # a leftover of an earlier attempt: incomplete until we finish
        storage.remove(storage.join(dest, MARKER))
    barrier()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        upload_shards(ckpt, out)
    barrier()
    if _global_rank() == 0:
        publish_checkpoint(ckpt, out, metrics=metrics, keep=keep)
    barrier()
    return dest


def sync_run(out: str, run: Path) -> str | None:
    """Make the local RUN folder ``run`` what ``OUT`` on S3 says: the newest complete checkpoint (and its
    metrics.jsonl as ``run/metrics.jsonl``), nothing else. Returns the checkpoint's name, or None (fresh start).

    The torchrun ranks of one node share ``run``: under a lock, and once per launch (torchrun's run id and
    restart count); every rank syncs before ``distill`` initialises the process group, so nobody writes yet.
    """
    token = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}"
    stamp = run.parent / f".{run.name}.synced"
    with storage.file_lock(run.parent / f".{run.name}.lock"):
        names = complete_checkpoints(out)
        name = names[-1] if names else None
        if token != "/" and stamp.is_file() and stamp.read_text() == f"{token} {name}":
            return name
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        if name is not None:
            local = run / "checkpoints" / name
            storage.download_dir(storage.join(out, "checkpoints", name), local)
            for local_name, remote_name in REMOTE_NAMES.items():
                if (local / remote_name).is_file():
                    os.replace(local / remote_name, local / local_name)
            if (local / "metrics.jsonl").is_file():
                os.replace(local / "metrics.jsonl", run / "metrics.jsonl")
        stamp.write_text(f"{token} {name}")
    return name


# --------------------------------------------------------------------------------------------- the run
def distill_uris(
    model: str,
    plan: str,
    out: str,
    *,
    data: str | None = None,
    resume: bool = False,
    scratch: str | os.PathLike | None = None,
    settings: Any = None,
    **kwargs: Any,
):
    """:func:`ppcl.distill.distill` where ``model``, ``plan``, ``data`` and ``out`` may be ``s3://`` URIs (module
    doc). ``kwargs`` (``stop_after``, ``on_step``, ``progress``, settings overrides) pass through. Returns its
    :class:`ppcl.distill.DistillResult` (``run_dir`` is the local RUN folder)."""
    from ppcl.distill import DistillResult, DistillSettings, distill

    uris = [str(x) for x in (model, plan, data, out) if x is not None]
    if not any(storage.is_s3(u) for u in uris):
        return distill(model, plan, out, data=data, resume=resume, settings=settings, **kwargs)
    keep = kwargs.get("keep_checkpoints", getattr(settings, "keep_checkpoints", DistillSettings.model_fields["keep_checkpoints"].default))
    root = scratch_root(scratch)
    # Validate S3 outputs before any download or training: a missing bucket or an occupied OUT fails at once.
    remote_out = storage.is_s3(out)
    done = None
    if remote_out:
        storage.check_bucket(out)
        done = storage.join(out, "run.json")
        if not resume and storage.list_files(out):
            raise PPCLError(f"output {out} already exists: pass --resume to continue it, or choose another --out")
    for name, uri in (("model", model), ("plan", plan), ("data", data)):
        if uri is not None and storage.is_s3(uri) and not storage.list_files(uri):
            raise PPCLError(f"--{name} {uri}: nothing under this S3 URI")

    local_plan = plan
    if storage.is_s3(plan):
        local_plan = root / "inputs" / f"{_key(plan)}-plan.json"
        with storage.file_lock(root / "inputs" / f".{local_plan.name}.lock"):
            storage.download_file(str(plan), local_plan)
    if remote_out and resume and storage.exists(done):
        from ppcl.distill import plan_hash
        from ppcl.plan import as_plan

        meta = json.loads(storage.read_bytes(done))
        if meta.get("plan_hash") != plan_hash(as_plan(local_plan)):
            raise PPCLError(f"cannot resume {out}: it was trained for a different plan (plan hash differs)")
        print(f"{out} is already complete (run.json exists); nothing to resume", file=sys.stderr)
        return DistillResult(Path(str(out)), int(meta["steps"]), dict(meta.get("final_losses") or {}),
                             list(meta.get("plugs") or []))
    local_model = storage.fetch(model, root / "inputs" / _key(model)) if storage.is_s3(model) else model
    local_data = storage.fetch(data, root / "inputs" / _key(data)) if data is not None and storage.is_s3(data) else data

    on_checkpoint = None
    if remote_out:
        run = root / "runs" / _key(out)
        if resume:
            sync_run(out, run)
        else:
            with storage.file_lock(run.parent / f".{run.name}.lock"):
                if run.exists():  # a leftover of an earlier local attempt: S3 (empty) is the truth
                    shutil.rmtree(run)

        def on_checkpoint(ckpt: Path) -> None:
            upload_checkpoint(ckpt, out, metrics=run / "metrics.jsonl", keep=keep)
    else:
        run = Path(out)

    result = distill(local_model, local_plan, run, data=local_data, resume=resume, settings=settings,
                     on_checkpoint=on_checkpoint, **kwargs)  # fmt: skip
    if remote_out and _global_rank() == 0 and (run / "run.json").is_file():
        from ppcl.atomic import write_json

        meta = json.loads((run / "run.json").read_text())
        meta["teacher"]["model"] = str(model)  # the URIs a reader can use, not this node's scratch paths
        meta["plan_uri"] = str(plan)
        meta["data"] = str(data) if data is not None else meta.get("data")
        meta["out"] = str(out)
        write_json(run / "run.json", meta)
        for name in FINAL_FILES:
            storage.upload_file(run / name, storage.join(out, name))
    return result
