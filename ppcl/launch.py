"""One process per GPU: how ``ppcl distill`` is launched on 1..N GPUs of one node and on several nodes.

One code path (issue 15, item 2). Every launch of distillation runs the same command,
:func:`distill_command` = ``python -m torch.distributed.run <launcher flags> -m ppcl distill <args>``:
- the pipeline's distill step (one pod, G GPUs): ``--standalone --nnodes 1 --nproc_per_node G`` (a private
  rendezvous on a free local port), started by :func:`run_distill` from :func:`ppcl.stages.distill`;
- the multi-node TrainJob (:mod:`ppcl.trainjob`, N pods of G GPUs): ``--nnodes N --nproc_per_node G`` and
  nothing else: the node rank, the master address and its port come from the environment. torchrun reads
  every flag it is not given from ``PET_<FLAG>`` (``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``),
  which Kubeflow Trainer's torch runtime injects into every node's pod.
Inside, each process is one rank of :func:`ppcl.distill.distill` (accelerate reads ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` from torchrun), the teacher on ``cuda:<LOCAL_RANK>``.

One GPU (G = 1, or no GPU at all on a laptop): :func:`ppcl.stages.distill` calls :func:`ppcl.distill.distill`
directly in its own process; the same function every rank runs, with no launcher parent in between, which is
what torchrun with one process would add (plus a second interpreter start and a second import of torch).

What the ranks share (one node): the output folder's lock is taken by local rank 0 only
(:func:`ppcl.outputs.rank_writes`); only global rank 0 writes metrics, checkpoints and the final files, and
only it uploads to S3 (:mod:`ppcl.distill_s3`); ``s3://`` inputs are downloaded by one rank under a file lock
while the others wait and then reuse its copy (:func:`ppcl.storage.fetch`). In the pipeline step the teacher
is downloaded by the step's own process before the launch, so no rank downloads at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ppcl.errors import PPCLError

#: The launcher module: the same as the ``torchrun`` console script, but run by a given interpreter (the step's
#: own ``sys.executable``: the venv of a laptop or the image's Python, whatever is first on PATH).
LAUNCHER = ("-m", "torch.distributed.run")


def launcher_flags(nproc: int, nnodes: int = 1) -> list[str]:
    """torchrun's flags for ``nproc`` processes on each of ``nnodes`` nodes (see the module doc).

    One node: ``--standalone`` (a rendezvous of its own on a free port; two runs on one machine never
    collide). Several nodes: only the counts; rank and master from ``PET_*`` in the environment."""
    for name, value in (("nproc", nproc), ("nnodes", nnodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PPCLError(f"launch: {name} must be an integer >= 1, got {value!r}")
    if nnodes == 1:
        return ["--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc)]
    return ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc)]


def distill_command(nproc: int, nnodes: int = 1, *, python: str | None = None) -> list[str]:
    """``[python, -m, torch.distributed.run, <flags>, -m, ppcl, distill]``: the command every launch of
    distillation runs; its arguments (:func:`distill_args`) follow it. ``python`` defaults to this interpreter."""
    return [python or sys.executable, *LAUNCHER, *launcher_flags(nproc, nnodes), "-m", "ppcl", "distill"]


def distill_args(model: str, plan: str, out: str, *, data: str | None = None, settings_args: Sequence[str] = (),
                 resume: bool = False) -> list[str]:
    """The ``ppcl distill`` arguments of one run: locations, every setting as a flag
    (:func:`ppcl.settings.settings_cli_args`), ``--resume`` when asked."""
    args = ["--model", str(model), "--plan", str(plan)]
    if data is not None:
        args += ["--data", str(data)]
    args += ["--out", str(out), *settings_args]
    if resume:
        args.append("--resume")
    return args


def check_gpus(nproc: int, setting: str = "distill.gpus_per_node") -> None:
    """Refuse more processes than visible GPUs (a rank without its own GPU would fail deep in CUDA). Without
    any CUDA device the processes run on the CPU (gloo): the laptop and CI case."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < visible < nproc:
        raise PPCLError(f"{setting} is {nproc} but this machine shows {visible} GPU(s): request as many GPUs "
                        f"for the step (resources) or lower {setting}")


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The launched processes' environment: this one's, plus, on a machine without CUDA, accelerate's switch to
    a CPU process group (gloo): without it accelerate treats every CPU process as a lone run of its own."""
    import torch

    env = dict(os.environ if environ is None else environ)
    if not torch.cuda.is_available():
        env.setdefault("ACCELERATE_USE_CPU", "true")
    return env


class MetricsTail:
    """New records of a growing ``metrics.jsonl`` (rank 0 appends one line per step), for live logging from
    the launching process. Lines present before the launch are an earlier attempt's: never reported (the
    stage's final pass logs whatever was not logged live). A file cut back (a resume trims it to its
    checkpoint) is re-read from the start; a step is reported once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.seen: set[int] = set()
        for _, record in self._read():  # the previous attempt's lines
            self.seen.add(int(record["step"]))

    def _read(self) -> list[tuple[int, dict[str, Any]]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, 2)
                if f.tell() < self.offset:
                    self.offset = 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append((record["step"], record))
        return out

    def new(self) -> list[tuple[int, dict[str, Any]]]:
        """``(step, record)`` of the lines written since the last call, each step once."""
        fresh = []
        for step, record in self._read():
            if step not in self.seen:
                self.seen.add(step)
                fresh.append((step, record))
        return fresh


def run_distill(argv: Sequence[str], metrics: Path, *, on_step: Callable[[int, dict[str, Any]], None] | None = None,
                poll_s: float = 2.0) -> None:
    """Run the launch ``argv`` (:func:`distill_command` + :func:`distill_args`) to completion, its output on this
    process's stdout/stderr; each new line of ``metrics`` (the run's metrics.jsonl) goes to ``on_step`` while it
    runs. A non-zero exit is a PPCLError (the failing rank's own one-line error is in the log above it)."""
    tail = MetricsTail(metrics) if on_step is not None else None
    proc = subprocess.Popen(list(argv), env=worker_env())
    try:
        while True:
            try:
                rc = proc.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                rc = None
            if tail is not None:
                for step, record in tail.new():
                    on_step(step, record)
            if rc is not None:
                break
    except BaseException:
        # this process is stopping (KFP cancelled the step, Ctrl-C): torchrun stops its workers on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rc != 0:
        nproc = _flag(argv, "--nproc_per_node")
        raise PPCLError(f"distill: the launch of {nproc} process(es) exited with status {rc} (the failing "
                        f"rank's error is in the log above)")


def _flag(argv: Sequence[str], name: str) -> str:
    argv = list(argv)
    return argv[argv.index(name) + 1] if name in argv else "?"


def distill_on_gpus(model: str | Path, plan: str | Path, out: str | Path, *, data: str | Path | None, settings: Any,
                    resume: bool = False, on_step: Callable[[int, dict[str, Any]], None] | None = None,
                    python: str | None = None):
    """:func:`ppcl.distill.distill` as ``settings.gpus_per_node`` processes of this node, one per GPU: the
    pipeline's distill step on a pod with several GPUs. ``settings``: a :class:`ppcl.config.DistillConfig`
    (every field but ``nodes``/``gpus_per_node`` becomes a ``ppcl distill`` flag, so each rank rebuilds the same
    settings). Blocks until the processes exit; returns the run's :class:`ppcl.distill.DistillResult` read back
    from ``out``/run.json, which only rank 0 writes."""
    from ppcl.distill import DistillResult
    from ppcl.settings import settings_cli_args

    nproc = settings.gpus_per_node
    check_gpus(nproc)
    flags = settings_cli_args(settings, exclude=("nodes", "gpus_per_node"))
    argv = [*distill_command(nproc, python=python),
            *distill_args(str(model), str(plan), str(out), data=None if data is None else str(data),
                          settings_args=flags, resume=resume)]
    print(f"[ppcl] distill on {nproc} processes: {' '.join(argv[:8])} ...", file=sys.stderr, flush=True)
    run_distill(argv, Path(out) / "metrics.jsonl", on_step=on_step)
    done = Path(out) / "run.json"
    if not done.is_file():
        raise PPCLError(f"distill: the {nproc} processes exited without writing {done}")
    meta = json.loads(done.read_text())
    return DistillResult(Path(out), int(meta["steps"]), dict(meta.get("final_losses") or {}),
                         list(meta.get("plugs") or []))
