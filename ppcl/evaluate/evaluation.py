"""``evaluate_models``: the teacher and each pruned model on the same prompts and seeds; every metric; outputs.

Order of work, chosen so memory stays bounded and each model's peak memory is its own:
1. validate every input (prompts, pipeline folders, CLIP path, reference folder, FID extractor) before any
   output exists;
2. load the measuring networks (CLIP, FID extractor) and the reference statistics (cached);
3. for the teacher, then each model, ONE pipeline in memory at a time: a one-image generation that captures a
   transformer call (and warms up), all samples in batches (CLIP, FID and the judge updated per batch; the
   teacher's latents and 8-bit images spilled to a scratch folder on disk, read back batch by batch for each
   model's fidelity); the pipeline is freed before the next one is loaded, so each model's peak memory is its own;
4. speed, paired (:func:`ppcl.evaluate.cost.measure_paired`): the teacher's transformer, then each model's in
   turn beside it (transformers only: text encoders and VAE are freed), timed alternately on the teacher's
   captured call; the teacher's latency is the median over all its pairs;
5. grid.png, report.html, then metrics.json last (each atomic): a metrics.json exists only for a complete run.
Only the first ``grid_samples`` images of each model are kept in memory, for the grid (and, with the judge, every
image at 32 px).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ppcl.errors import PPCLError
from ppcl.evaluate.metrics import EvalMetrics, EvalSettings, ExtractorInfo, ModelMetrics, ReferenceInfo, Speedup

#: Generation settings when neither the caller nor the teacher's ppcl.json gives them (the values this evaluation
#: used before ppcl.json carried them).
FALLBACK_GENERATION = {"steps": 20, "height": 512, "width": 512}


@dataclass
class EvalResult:
    metrics: EvalMetrics
    out: Path
    metrics_path: Path
    grid_path: Path
    report_path: Path


@dataclass
class _Run:
    """What one model's pass produced, before the cross-model numbers (ratio, speedup) are known."""

    name: str
    path: Path
    role: str
    parameters: int = 0
    latency: object = None
    memory: object = None
    generation_s: float = 0.0
    fid: float | None = None
    clip_score: float | None = None
    judge: dict | None = None
    fidelity: object = None
    speedup: Speedup | None = None
    calls_per_step: int = 1
    grid_images: list[torch.Tensor] = field(default_factory=list)


def _check_pipeline_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise PPCLError(f"{what} not found: {path}")
    if not (path / "model_index.json").is_file():
        raise PPCLError(f"{what} is not a diffusers pipeline directory (no model_index.json): {path}")


def _names(teacher: Path, models: list[Path], names: list[str] | None) -> list[str]:
    wanted = ["teacher"] + (list(names) if names else [p.name or str(p) for p in models])
    if len(wanted) != len(models) + 1:
        raise PPCLError(f"got {len(names or [])} names for {len(models)} models")
    seen: dict[str, int] = {}
    out = []
    for n in wanted:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


@dataclass
class _Meters:
    """The measuring networks of one evaluation (each None when not asked for) and what metrics.json says of them."""

    scorer: object = None  # CLIP score
    clip_info: ExtractorInfo | None = None
    fid_acc: object = None  # FID against the reference images
    fid_info: ExtractorInfo | None = None
    ref_info: ReferenceInfo | None = None
    judge: object = None  # the synth judge: attribute accuracy, judge-FID
    judge_info: ExtractorInfo | None = None
    judge_ref: ReferenceInfo | None = None

    def reset(self) -> None:
        if self.judge:
            self.judge.reset()
        if self.scorer:
            self.scorer.reset()
        if self.fid_acc:
            self.fid_acc.reset_generated()

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        if self.scorer:
            self.scorer.update(images, prompts)
        if self.fid_acc:
            self.fid_acc.update(images, real=False)
        if self.judge:
            self.judge.update(images)

    def collect(self, run: _Run) -> None:
        run.clip_score = self.scorer.compute() if self.scorer else None
        run.fid = self.fid_acc.compute() if self.fid_acc else None
        run.judge = self.judge.compute() if self.judge else None


def evaluate_models(models: list[str | Path], teacher: str | Path, prompts: list[str], out: str | Path,
                    settings: EvalSettings | None = None, *, names: list[str] | None = None,
                    progress: bool = True) -> EvalResult:
    """Evaluate ``models`` against ``teacher`` and write ``out``/{metrics.json, grid.png, report.html}.

    Args:
        models: pruned pipeline directories (the teacher itself may be among them: a self-check).
        teacher: the teacher pipeline directory.
        prompts: the prompts; with ``settings.seeds`` seeds each.
        out: output folder (created; the three files inside are replaced atomically).
        settings: generation and measurement settings (defaults: :class:`EvalSettings`).
        names: display names of ``models`` (default: their folder names); the teacher is "teacher".
    Raises:
        PPCLError: bad input, before anything is written.
    """
    from ppcl.evaluate.generate import make_samples

    out, teacher, models = Path(out), Path(teacher), [Path(m) for m in models]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    # 1. everything validated before any work or output
    settings, all_names, use_judge, device, dtype = _resolve(models, teacher, prompts, settings or EvalSettings(),
                                                             names)
    samples = make_samples(prompts, settings.seeds, settings.seed_offset)
    # 2. measuring networks, 3. one pipeline at a time, then the paired timing
    meters = _meters(settings, samples, use_judge, device, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))
    runs: list[_Run] = []
    try:
        teacher_call = None
        for k, (name, path) in enumerate(zip(all_names, [teacher] + models)):
            run, call = _evaluate_pipeline(_Run(name, path, "teacher" if k == 0 else "model"), samples, settings,
                                           meters, scratch, device, dtype, progress)
            if k == 0:
                teacher_call = call  # the inputs every transformer is timed on
            runs.append(run)
        _time_paired(runs, teacher_call, settings, device, dtype)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # 4. outputs
    return _write_outputs(out, runs, settings, prompts, samples, teacher, meters)


def _resolve(models: list[Path], teacher: Path, prompts: list[str], settings: EvalSettings,
             names: list[str] | None) -> tuple[EvalSettings, list[str], bool, torch.device, torch.dtype]:
    """Check the inputs (one-line errors) and fill ``settings``: FID extractor, device, dtype, the teacher's generation
    defaults (ppcl.json) where the caller left a value unset. Returns the settings, the display names, whether the
    judge runs, and the device and dtype the settings now name."""
    from ppcl.arch import generation_defaults
    from ppcl.evaluate import fid as fid_mod
    from ppcl.evaluate.generate import resolve_device, resolve_dtype
    from ppcl.evaluate.judge import judge_weights_path, synth_attributes

    if not prompts:
        raise PPCLError("no prompts to evaluate")
    _check_pipeline_dir(teacher, "teacher")
    for m in models:
        _check_pipeline_dir(m, "model")
    all_names = _names(teacher, models, names)
    n_samples = len(prompts) * settings.seeds
    if settings.reference:
        ref_files = fid_mod.list_images(settings.reference)
        if n_samples < 2 or len(ref_files) < 2:
            raise PPCLError(f"FID needs at least 2 generated and 2 reference images, got {n_samples} samples and "
                            f"{len(ref_files)} reference images ({settings.reference})")
        fid_spec = settings.fid_features or ("clip" if settings.clip else None)
        if fid_spec is None:
            raise PPCLError("FID needs a feature extractor: pass --fid-features (pkg.mod:factory, inception:PATH) "
                            "or --clip PATH")
        if fid_spec == "clip" and not settings.clip:
            raise PPCLError("--fid-features clip needs a CLIP model: pass --clip PATH")
        settings = settings.model_copy(update={"fid_features": fid_spec})
    if settings.fid_features and not settings.reference:
        raise PPCLError("--fid-features given without --reference IMAGES: FID needs a reference set")
    use_judge = settings.judge
    if use_judge is None:  # auto: the judge reads synth captions and nothing else
        use_judge = synth_attributes(prompts) is not None and judge_weights_path().is_file()
    elif use_judge and synth_attributes(prompts) is None:
        bad = next(p for p in prompts if synth_attributes([p]) is None)
        raise PPCLError(f"--judge needs synth captions (ppcl synth), and prompt {bad!r} is not one")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    settings = settings.model_copy(update={"device": str(device), "dtype": str(dtype).removeprefix("torch.")})
    # The teacher's generation defaults (ppcl.json) fill what the caller left unset; every model is driven the
    # same way, and metrics.json records the values actually used.
    defaults = generation_defaults(teacher)
    settings = settings.model_copy(update={k: defaults[k] for k in ("steps", "height", "width", "guidance",
                                                                    "max_sequence_length")
                                           if getattr(settings, k) is None and defaults.get(k) is not None})
    # a folder without them: the sizes this evaluation always used (diffusers' own 1024 px is far too slow here)
    settings = settings.model_copy(update={k: v for k, v in FALLBACK_GENERATION.items() if getattr(settings, k) is None})
    return settings, all_names, bool(use_judge), device, dtype


def _meters(settings: EvalSettings, samples, use_judge: bool, device: torch.device, progress: bool) -> _Meters:
    """The measuring networks ``settings`` asks for: CLIP, the FID extractor with the reference statistics, the
    judge."""
    from ppcl.evaluate import clip as clip_mod
    from ppcl.evaluate import fid as fid_mod

    m = _Meters()
    clip = None
    if settings.clip:
        clip = clip_mod.load_clip(settings.clip, device)
        m.clip_info = ExtractorInfo(name=settings.clip, sha256=fid_mod.state_dict_sha256(clip[0]),
                                    num_features=int(clip[0].config.projection_dim))
        m.scorer = clip_mod.ClipScorer(*clip)
    if settings.reference:
        extractor = fid_mod.load_extractor(settings.fid_features, clip, settings.clip)
        m.fid_acc = fid_mod.FIDAccumulator(extractor, device)
        stats = fid_mod.reference_statistics(m.fid_acc, settings.reference, settings.height, settings.width,
                                             batch_size=settings.batch_size, cache_dir=settings.fid_cache_dir,
                                             progress=progress)
        m.fid_info = ExtractorInfo(name=extractor.name, sha256=extractor.sha256,
                                   num_features=int(m.fid_acc.metric.real_features_sum.numel()))
        m.ref_info = ReferenceInfo(path=str(settings.reference), sha256=stats.sha256, num_images=stats.num_images,
                                   statistics_cached=stats.cached)
    if use_judge:
        from ppcl.evaluate.judge import JudgeScorer

        m.judge = JudgeScorer([s.prompt for s in samples])
        m.judge_info = ExtractorInfo(name="ppcl-judge", sha256=m.judge.sha256, num_features=m.judge.num_features)
        m.judge_ref = ReferenceInfo(path="synth renders of the prompts' captions (ppcl.evaluate.judge)",
                                    sha256=m.judge.reference_sha256, num_images=len(samples), statistics_cached=False)
    return m


def _evaluate_pipeline(run: _Run, samples, settings: EvalSettings, meters: _Meters, scratch: Path,
                       device: torch.device, dtype, progress: bool):
    """One pipeline's pass: load it, generate every sample (the teacher's latents and images spilled to ``scratch``,
    a model's compared against them), feed the meters. Returns ``run`` filled and the transformer call of its
    first generation (the teacher's is the input every transformer is timed on)."""
    from safetensors.torch import load_file, save_file

    from ppcl.arch import count_parameters, get_adapter, load_pipeline
    from ppcl.evaluate.cost import PeakMemory, capture_transformer_call, release_memory
    from ppcl.evaluate.fidelity import FidelityAccumulator
    from ppcl.evaluate.generate import batched, generate
    from ppcl.progress import progress as tqdm

    gen_kw = dict(steps=settings.steps, height=settings.height, width=settings.width, guidance=settings.guidance,
                  max_sequence_length=settings.max_sequence_length)
    release_memory()
    with PeakMemory(device) as peak:
        pipe = load_pipeline(run.path, device=str(device), dtype=dtype)
        adapter = get_adapter(pipe.transformer)
        run.parameters = count_parameters(pipe.transformer)
        with capture_transformer_call(pipe.transformer) as call:
            generate(pipe, adapter, samples[:1], **gen_kw)  # also the warm-up of the whole pipeline
        run.calls_per_step = max(1, round(call.calls / settings.steps))
        meters.reset()
        fidelity = FidelityAccumulator()
        t0 = time.perf_counter()
        for b, batch in enumerate(tqdm(list(batched(samples, settings.batch_size)), desc=run.name, unit="batch",
                                       disable=not progress)):
            latents, images = generate(pipe, adapter, batch, **gen_kw)
            meters.update(images, [s.prompt for s in batch])
            spill = scratch / f"{b:06d}.safetensors"
            if run.role == "teacher":
                save_file({"latents": latents.contiguous(),
                           "images": (images * 255).round().to(torch.uint8).contiguous()}, str(spill))
            else:
                ref = load_file(str(spill))
                if ref["latents"].shape != latents.shape:
                    raise PPCLError(f"model {run.path} returns latents of shape {tuple(latents.shape)}, the "
                                    f"teacher {tuple(ref['latents'].shape)}: not comparable")
                fidelity.update(ref["latents"], latents, ref["images"].float() / 255.0, images)
            for s, img in zip(batch, images):
                if s.index < settings.grid_samples:
                    run.grid_images.append(img.clone())
            del latents, images
        run.generation_s = time.perf_counter() - t0
    run.memory = peak.result
    meters.collect(run)
    run.fidelity = fidelity.result() if run.role == "model" else None
    del pipe, adapter
    release_memory()
    return run, call


def _write_outputs(out: Path, runs: list[_Run], settings: EvalSettings, prompts: list[str], samples,
                   teacher: Path, meters: _Meters) -> EvalResult:
    """metrics.json, grid.png and report.html of the finished runs (``runs[0]`` is the teacher)."""
    from ppcl.atomic import atomic_path, write_bytes, write_json
    from ppcl.evaluate.grid import png_bytes, render_grid
    from ppcl.evaluate.html import render_report

    t = runs[0]
    entries = [
        ModelMetrics(
            name=r.name, path=str(r.path), role=r.role, parameters=r.parameters,
            parameters_ratio=r.parameters / t.parameters, latency=r.latency,
            speedup=1.0 if r is t else r.speedup.median, speedup_stats=None if r is t else r.speedup,
            memory=r.memory, generation_s=r.generation_s, fid=r.fid, clip_score=r.clip_score, fidelity=r.fidelity,
            judge_accuracy=r.judge["attribute_accuracy"] if r.judge else None,
            judge_image_accuracy=r.judge["image_accuracy"] if r.judge else None,
            judge_fid=r.judge["judge_fid"] if r.judge else None,
        )
        for r in runs
    ]
    metrics = EvalMetrics(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), settings=settings, prompts=prompts,
        samples=len(samples), teacher=str(teacher), fid_extractor=meters.fid_info, clip_model=meters.clip_info,
        reference=meters.ref_info, judge=meters.judge_info, judge_reference=meters.judge_ref, models=entries,
    )
    shown = samples[: settings.grid_samples]
    grid = render_grid([(r.name, r.grid_images) for r in runs], [f"{s.prompt}  (seed {s.seed})" for s in shown])
    grid_png = png_bytes(grid)
    out.mkdir(parents=True, exist_ok=True)
    # metrics.json goes last and its stale copy first: a failed write never leaves an old run's numbers
    # beside new images.
    (out / "metrics.json").unlink(missing_ok=True)
    write_bytes(out / "grid.png", grid_png)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render_report(metrics, grid_png), encoding="utf-8")
    write_json(out / "metrics.json", metrics.model_dump(mode="json"))
    return EvalResult(metrics, out, out / "metrics.json", out / "grid.png", out / "report.html")


def _transformer(path: Path, device, dtype):
    """The transformer of the pipeline at ``path`` alone, in eval mode (the rest of the pipeline is freed)."""
    from ppcl.arch import load_pipeline

    pipe = load_pipeline(path, device=str(device), dtype=dtype)
    transformer = pipe.transformer.eval()
    del pipe
    return transformer


def _time_paired(runs: list[_Run], call, settings: EvalSettings, device, dtype) -> None:
    """Step 4 of the module doc: fills every run's ``latency`` and each model's paired ``speedup``.

    Every model is timed on the TEACHER's captured call (identical inputs; a pruned model takes the same ones).
    Peak memory here is the teacher's transformer plus one model's, never a whole second pipeline.
    """
    from ppcl.evaluate.cost import latency_from_times, measure_paired, release_memory

    teacher = _transformer(runs[0].path, device, dtype)
    teacher_times: list[float] = []
    timer = None
    for run in runs[1:]:
        model = _transformer(run.path, device, dtype)
        paired = measure_paired(teacher, model, call, warmup=settings.latency_warmup, repeats=settings.latency_repeats)
        timer = paired.timer
        teacher_times += paired.teacher_s
        run.latency = latency_from_times(paired.model_s, warmup=paired.warmup, calls_per_step=run.calls_per_step,
                                         timer=paired.timer)
        run.speedup = paired.speedup(runs[0].calls_per_step, run.calls_per_step)
        del model
        release_memory()
    if not teacher_times:  # no model: the teacher alone, for its own row
        from ppcl.evaluate.cost import measure_latency

        runs[0].latency = measure_latency(teacher, call, warmup=settings.latency_warmup,
                                          repeats=settings.latency_repeats, calls_per_step=runs[0].calls_per_step)
    else:
        runs[0].latency = latency_from_times(teacher_times, warmup=settings.latency_warmup,
                                             calls_per_step=runs[0].calls_per_step, timer=timer)
    del teacher
    release_memory()
