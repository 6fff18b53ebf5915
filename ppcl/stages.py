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
  distill opens its run before training (``ppcl.tracking.stage_run``) to log losses live, and hands that run
  to the seam, so the stage has one run whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from ppcl.errors import PPCLError

#: Name of the summary every stage writes beside its outputs (``<out>/stage.json``): stage, metrics, settings.
STAGE_SUMMARY = "stage.json"


def _settings(model: type, settings: dict[str, Any] | None, stage: str = "", drop: tuple[str, ...] = ()):
    """``settings`` validated by the stage's :mod:`ppcl.settings` model (one-line PPCLError naming the field)."""
    from ppcl.settings import validate_settings

    return validate_settings(model, {k: v for k, v in (settings or {}).items() if k not in drop})


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Keep the numeric, finite entries (KFP metrics and MLflow reject NaN/inf and non-numbers)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _track(stage: str, metrics: dict[str, float], out: str | os.PathLike, settings: dict[str, Any],
           run: Any = None) -> None:
    """Tracking seam: ``ppcl.tracking.log_stage(stage=, metrics=, artifacts=, settings=)`` if it exists; ``run``:
    the stage's MLflow run when the stage opened it itself (distill logs its losses live into it)."""
    try:
        from ppcl import tracking  # type: ignore[attr-defined]
    except ImportError:
        return
    log_stage = getattr(tracking, "log_stage", None)
    if log_stage is not None:
        extra = {"run": run} if run is not None else {}
        log_stage(stage=stage, metrics=metrics, artifacts=str(out), settings=settings, **extra)


def _finish(stage: str, out: str | os.PathLike, metrics: dict[str, Any], settings: dict[str, Any] | None,
            run: Any = None) -> dict[str, float]:
    from ppcl.atomic import write_json

    clean = _finite(metrics)
    out = Path(out)
    if out.is_dir():
        write_json(out / STAGE_SUMMARY, {"version": 1, "stage": stage, "metrics": clean, "settings": settings or {}})
    _track(stage, clean, out, settings or {}, run)
    return clean


def local_model(uri: str, scratch: str | os.PathLike) -> str:
    """A local folder for model ``uri``: s3:// prefixes are downloaded into ``scratch`` (once), others pass."""
    from ppcl import storage

    return str(storage.fetch(uri, scratch))


def check_family(model_dir: str, family: str | None) -> None:
    """If ``family`` is given, the pipeline at ``model_dir`` must be of it (checked from model_index.json)."""
    if not family:
        return
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return  # a hub id: the adapter checks the loaded transformer
    import importlib

    from ppcl.arch import FAMILIES, adapter_for
    from ppcl.custom_code import ppcl_width_class

    expected = adapter_for(family).transformer_class
    library, cls_name = (json.loads(index.read_text()).get("transformer") or [None, None])[:2]
    try:  # a width export names its custom-code module: ppcl's own class (no code of the folder is run)
        actual = (ppcl_width_class(model_dir, [library, cls_name], [adapter_for(f) for f in FAMILIES])
                  or getattr(importlib.import_module(library), cls_name))
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
    from ppcl.data.shard import shard_source
    from ppcl.settings import ShardSettings

    cfg = _settings(ShardSettings, settings, "shard")
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
    from ppcl.data.encode import encode_shards
    from ppcl.settings import EncodeSettings

    cfg = _settings(EncodeSettings, settings, "encode", drop=("family",))
    model = local_model(teacher, Path(out).parent / "teacher")
    check_family(model, (settings or {}).get("family"))
    manifest = encode_shards(model, data, out, resolution=cfg.resolution, batch_size=cfg.batch_size,
                             dtype=cfg.dtype, max_sequence_length=cfg.max_sequence_length,
                             negative_prompt=cfg.negative_prompt, progress=progress)  # fmt: skip
    metrics = {"samples": manifest.samples, "shards": len(manifest.shards), "resolution": manifest.resolution}
    return _finish("encode", out, metrics, cfg.model_dump(mode="json"))


def probe(teacher: str, cache: str, out: str, settings: dict[str, Any] | None = None, *,
          progress: bool = True) -> dict[str, float]:
    """Streaming similarity statistics of the teacher's blocks on cached calibration data -> ``out``/probe.json
    + plots (:func:`ppcl.probe.run_probe`). Metrics: blocks, intervals (probed), mean_cka, min_cka, forwards."""
    from ppcl.probe import run_probe
    from ppcl.settings import ProbeSettings

    cfg = _settings(ProbeSettings, settings, "probe", drop=("family",))
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
    from ppcl.plan import save_plan
    from ppcl.probe import load_probe
    from ppcl.select import check_score
    from ppcl.select import select as run_select
    from ppcl.settings import SelectSettings

    cfg = _settings(SelectSettings, settings, "select")
    if cfg.keep_params is None:
        raise PPCLError("select settings: field 'keep_params' is required (the plan's parameter budget)")
    probe_json = Path(probe_dir) / "probe.json"
    probe_result = load_probe(probe_json)
    check_score(probe_result, cfg.score, f"probe file {probe_json}")
    options = {k: getattr(cfg, k) for k in ("min_cka", "max_jump", "break_cost") if getattr(cfg, k) is not None}
    plan = run_select(probe_result, method=cfg.method, keep_params=cfg.keep_params, protect=cfg.protect,
                      allow_ends=cfg.allow_ends, init=cfg.init, seed=cfg.seed, score=cfg.score,
                      serve=cfg.serve, serve_subsets=cfg.serve_subsets, **options)  # fmt: skip
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


#: DistillConfig fields that shape the multi-node TrainJob rather than the training itself.
MULTINODE_FIELDS = ("nodes", "gpus_per_node")


def _distill_metrics(steps: int, plugs: int, final_losses: dict[str, float | None]) -> dict[str, Any]:
    losses = {k: v for k, v in final_losses.items() if v is not None}
    metrics: dict[str, Any] = {"steps": steps, "plugs": plugs,
                               "loss": sum(losses.values()) / len(losses) if losses else None}  # fmt: skip
    metrics.update({"loss_" + k.replace("/", "_").replace(".", "_"): v for k, v in losses.items()})
    return metrics


def distill(teacher: str, plan_dir: str, cache: str, out: str, settings: dict[str, Any] | None = None, *,
            progress: bool = True, cache_uri: str | None = None, out_uri: str | None = None) -> dict[str, float]:
    """Train every plug of the plan against the frozen teacher -> ``out`` (plugs.safetensors, run.json,
    metrics.jsonl, checkpoints; :func:`ppcl.distill.distill`).

    A folder left by an interrupted attempt (checkpoints, no run.json) is resumed, so a retried step (KFP
    ``set_retry`` after a lost node) continues instead of starting over. The stage's MLflow run is opened before
    training and the losses per plug and stream are logged into it live (every 10 steps), so a crashed run keeps
    its curve; the run ends FAILED then. Metrics: steps, plugs, loss (mean of the final losses),
    loss_<unit>_<stream> per plug and stream.

    ``settings["nodes"] > 1``: multi-node mode, see :func:`distill_multinode` (``cache_uri`` / ``out_uri``: the
    KFP artifact URIs of ``cache`` and ``out``, which the component passes).
    """
    from ppcl import tracking
    from ppcl.config import DistillConfig
    from ppcl.distill import distill as run_distill

    cfg = _settings(DistillConfig, settings, "distill", drop=("family",))
    if cfg.nodes > 1:
        return distill_multinode(teacher, plan_dir, cache, out, settings, cache_uri=cache_uri, out_uri=out_uri)
    model = local_model(teacher, Path(out).parent / "teacher")
    check_family(model, (settings or {}).get("family"))
    run = Path(out)
    resume = (run / "checkpoints").is_dir() and not (run / "run.json").exists()
    fields = cfg.model_dump(exclude=set(MULTINODE_FIELDS))  # the names of ppcl.distill.DistillSettings
    with tracking.stage_run("distill", out=out) as mlflow_run:  # closed FAILED if anything below raises
        hook = tracking.distill_callback(mlflow_run)
        try:
            if cfg.gpus_per_node > 1:  # one process per GPU of this pod (ppcl.launch); one GPU: this process
                from ppcl.launch import distill_on_gpus

                result = distill_on_gpus(model, Path(plan_dir) / "plan.json", run, data=cache, settings=cfg,
                                         resume=resume, on_step=hook)  # fmt: skip
            else:
                result = run_distill(model, Path(plan_dir) / "plan.json", run, data=cache, resume=resume,
                                     progress=progress, on_step=hook, **fields)  # fmt: skip
        except BaseException:
            if hook is not None:  # the curve up to the failure; a tracking error must not hide the real one
                with contextlib.suppress(Exception):
                    hook.flush()
            raise
        if hook is not None:
            hook.flush()
        metrics = _distill_metrics(result.steps, len(result.plugs), result.final_losses)
        return _finish("distill", out, metrics, cfg.model_dump(mode="json"), run=mlflow_run)


def distill_multinode(teacher: str, plan_dir: str, cache: str, out: str, settings: dict[str, Any] | None = None, *,
                      cache_uri: str | None = None, out_uri: str | None = None, namespace: str | None = None,
                      timeout_s: float | None = None) -> dict[str, float]:
    """The distill stage as a Kubeflow Trainer TrainJob of ``nodes`` x ``gpus_per_node`` (:mod:`ppcl.trainjob`).

    Every node must read the same inputs, so the teacher must be ``s3://`` and so must the cache (``cache`` itself
    or its artifact URI ``cache_uri``: KFP gives s3:// URIs when the pipeline root is an S3 bucket). The job's
    folder is ``<artifact root>/distill-jobs/<sha of out_uri or out>/`` (artifact root: ``$PPCL_ARTIFACT_ROOT`` or
    ``s3://$PPCL_BUCKET/ppcl-artifacts``, from the cluster ConfigMap): the stage uploads ``plan.json`` there, the
    job trains into ``run/`` (checkpoints included) with ``--resume``. The name of the job and of its folder
    follow from the output location, so a KFP retry of the step attaches to the running job, or replaces a
    failed one that resumes from its last checkpoint on S3. The step's log streams the job's rank-0 log; a
    failed job fails the step. When the job is complete, plugs.safetensors, metrics.jsonl and run.json are
    downloaded into ``out`` (checkpoints stay on S3; ``out``/trainjob.json says where).
    """
    import hashlib

    from ppcl import storage, tracking, trainjob
    from ppcl.atomic import write_json
    from ppcl.config import DistillConfig
    from ppcl.distill_s3 import FINAL_FILES
    from ppcl.settings import settings_cli_args

    cfg = _settings(DistillConfig, settings, "distill", drop=("family",))
    where = f"distill with nodes={cfg.nodes}"
    if not storage.is_s3(teacher):
        raise PPCLError(f"{where}: the teacher must be an s3:// URI every node can read, got {teacher!r}")
    data = cache if storage.is_s3(cache) else cache_uri
    if not data or not storage.is_s3(data):
        raise PPCLError(f"{where}: the cache must be on S3 so every node can read it, got {data or cache!r} (use an "
                        "s3:// pipeline root for Kubeflow Pipelines)")
    root = tracking.artifact_root()
    if root is None or not storage.is_s3(root):
        raise PPCLError(f"{where}: no S3 folder for the job's checkpoints: set PPCL_ARTIFACT_ROOT or PPCL_BUCKET")
    base = storage.join(root, "distill-jobs", hashlib.sha256(str(out_uri or out).encode()).hexdigest()[:16])
    plan_uri, job_out = storage.join(base, "plan.json"), storage.join(base, "run")
    plan_file = Path(plan_dir) / "plan.json"
    if not plan_file.is_file():
        raise PPCLError(f"{where}: {plan_file} does not exist")
    storage.check_bucket(base)
    storage.upload_file(plan_file, plan_uri)
    spec = trainjob.TrainJobSpec(model=teacher, plan=plan_uri, data=data, out_uri=job_out, nodes=cfg.nodes,
                                 gpus=cfg.gpus_per_node,
                                 # every node's `ppcl distill` flags, generated from the model: the same settings
                                 extra_args=settings_cli_args(cfg, exclude=MULTINODE_FIELDS))  # fmt: skip
    name = trainjob.submit(spec, namespace=namespace, timeout_s=timeout_s)
    done = storage.join(job_out, "run.json")
    if not storage.exists(done):
        raise PPCLError(f"{where}: TrainJob {name} completed but {done} is missing")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname in FINAL_FILES:  # each file atomically, run.json last (the run's completion marker)
        storage.download_file(storage.join(job_out, fname), out_dir / fname)
    write_json(out_dir / "trainjob.json", {"version": 1, "trainjob": name, "nodes": cfg.nodes,
                                           "gpus_per_node": cfg.gpus_per_node, "out": job_out,
                                           "checkpoints": storage.join(job_out, "checkpoints")})  # fmt: skip
    meta = json.loads((out_dir / "run.json").read_text())
    metrics = _distill_metrics(int(meta["steps"]), len(meta.get("plugs") or []), meta.get("final_losses") or {})
    return _finish("distill", out, metrics, cfg.model_dump(mode="json"))


def export(teacher: str, plan_dir: str, plugs: str, keep_params: float, out: str,
           settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Materialise the pruned pipeline at ``keep_params`` from the trained plugs -> pipeline folder ``out``
    (:func:`ppcl.export.export`; the subset of the plan's intervals is chosen by the export rule).

    Metrics: keep_params (requested), parameters (exported transformer, exact), parameters_ratio (achieved),
    intervals, far_from_asked (1 when the achieved fraction is far below the one requested: the export printed
    which plug subsets exist, see :func:`ppcl.export.far_from_asked_note`).
    """
    from ppcl.export import export as run_export
    from ppcl.settings import ExportSettings

    cfg = _settings(ExportSettings, {**(settings or {}), "keep_params": keep_params}, drop=("family",))
    model = local_model(teacher, Path(out).parent / "teacher")
    check_family(model, (settings or {}).get("family"))
    result = run_export(model, Path(plan_dir) / "plan.json", plugs, out, keep_params=cfg.keep_params,
                        intervals=cfg.intervals, all_intervals=cfg.all_intervals, dtype=cfg.dtype,
                        max_shard_size=cfg.max_shard_size)  # fmt: skip
    metrics = {"keep_params": keep_params, "parameters": result.parameters,
               "parameters_ratio": result.parameters / result.teacher_parameters,
               "intervals": len(result.intervals),
               "far_from_asked": 1.0 if getattr(result, "far_from_asked", None) else 0.0}  # fmt: skip
    return _finish("export", out, metrics, {"keep_params": keep_params})


def evaluate(model: str, teacher: str, out: str, settings: dict[str, Any] | None = None, *,
             name: str | None = None, progress: bool = True) -> dict[str, float]:
    """The pruned pipeline ``model`` against ``teacher`` on the configured prompts -> ``out``/metrics.json,
    grid.png, report.html (:func:`ppcl.evaluate.evaluate_models`).

    Metrics (of the pruned model): parameters, parameters_ratio, keep_params (the ratio asked of the export, when
    the model is one), ms_per_step, speedup (paired with the teacher), speedup_spread, speedup_unreliable (1 when
    the spread is too wide to trust), peak_memory_mb, and fid, clip_score, judge_accuracy, judge_image_accuracy,
    judge_fid, teacher_judge_accuracy, teacher_judge_fid, latent_psnr_db, latent_cosine where measured.
    """
    from ppcl.evaluate.evaluation import evaluate_models
    from ppcl.report import ratio_label
    from ppcl.settings import EvaluateSettings

    cfg = _settings(EvaluateSettings, settings, "evaluate", drop=("family",))
    teacher_dir = local_model(teacher, Path(out).parent / "teacher")
    check_family(teacher_dir, (settings or {}).get("family"))
    es = cfg.eval_settings()
    asked = None
    if (Path(model) / STAGE_SUMMARY).is_file():  # an export of this pipeline: name it by the ratio it achieved
        export_metrics = json.loads((Path(model) / STAGE_SUMMARY).read_text()).get("metrics", {})
        asked, achieved = export_metrics.get("keep_params"), export_metrics.get("parameters_ratio")
        if name is None and achieved is not None:
            name = ratio_label(achieved, asked)
    result = evaluate_models([model], teacher_dir, list(cfg.prompts), out, es,
                             names=[name] if name else None, progress=progress)  # fmt: skip
    t = result.metrics.models[0]
    m = [x for x in result.metrics.models if x.role != "teacher"][-1]
    metrics: dict[str, Any] = {
        "parameters": m.parameters, "parameters_ratio": m.parameters_ratio, "keep_params": asked,
        "ms_per_step": m.latency.per_step_s * 1e3, "speedup": m.speedup, "fid": m.fid, "clip_score": m.clip_score,
        "judge_accuracy": m.judge_accuracy, "judge_image_accuracy": m.judge_image_accuracy, "judge_fid": m.judge_fid,
        "teacher_judge_accuracy": t.judge_accuracy, "teacher_judge_fid": t.judge_fid,
    }  # fmt: skip
    if m.speedup_stats is not None:
        metrics["speedup_spread"] = m.speedup_stats.spread
        metrics["speedup_unreliable"] = 0.0 if m.speedup_stats.reliable else 1.0
    if getattr(m, "memory", None) is not None and getattr(m.memory, "peak_bytes", None) is not None:
        metrics["peak_memory_mb"] = m.memory.peak_bytes / 2**20
    if m.fidelity is not None:
        metrics["latent_psnr_db"] = m.fidelity.latent_psnr_db
        metrics["latent_cosine"] = m.fidelity.latent_cosine
    return _finish("evaluate", out, metrics, cfg.model_dump(mode="json"))


def report(evaluations: list[str], out: str, settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Per-ratio evaluation folders (each with metrics.json) -> ``out``/report.html + plots
    (:func:`ppcl.report.build_report`; ``out``/summary.txt holds one line per ratio, printed here too).
    Metrics: evaluations, models (rows, teacher once), warnings (comparability and untrusted speedups)."""
    from ppcl.report import build_report

    if not evaluations:
        raise PPCLError("report: no evaluation folders given")
    title = (settings or {}).get("title") or "ppcl: pruning ratios compared"
    result = build_report([Path(e) / "metrics.json" for e in evaluations], out, title=title)
    for w in result.warnings:
        print(f"report: warning: {w}", flush=True)
    for line in result.summary:
        print(f"report: {line}", flush=True)
    metrics = {"evaluations": len(evaluations), "models": len(result.rows), "warnings": len(result.warnings)}
    return _finish("report", out, metrics, settings)
