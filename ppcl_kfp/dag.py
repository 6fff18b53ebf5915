"""The DAG of the checkout: load components/ and pipelines/, compile them, run the DAG locally.

``components/`` and ``pipelines/`` are folders of the source checkout (what a KFP user copies or loads by path),
installed as ``ppcl_kfp.components`` and ``ppcl_kfp.pipelines`` (links in ``ppcl_kfp/``); a component's
``component.py`` is not a module of a package, so it is imported by file path from :data:`COMPONENTS_DIR`.

Local runs use ``kfp.local`` with ``SubprocessRunner(use_venv=False)``: every task runs as a subprocess of the
current interpreter, in the current environment (ppcl installed, no pip, no container); kfp-kubernetes
settings (secrets, node selectors) are ignored locally. Layout of one local run::

    ppcl-runs/<run-id>/config.yaml       the validated config that drove the run
    ppcl-runs/<run-id>/kfp/<pipeline>-<timestamp>/<task>/<output>/...   every artifact (kfp.local's layout)
"""

from __future__ import annotations

import ast
import builtins
import datetime as _dt
import importlib.util
import os
import re
import sys
import uuid
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from ppcl.config import STAGES, RunConfig
from ppcl.errors import PPCLError

REPO_ROOT = Path(__file__).resolve().parent.parent
# through this package's links: the checkout's folders, or their installed copies
COMPONENTS_DIR = Path(__file__).resolve().parent / "components"
PIPELINE_FILE = Path(__file__).resolve().parent / "pipelines" / "ppcl_pipeline.py"
PIPELINE_YAML = Path(__file__).resolve().parent / "pipelines" / "ppcl_pipeline.yaml"


def _import_file(name: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise PPCLError(f"{path} not found: this ppcl_kfp install lacks its components/ or pipelines/")
    # executed afresh on every load: base_image=default_image() reads $PPCL_IMAGE when the module runs
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # KFP reads the component's source through inspect, which needs the module
    spec.loader.exec_module(module)
    return module


def load_component(stage: str):
    """The KFP component object of ``stage`` (from components/<stage>/component.py)."""
    if stage not in STAGES:
        raise PPCLError(f"unknown stage '{stage}': expected one of {', '.join(STAGES)}")
    module = _import_file(f"ppcl_components_{stage}", COMPONENTS_DIR / stage / "component.py")
    return getattr(module, stage)


def load_pipeline_module() -> ModuleType:
    return _import_file("ppcl_pipeline_def", PIPELINE_FILE)


_DEFAULT_DICT = re.compile(r"^(#.*\[Default: )(\{.*\})(\]\s*)$")


def canonical_header(text: str) -> str:
    """Sort the dict defaults kfp prints in the YAML's comment header.

    kfp renders Struct defaults from a protobuf map whose iteration order changes from process to process, so
    without this the committed YAML would differ on every compile (the spec below the header is stable).
    """
    lines = []
    for line in text.splitlines(keepends=True):
        m = _DEFAULT_DICT.match(line) if line.startswith("#") else None
        if m:
            try:
                value = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                value = None
            if isinstance(value, dict):
                line = m.group(1) + repr(dict(sorted(value.items()))) + m.group(3)
        lines.append(line)
    return "".join(lines)


def _compile_atomic(func, out: Path) -> None:
    from kfp import compiler

    from ppcl.atomic import atomic_path

    with atomic_path(out) as tmp:
        # kfp picks the output format from the file suffix: compile to a .yaml sibling, then move it in place
        target = tmp.with_name(tmp.name + ".yaml")
        try:
            compiler.Compiler().compile(func, str(target))
            tmp.write_text(canonical_header(target.read_text()))
        finally:
            target.unlink(missing_ok=True)


def compile_components(out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Compile every component to ``<out_dir or components>/<stage>/component.yaml``; returns stage -> path."""
    root = Path(out_dir) if out_dir else COMPONENTS_DIR
    written = {}
    for stage in STAGES:
        path = root / stage / "component.yaml"
        _compile_atomic(load_component(stage), path)
        written[stage] = path
    return written


def compile_pipeline(out: str | os.PathLike | None = None, config: RunConfig | None = None) -> Path:
    """Compile the ppcl pipeline to ``out`` (default pipelines/ppcl_pipeline.yaml).

    ``config`` sets the compile-time resources and the parameters' defaults; without it the committed YAML's
    defaults are used (teacher left as a required run parameter).
    """
    module = load_pipeline_module()
    out = Path(out) if out else PIPELINE_YAML
    _compile_atomic(module.make_pipeline(config), out)
    return out


def new_run_id(name: str = "ppcl") -> str:
    """``<name>-YYYYmmdd-HHMMSS-<4 hex>``: sortable, unique, a valid label value."""
    return f"{name}-{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


def prepare_run_dir(config: RunConfig, run_dir: str | os.PathLike) -> Path:
    """Create the run folder, record the validated config in it and point tracking at it.

    Sets, for this process and every task subprocess: ``PPCL_RUN_ID`` (the folder name),
    ``PPCL_RUN_DIR``, ``MLFLOW_EXPERIMENT_NAME`` (``tracking.experiment``) and ``MLFLOW_TRACKING_URI``
    (``tracking.mlflow_uri``, else an already set ``$MLFLOW_TRACKING_URI``, else one sqlite database under
    ``run_root`` shared by every local run, so ``ppcl compare`` and ``mlflow ui`` show them side by side).
    """
    import yaml

    from ppcl.atomic import atomic_path

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    from ppcl.tracking import local_uri

    uri = config.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_uri(config.run_root)
    os.environ.update({"PPCL_RUN_ID": run_dir.name, "PPCL_RUN_DIR": str(run_dir),
                       "MLFLOW_EXPERIMENT_NAME": config.tracking.experiment, "MLFLOW_TRACKING_URI": uri})  # fmt: skip
    return run_dir


def run_local(config: RunConfig, run_dir: str | os.PathLike, *, raise_on_error: bool = True) -> Path:
    """Run the whole DAG on ``config`` with kfp.local in this environment; returns the kfp pipeline-run folder.

    Raises PPCLError naming the failed task (its log is in the output above) when a task fails.
    """
    from kfp import local

    module = load_pipeline_module()
    run_dir = Path(run_dir).resolve()
    root = run_dir / "kfp"
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    # One ratio branch at a time: branches on one machine would skew each other's latency measurements.
    pipeline = module.make_pipeline(config, ratio_parallelism=1)
    # kfp.local indents task logs by swapping builtins.print; tasks of a ParallelFor run in threads whose
    # save/restore pairs interleave, which can leave the indenting print installed for the rest of the process.
    original_print = builtins.print
    try:
        with warnings.catch_warnings():
            # kfp warns that our image is "non-Python": locally the current environment IS the image's content
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            pipeline(**module.pipeline_arguments(config))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PPCLError(f"local pipeline run failed: {first} (task logs above; artifacts under {root})") from None
    finally:
        builtins.print = original_print
    runs = sorted(p for p in root.iterdir() if p.is_dir())
    if not runs:
        raise PPCLError(f"local pipeline run left nothing under {root}")
    return max(runs, key=lambda p: p.stat().st_mtime)


def find_outputs(kfp_run: str | os.PathLike) -> dict[str, Any]:
    """Where a local run's artifacts are: stage -> folder (or, for export/evaluate, a list, one per ratio)."""
    kfp_run = Path(kfp_run)
    out: dict[str, Any] = {}
    for stage, name in (("shard", "data"), ("encode", "cache"), ("probe", "probe"), ("select", "plan"),
                        ("distill", "plugs"), ("report", "plots")):  # fmt: skip
        p = kfp_run / stage / name
        if p.exists():
            out[stage] = p
    for stage, name in (("export", "model"), ("evaluate", "evaluation")):
        found = sorted(kfp_run.glob(f"for-loop-*-iteration-*/{stage}/{name}"),
                       key=lambda p: int(p.parts[-3].rsplit("-", 1)[1]))  # fmt: skip
        if found:
            out[stage] = found
    return out
