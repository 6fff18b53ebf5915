"""One plain-Python function per DAG stage: paths and settings in, outputs on disk, a small dict of metrics out.

The KFP components (``components/<stage>/component.py``) call ONLY these functions: a component body moves
artifacts and logs the returned numbers to its ``Metrics`` artifact, nothing else. Everything worth testing
is here and in the modules these call, importable without KFP.

Conventions shared by every stage:
- ``settings`` is the stage's section of :class:`ppcl.config.RunConfig` as a plain dict
  (:meth:`RunConfig.stage_settings`); each stage re-validates it with the same pydantic model, so a component
  fed by hand in someone else's pipeline gets the same one-line errors as ``ppcl pipeline run``.
- A model argument (teacher) is a diffusers pipeline folder, an ``s3://`` prefix (downloaded once into a local
  scratch folder beside the outputs) or a hub id (passed through to diffusers).
- Outputs are folders written atomically by the stage modules; the returned metrics are finite floats
  keyed by short names (the KFP UI shows them as they are).
- Tracking seam: after each stage :func:`_track` hands the stage name, its metrics and its output folder to
  ``ppcl.tracking.log_stage`` when that module provides one (see issue 7); without it nothing is logged.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ppcl.errors import PPCLError

#: Name of the summary every stage writes beside its outputs (``<out>/stage.json``): stage, metrics, settings.
STAGE_SUMMARY = "stage.json"


def _settings(model: type, settings: dict[str, Any] | None, stage: str, drop: tuple[str, ...] = ()):
    from pydantic import ValidationError

    data = {k: v for k, v in (settings or {}).items() if k not in drop}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise PPCLError(f"{stage} settings: field '{where}' {err['msg'].removeprefix('Value error, ')}") from None


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Keep the numeric, finite entries (KFP metrics and MLflow reject NaN/inf and non-numbers)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _track(stage: str, metrics: dict[str, float], out: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Tracking seam: ``ppcl.tracking.log_stage(stage=, metrics=, artifacts=, settings=)`` if it exists."""
    try:
        from ppcl import tracking  # type: ignore[attr-defined]
    except ImportError:
        return
    log_stage = getattr(tracking, "log_stage", None)
    if log_stage is not None:
        log_stage(stage=stage, metrics=metrics, artifacts=str(out), settings=settings)


def _finish(stage: str, out: str | os.PathLike, metrics: dict[str, Any], settings: dict[str, Any] | None) -> dict[str, float]:
    from ppcl.atomic import write_json

    clean = _finite(metrics)
    out = Path(out)
    if out.is_dir():
        write_json(out / STAGE_SUMMARY, {"version": 1, "stage": stage, "metrics": clean, "settings": settings or {}})
    _track(stage, clean, out, settings or {})
    return clean


def local_model(uri: str, scratch: str | os.PathLike) -> str:
    """A local folder for model ``uri``: s3:// prefixes are downloaded into ``scratch`` (once), others pass."""
    from ppcl import storage

    if not storage.is_s3(uri):
        return str(uri)
    dest = Path(scratch)
    if not (dest / "model_index.json").is_file():
        storage.download_dir(uri, dest)
    return str(dest)


def check_family(model_dir: str, family: str | None) -> None:
    """If ``family`` is given, the pipeline at ``model_dir`` must be of it (checked from model_index.json)."""
    if not family:
        return
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return  # a hub id: the adapter checks the loaded transformer
    import importlib

    from ppcl.arch import adapter_for

    expected = adapter_for(family).transformer_class
    library, cls_name = (json.loads(index.read_text()).get("transformer") or [None, None])[:2]
    try:
        actual = getattr(importlib.import_module(library), cls_name)
    except (ImportError, AttributeError, TypeError, ValueError):
        raise PPCLError(f"teacher {model_dir}: cannot import its transformer class {library}.{cls_name}") from None
    if not (isinstance(actual, type) and issubclass(actual, expected)):
        raise PPCLError(f"family '{family}' does not match teacher {model_dir}: its transformer is {cls_name}")


# --------------------------------------------------------------------------------------------------- stages


def shard(source: str, out: str, settings: dict[str, Any] | None = None, *, progress: bool = True) -> dict[str, float]:
    """Raw image-text source -> ``out``/shard-*.parquet + manifest.json (:func:`ppcl.data.shard.shard_source`).

    ``source`` None or empty with ``settings.source`` None: a synthetic captioned set of ``synth_samples``
    images is written first (:func:`ppcl.data.synth.write_synth`) into ``out``/../synth-source.

    Metrics: samples (accepted), rejected, read, shards.
    """
    from ppcl.config import DataConfig
    from ppcl.data.shard import shard_source

    cfg = _settings(DataConfig, settings, "shard")
    source = source or cfg.source
    if not source:
        from ppcl.data.synth import write_synth

        source = str(Path(out).parent / (Path(out).name + "-synth-source"))
        write_synth(source, cfg.synth_samples, size=cfg.synth_size, seed=0, progress=progress)
    manifest, _ = shard_source(
        source, out, cfg.shards, fmt=cfg.format, caption_column=cfg.caption_column, image_column=cfg.image_column,
        key_column=cfg.key_column, min_size=cfg.min_size, progress=progress,
    )  # fmt: skip
    metrics = {"samples": manifest.accepted, "rejected": len(manifest.rejected), "read": manifest.read,
               "shards": manifest.num_shards}  # fmt: skip
    return _finish("shard", out, metrics, cfg.model_dump(mode="json"))


def encode(teacher: str, data: str, out: str, settings: dict[str, Any] | None = None, *,
           progress: bool = True) -> dict[str, float]:
    """Shards -> latent / prompt-embedding cache with the teacher's VAE and text encoders
    (:func:`ppcl.data.encode.encode_shards`). Metrics: samples, shards, resolution."""
    from ppcl.config import EncodeConfig
    from ppcl.data.encode import encode_shards

    cfg = _settings(EncodeConfig, settings, "encode", drop=("family",))
    model = local_model(teacher, Path(out).parent / "teacher")
    check_family(model, (settings or {}).get("family"))
    manifest = encode_shards(model, data, out, resolution=cfg.resolution, batch_size=cfg.batch_size,
                             dtype=cfg.dtype, progress=progress)  # fmt: skip
    metrics = {"samples": manifest.samples, "shards": len(manifest.shards), "resolution": manifest.resolution}
    return _finish("encode", out, metrics, cfg.model_dump(mode="json"))


def probe(teacher: str, cache: str, out: str, settings: dict[str, Any] | None = None, *,
          progress: bool = True) -> dict[str, float]:
    """Streaming similarity statistics of the teacher's blocks on cached calibration data -> ``out``/probe.json
    + plots (:func:`ppcl.probe.run_probe`). Metrics: blocks, intervals (probed), mean_cka, min_cka, forwards."""
    from ppcl.config import ProbeConfig
    from ppcl.probe import run_probe

    cfg = _settings(ProbeConfig, settings, "probe", drop=("family",))
    model = local_model(teacher, Path(out).parent / "teacher")
    check_family(model, (settings or {}).get("family"))
    result = run_probe(model, out, data=cache, progress=progress, **cfg.model_dump())
    ckas = [b.cka for b in result.blocks if b.cka is not None]
    metrics = {"blocks": len(result.blocks), "intervals": len(result.intervals), "forwards": result.calibration.forwards,
               "mean_cka": sum(ckas) / len(ckas) if ckas else None, "min_cka": min(ckas) if ckas else None}  # fmt: skip
    return _finish("probe", out, metrics, cfg.model_dump(mode="json"))


def select(probe_dir: str, out: str, settings: dict[str, Any] | None = None) -> dict[str, float]:
    """``probe_dir``/probe.json -> ``out``/plan.json (+ trend.png with the chosen intervals): contiguous
    intervals under the ``keep_params`` budget (:func:`ppcl.select.select`). No model is loaded.

    Metrics: keep_params (target), predicted_keep (exact student/teacher parameters), intervals,
    blocks_removed, teacher_params, student_params.
    """
    from ppcl.atomic import atomic_path
    from ppcl.config import SelectConfig
    from ppcl.plan import save_plan
    from ppcl.probe import load_probe
    from ppcl.select import select as run_select

    cfg = _settings(SelectConfig, settings, "select")
    if cfg.keep_params is None:
        raise PPCLError("select settings: field 'keep_params' is required (the plan's parameter budget)")
    probe_json = Path(probe_dir) / "probe.json"
    probe_result = load_probe(probe_json)
    options = {k: v for k, v in (("min_cka", cfg.min_cka), ("max_jump", cfg.max_jump)) if v is not None}
    plan = run_select(probe_result, method=cfg.method, keep_params=cfg.keep_params, protect=cfg.protect,
                      allow_ends=cfg.allow_ends, init=cfg.init, seed=cfg.seed, **options)  # fmt: skip
    plan.selection["probe"] = str(probe_json)
    with atomic_path(out, directory=True) as tmp:
        save_plan(plan, tmp / "plan.json")
        from ppcl.plots import plot_trend

        plot_trend(probe_result, tmp / "trend.png", intervals=[list(iv) for iv in plan.intervals])
    metrics = {
        "keep_params": cfg.keep_params, "predicted_keep": plan.params.student / plan.params.teacher,
        "intervals": len(plan.intervals), "blocks_removed": sum(e - s for s, e in plan.intervals),
        "teacher_params": plan.params.teacher, "student_params": plan.params.student,
    }  # fmt: skip
    return _finish("select", out, metrics, cfg.model_dump(mode="json"))


def distill(teacher: str, plan_dir: str, cache: str, out: str, settings: dict[str, Any] | None = None, *,
            progress: bool = True) -> dict[str, float]:
    """Train every plug of the plan against the frozen teacher -> ``out`` (plugs.safetensors, run.json,
    metrics.jsonl, checkpoints; :func:`ppcl.distill.distill`).

    A folder left by an interrupted attempt (checkpoints, no run.json) is resumed, so a retried step (KFP
    ``set_retry`` after a lost node) continues instead of starting over. Metrics: steps, plugs, loss (mean of the
    final losses), loss_<unit>_<stream> per plug and stream.
    """
    from ppcl.config import DistillConfig
    from ppcl.distill import distill as run_distill

    cfg = _settings(DistillConfig, settings, "distill", drop=("family",))
    model = local_model(teacher, Path(out).parent / "teacher")
    check_family(model, (settings or {}).get("family"))
    run = Path(out)
    resume = (run / "checkpoints").is_dir() and not (run / "run.json").exists()
    fields = cfg.model_dump()
    fields["lr"] = fields.pop("learning_rate")
    result = run_distill(model, Path(plan_dir) / "plan.json", run, data=cache, resume=resume, progress=progress,
                         **fields)  # fmt: skip
    losses = {k: v for k, v in result.final_losses.items() if v is not None}
    metrics: dict[str, Any] = {"steps": result.steps, "plugs": len(result.plugs),
                               "loss": sum(losses.values()) / len(losses) if losses else None}  # fmt: skip
    metrics.update({"loss_" + k.replace("/", "_").replace(".", "_"): v for k, v in losses.items()})
    return _finish("distill", out, metrics, cfg.model_dump(mode="json"))


def export(teacher: str, plan_dir: str, plugs: str, keep_params: float, out: str,
           settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Materialise the pruned pipeline at ``keep_params`` from the trained plugs -> pipeline folder ``out``
    (:func:`ppcl.export.export`; the subset of the plan's intervals is chosen by the export rule).

    Metrics: keep_params (requested), parameters (exported transformer, exact), parameters_ratio, intervals.
    """
    from ppcl.export import export as run_export

    if not 0 < keep_params <= 1:
        raise PPCLError(f"export: keep_params {keep_params} is outside (0, 1]")
    model = local_model(teacher, Path(out).parent / "teacher")
    check_family(model, (settings or {}).get("family"))
    result = run_export(model, Path(plan_dir) / "plan.json", plugs, out, keep_params=keep_params)
    metrics = {"keep_params": keep_params, "parameters": result.parameters,
               "parameters_ratio": result.parameters / result.teacher_parameters,
               "intervals": len(result.intervals)}  # fmt: skip
    return _finish("export", out, metrics, {"keep_params": keep_params})


def evaluate(model: str, teacher: str, out: str, settings: dict[str, Any] | None = None, *,
             name: str | None = None, progress: bool = True) -> dict[str, float]:
    """The pruned pipeline ``model`` against ``teacher`` on the configured prompts -> ``out``/metrics.json,
    grid.png, report.html (:func:`ppcl.evaluate.evaluate_models`).

    Metrics (of the pruned model): parameters, parameters_ratio, ms_per_step, speedup, peak_memory_mb, and
    fid, clip_score, latent_psnr_db, latent_cosine where measured.
    """
    from ppcl.config import EvaluateConfig
    from ppcl.evaluate.evaluation import evaluate_models
    from ppcl.evaluate.metrics import EvalSettings

    cfg = _settings(EvaluateConfig, settings, "evaluate", drop=("family",))
    teacher_dir = local_model(teacher, Path(out).parent / "teacher")
    check_family(teacher_dir, (settings or {}).get("family"))
    es = EvalSettings(**cfg.model_dump(exclude={"prompts"}))
    if name is None and (Path(model) / STAGE_SUMMARY).is_file():  # an export of this pipeline: name it by ratio
        keep = json.loads((Path(model) / STAGE_SUMMARY).read_text()).get("metrics", {}).get("keep_params")
        name = f"keep-{keep:g}" if keep is not None else None
    result = evaluate_models([model], teacher_dir, list(cfg.prompts), out, es,
                             names=[name] if name else None, progress=progress)  # fmt: skip
    m = [x for x in result.metrics.models if x.role != "teacher"][-1]
    metrics: dict[str, Any] = {
        "parameters": m.parameters, "parameters_ratio": m.parameters_ratio,
        "ms_per_step": m.latency.per_step_s * 1e3, "speedup": m.speedup, "fid": m.fid, "clip_score": m.clip_score,
    }  # fmt: skip
    if getattr(m, "memory", None) is not None and getattr(m.memory, "peak_bytes", None) is not None:
        metrics["peak_memory_mb"] = m.memory.peak_bytes / 2**20
    if m.fidelity is not None:
        metrics["latent_psnr_db"] = m.fidelity.latent_psnr_db
        metrics["latent_cosine"] = m.fidelity.latent_cosine
    return _finish("evaluate", out, metrics, cfg.model_dump(mode="json"))


def report(evaluations: list[str], out: str, settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Per-ratio evaluation folders (each with metrics.json) -> ``out``/report.html + plots
    (:func:`ppcl.report.build_report`). Metrics: evaluations, models (rows, teacher once), warnings."""
    from ppcl.report import build_report

    if not evaluations:
        raise PPCLError("report: no evaluation folders given")
    title = (settings or {}).get("title") or "ppcl: pruning ratios compared"
    result = build_report([Path(e) / "metrics.json" for e in evaluations], out, title=title)
    metrics = {"evaluations": len(evaluations), "models": len(result.rows), "warnings": len(result.warnings)}
    return _finish("report", out, metrics, settings)
