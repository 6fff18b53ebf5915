"""``ppcl bench quality``: the paper's claims measured on the reference teacher (issue 9, method.md section 5).

One table at keep-params 0.7 and 0.5 (Markdown ``quality.md``, JSON ``quality.json``, plot ``quality.png``).

Shared by every row (so rows differ only in what the row names):

- data: ``synth`` images (seed 0, 32 px) -> ``shard`` -> ``encode`` with the teacher's own VAE and text encoders
  at ``max_sequence_length`` 16 (the teacher folder's ``ppcl.json``), built ONCE; every distillation reads it;
- one probe of the teacher on that cache; every selector reads the same probe.json;
- every distillation: same steps, batch, lr, logit-normal timesteps, seed, plug init (middle), output-level loss
  weight; two rows whose plans (intervals, init, mode) coincide share one run (deterministic, so training it
  twice would give the same plugs);
- evaluation: the first ``eval_n`` captions of :func:`ppcl.bench.teacher.eval_prompts` (seed 2000), image i from
  generator seed i, ``eval_steps`` Euler steps, true CFG 3 with the empty negative prompt, 16 text tokens; judge
  attribute accuracy (:func:`ppcl.bench.judge.judge_scores`, attributes from :func:`ppcl.data.synth.parse_caption`
  of the prompt), judge-FID against the real synth images of the same captions, teacher fidelity = latent PSNR of
  the final latents against the teacher's (same prompt and seed), latency ratio = median transformer forward at
  32 px / the teacher's (one image, ``ppcl.evaluate.cost.measure_latency``).

Rows (``plan`` = intervals; ``run`` = one distillation):

- ``teacher``.
- ``ppcl``: probe -> trained-plug probe (:mod:`ppcl.probe_trained`: ``trained_probe_steps`` steps for every interval
  of at most ``trained_probe_max_interval`` blocks the selector may pick, on the same cache with the runs'
  ``uncond_ratio``, each scored by the output error it causes under the evaluation's guidance; ``work/probe-trained``)
  -> ``select(method="ppcl", score=score, keep_params=0.5, serve=[0.7])``: the plan chosen for both ratios
  (:mod:`ppcl.select`, "Several ratios") -> ONE non-sequential run, its output-level term on the whole plan and the
  subset the export's size rule picks at 0.7 -> ``export`` at 0.7 (that subset) and at 0.5: one training run serves
  both ratios. ``serve="joint"`` exports and trains the subset the selection recorded instead (the table before
  "Which 0.7 model"); ``serve="none"`` selects for 0.5 alone. ``score="r2"`` gives the tables before the output
  score (the linear probe; its plan and 0.7 subset are the same with or without ``serve``).
- ``no-distill``: the intervals ``ppcl`` exports at that ratio, each replaced by its untrained plug, i.e. the
  teacher's own middle block of the interval kept and the others dropped (same parameters as ``ppcl``; the
  interval's blocks "simply removed", with the block every plug starts from left in place).
- ``shortgpt``, ``angular``, ``uniform``, ``random``: the baseline selectors at the same budget (0.5), each one run
  distilled exactly like ``ppcl`` and exported at both ratios by the same subset rule.
- ``scattered``: the same number of removed blocks as ``ppcl``'s 0.5 plan, no two adjacent: blocks taken in
  order of best single-block linear-probe R^2 (the PPCL probe's own per-block score), each removal expressed as
  a two-block interval; one run, exported at both ratios.
- ``sequential``: ``ppcl``'s plan, distilled in sequential mode (each plug fed by the previous plug's output).
- ``trained-probe`` (optional, not in the default rows): the plan ``select(method="ppcl", score="trained",
  keep_params=0.5)`` picks from the same trained-plug probe's local loss ratio, distilled and exported at both
  ratios like the baselines.
- ``per-ratio``: one run per ratio, each trained for its ratio alone (``output_loss_ratios`` empty); at 0.7 a
  plan selected at 0.7 alone with the same score (exported whole); at 0.5 ``ppcl``'s plan (exported whole), which is ``ppcl``'s own run when
  that run does not train the 0.7 subset too (``output_loss_ratios`` empty), else a run of its own.

The distillations run side by side, one single-threaded process per core (:func:`parallel_plan`): a run of this
1.5 M-parameter teacher gains little from a second thread, so two runs at once train 1.4-1.9x the steps per second
of one run on both cores (two measurements, ``python tests/bench_step.py``; docs/benchmark.md). Each process trains
its share of the runs in lockstep (:func:`ppcl.distill.distill_many`, shares balanced by :func:`groups`): every run
draws the same batches and noise, so one teacher pass per step serves all of them, bit for bit what each run would
compute alone. Each run is deterministic, so neither the order nor the grouping changes a number in the table.

Each row records whether it beats ``ppcl`` at the same ratio on judge accuracy (higher) and judge-FID (lower).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ppcl.errors import PPCLError

REFERENCE_TEACHER = Path(__file__).parent / "assets" / "reference-teacher"
RATIOS = (0.7, 0.5)
BASELINES = ("shortgpt", "angular", "uniform", "random")
#: rows a run may ask for that the default table leaves out
OPTIONAL_ROWS = ("trained-probe",)
#: values of ``QualitySettings.serve``
SERVE_MODES = ("plan", "joint", "none")


@dataclass
class QualitySettings:
    """Every knob of the benchmark (recorded in quality.json)."""

    ratios: tuple[float, ...] = RATIOS
    data_samples: int = 2048
    probe_samples: int = 256
    probe_timesteps: int = 4
    # Distillation: chosen by the sweep in docs/benchmark.md (the first table used 400 steps x 32 at lr 1e-3 with
    # no output-level loss and was undertrained: 0.81 judge accuracy at keep 0.5 where these settings reach ~0.95).
    # 1800: what two single-threaded runs side by side afford in the 30-minute budget with nine runs, PPCL's plan
    # of five short plugs among them (2500 with eight runs and a plan of two plugs; 2000 when the runs went one at
    # a time; docs/benchmark.md, "The output score")
    steps: int = 1800
    batch_size: int = 16
    lr: float = 1e-2
    warmup_steps: int = 20
    timesteps: str = "logit_normal"
    #: method.md's optional output-level loss (teacher vs student velocity, every plug in place), same for every run
    output_loss_weight: float = 1.0
    #: probability each plug is in place for the output-level term (``DistillSettings.output_loss_keep``)
    output_loss_keep: float = 1.0
    #: weight of loss D at each plug's end in the output-level term's whole-plan student
    #: (``DistillSettings.output_loss_sequential``; 0: off). 0.3 (docs/benchmark.md, "The sequential loss inside
    #: the output term"): over three training seeds it lowers the 0.5 model's judge-FID by 0.9 on average for 0.2
    #: points of accuracy at 0.7; weight 1 costs more at 0.7
    output_loss_sequential: float = 0.3
    #: moving average of the plug weights written as each run's plugs (``DistillSettings.ema_decay``; 0: off)
    ema_decay: float = 0.0
    #: ratios whose exported subsets the output-level term trains in turn with the whole plan
    #: (``DistillSettings.output_loss_ratios``): one run then serves both ratios (docs/benchmark.md, "one run for
    #: every ratio": 0.7 within 0.3 points of its own run, 0.5 within 0.8)
    output_loss_ratios: tuple[float, ...] = (0.7,)
    #: ``turns`` (one of those students per step) or ``every_step`` (all of them each step, the terms summed)
    #: (``DistillSettings.output_loss_schedule``)
    output_loss_schedule: str = "every_step"
    #: share of samples trained on the empty (negative) prompt, the unconditional branch the evaluation's true
    #: CFG runs (``DistillSettings.uncond_ratio``): the teacher's own 10% caption dropout (docs/benchmark.md,
    #: "The unconditional branch": keep 0.5 went 0.9600 -> 0.9764)
    uncond_ratio: float = 0.1
    eval_n: int = 512
    eval_steps: int = 10
    guidance: float = 3.0
    seed: int = 0
    #: the distillation runs' seed (batches, timesteps, noise) when not ``seed``; data, probe, the random selector
    #: and the evaluation keep ``seed``, so the table shows what training alone varies (docs/benchmark.md, "Noise")
    train_seed: int | None = None
    latency_repeats: int = 20
    threads: int | None = None
    #: distillation processes side by side (default: one per core; see :func:`parallel_plan`)
    workers: int | None = None
    rows: tuple[str, ...] = ("ppcl", "no-distill", *BASELINES, "scattered", "sequential", "per-ratio")
    #: the ``ppcl`` row's interval score (:func:`ppcl.select.select`): ``output`` (the trained-plug probe's output
    #: error, docs/benchmark.md "The output score"), ``trained`` or ``r2`` (the linear probe: the tables before it)
    score: str = "output"
    #: the trained-plug probe behind the ``output`` / ``trained`` scores and the optional ``trained-probe`` row:
    #: steps, longest interval (blocks) and held-out batches
    trained_probe_steps: int = 100
    trained_probe_max_interval: int = 5
    trained_probe_eval_batches: int = 8
    #: how the ``ppcl`` row's plan serves the higher ratios (docs/benchmark.md, "Which 0.7 model"): ``plan`` (the
    #: plan ``select(serve=...)`` chooses for all ratios together, each higher ratio then exported and trained with the
    #: subset the export's size rule picks from it: ``serve_subsets="size_rule"``, the product's default), ``joint``
    #: (that plan AND the subsets the selection records in ``Plan.serves``) or ``none`` (the plan selected for the
    #: lowest ratio alone, size rule above it)
    serve: str = "plan"

    @classmethod
    def smoke(cls) -> "QualitySettings":
        """Minutes on 2 cores: the whole table's machinery, few steps and prompts (numbers not meaningful)."""
        # warm-up below the 3 steps: a warm-up the run never finishes is refused (ppcl.settings.DistillSettings)
        return cls(data_samples=64, probe_samples=16, probe_timesteps=2, steps=3, warmup_steps=2, batch_size=8, eval_n=8,
                   eval_steps=2, latency_repeats=2, rows=("ppcl", "no-distill", "shortgpt", "scattered", "per-ratio"),
                   trained_probe_steps=2, trained_probe_eval_batches=1)


@dataclass
class Row:
    name: str
    ratio: float | None
    parameters: int
    params_ratio: float
    latency_ratio: float
    judge_accuracy: float
    image_accuracy: float
    judge_fid: float
    latent_psnr_db: float | None
    intervals: list[list[int]] = field(default_factory=list)
    run: str | None = None
    beats_ppcl: dict[str, bool] | None = None
    note: str = ""
    #: standard error of this row's judge-FID minus ppcl's at the same ratio (paired bootstrap, fid_difference_se)
    judge_fid_diff_se: float | None = None
    #: standard error of this row's judge accuracy minus ppcl's at the same ratio (paired, accuracy_difference_se)
    judge_accuracy_diff_se: float | None = None


def _log(msg: str, t0: float) -> None:
    print(f"[bench quality {time.time() - t0:6.0f}s] {msg}", flush=True)


def scattered_plan(probe, adapter, remove: int, seed: int = 0):
    """``remove`` blocks as scattered as the budget allows: blocks in order of best single-block probe R^2, first
    only blocks with no removed neighbour, then (when more are needed than can stand apart: 9 of 14 removable
    blocks cannot) the rest in the same order. Each maximal run of removed blocks becomes one interval as in
    :func:`ppcl.select.scattered_to_intervals`."""
    from ppcl.plan import make_plan
    from ppcl.select import Budget, SelectionContext, scattered_to_intervals

    ctx = SelectionContext(probe=probe, budget=Budget(remove_blocks=remove), seed=seed)
    order = sorted((i for i in range(ctx.L) if ctx.removable(i)),
                   key=lambda i: (-(probe.blocks[i].r2 if probe.blocks[i].r2 is not None else -1e9), i))
    removed: set[int] = set()
    intervals: list[tuple[int, int]] = []
    for apart in (True, False):
        for i in order:
            if len(removed) == remove or i in removed or (apart and (i - 1 in removed or i + 1 in removed)):
                continue
            trial = scattered_to_intervals(ctx, removed | {i})
            if trial is None:
                continue
            removed.add(i)
            intervals = trial
    if len(removed) != remove:
        raise PPCLError(f"scattered ablation: only {len(removed)} of {remove} blocks can be removed")
    return make_plan(adapter, intervals, selection={"method": "scattered", "removed_blocks": sorted(removed)})


def select_ppcl(probe, keep_params: float, seed: int = 0, score: str = "r2", serve: list[float] | None = None,
                serve_subsets: str = "size_rule"):
    """``select(method="ppcl")`` with its default thresholds (it meets every feasible budget: flat runs are a
    preference in its cost, not a filter), the interval ``score``, the ratios the plan must also ``serve`` and
    what it leaves them (``serve_subsets``)."""
    from ppcl.select import select

    return select(probe, method="ppcl", keep_params=keep_params, seed=seed, score=score, serve=serve or (),
                  serve_subsets=serve_subsets)


def trained_probe(probe, teacher_dir: Path, work: Path, adapter, s: "QualitySettings", timings: dict[str, float],
                  t0: float):
    """``probe`` with the trained-plug probe's scores (:mod:`ppcl.probe_trained`) of the intervals the selector may
    pick (it keeps the first and last blocks), at most ``trained_probe_max_interval`` blocks long, trained on the
    table's cache with its unconditional share and scored under its guidance; written to ``work/probe-trained``."""
    from ppcl.probe import write_probe
    from ppcl.probe_trained import default_candidates, trained_interval_scores

    t_tp = time.time()
    last = len(probe.blocks) - 1
    usable = [(a, b) for a, b in default_candidates(adapter, min(probe.max_interval, s.trained_probe_max_interval))
              if 0 < a and b < last]
    scores = trained_interval_scores(str(teacher_dir), str(work / "cache"), candidates=usable,
                                     steps=s.trained_probe_steps, seed=s.seed, eval_batches=s.trained_probe_eval_batches,
                                     uncond_ratio=s.uncond_ratio, output_guidance=s.guidance, progress=False)
    scored = probe.model_copy(update={"trained": scores})
    write_probe(scored, work / "probe-trained", plots=False)
    timings["trained_probe"] = time.time() - t_tp
    _log(f"trained-plug probe: {len(scores.intervals)} intervals x {s.trained_probe_steps} steps in "
         f"{timings['trained_probe']:.0f}s", t0)
    return scored


def _untrained_pruned(teacher_dir: Path, plan, chosen: list[int]):
    """Teacher pipeline with ``chosen`` plan intervals replaced by their untrained plugs (the interval's middle
    teacher block), built by the same surgery as :func:`ppcl.export.export`."""
    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.distill import build_units, student_layout
    from ppcl.export import build_pruned_transformer

    pipe = load_pipeline(teacher_dir)
    adapter = get_adapter(pipe)
    units = build_units(adapter, plan)
    selected = [u for u in units if u.kind != "interval" or u.index in chosen]
    lists, keep, _ = student_layout(adapter, selected)
    pipe.transformer = build_pruned_transformer(adapter, selected, [], lists, keep).eval()
    return pipe


class _Evaluator:
    """Generates the fixed evaluation set with any pipeline and scores it against the teacher's generations."""

    def __init__(self, teacher_dir: Path, s: QualitySettings):
        import torch

        from ppcl.arch import generation_defaults
        from ppcl.bench.judge import judge_features, load_judge, synth_batch
        from ppcl.bench.teacher import EVAL_SEED, eval_prompts
        from ppcl.data.synth import parse_caption

        self.s = s
        self.defaults = generation_defaults(teacher_dir)
        self.prompts, attrs, self.seeds = eval_prompts(s.eval_n)
        # attributes as the caption states them (what the judge scores), checked against the generator's record
        self.attrs = [parse_caption(p) for p in self.prompts]
        for p, a, b in zip(self.prompts, self.attrs, attrs):
            if a.get("kind") != b.get("kind"):
                raise AssertionError(f"parse_caption disagrees with synth on {p!r}")
        self.real, _ = synth_batch(s.eval_n, EVAL_SEED, 32)
        self.judge = load_judge()
        self.real_features = judge_features(self.real, self.judge).double().numpy()
        #: judge features of the images of the last call (for the paired FID comparisons)
        self.last_features = None
        #: per-image (correct checks, stated attributes) of the last call (for the paired accuracy comparisons)
        self.last_hits = None
        self.teacher_latents = None
        self.teacher_latency = None
        torch.manual_seed(0)

    def __call__(self, pipe, name: str) -> dict[str, Any]:
        import torch

        from ppcl.arch import count_parameters, get_adapter
        import numpy as np

        from ppcl.bench.judge import judge_features, judge_scores
        from ppcl.evaluate.cost import capture_transformer_call, measure_latency
        from ppcl.evaluate.fid import frechet_distance
        from ppcl.evaluate.fidelity import fidelity
        from ppcl.evaluate.generate import Sample, batched, generate

        pipe.set_progress_bar_config(disable=True)
        adapter = get_adapter(pipe)
        samples = [Sample(i, i, p, sd) for i, (p, sd) in enumerate(zip(self.prompts, self.seeds))]
        h, w = self.defaults.get("height", 32), self.defaults.get("width", 32)
        lat, img = [], []
        with capture_transformer_call(pipe.transformer) as call:
            for batch in batched(samples, 64):
                lt, im = generate(pipe, adapter, batch, steps=self.s.eval_steps, height=h, width=w,
                                  guidance=self.s.guidance, max_sequence_length=self.defaults.get("max_sequence_length"))
                lat.append(lt)
                img.append(im)
        latents, images = torch.cat(lat), torch.cat(img)
        one = _first_sample_call(call)
        latency = measure_latency(pipe.transformer, one, warmup=3, repeats=self.s.latency_repeats).median_s
        scores = judge_scores(images, self.attrs, self.judge, per_image=True)
        a, b = judge_features(images, self.judge).double().numpy(), self.real_features
        self.last_features = a
        self.last_hits = (np.array(scores["per_image_hits"]), np.array(scores["per_image_checks"]))
        out = {
            "parameters": count_parameters(pipe.transformer),
            "latency_s": latency,
            "judge_accuracy": scores["attribute_accuracy"],
            "image_accuracy": scores["image_accuracy"],
            "judge_fid": frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)),
        }
        if self.teacher_latents is None:
            self.teacher_latents, self.teacher_latency = latents, latency
            out["latent_psnr_db"] = None
        else:
            out["latent_psnr_db"] = fidelity(self.teacher_latents, latents).latent_psnr_db
        out["latency_ratio"] = latency / self.teacher_latency
        return out


def _first_sample_call(call):
    """The captured first transformer call cut to ONE image (batch dimension 0 of every batched tensor)."""
    import torch

    from ppcl.evaluate.cost import CapturedCall

    b = call.kwargs["hidden_states"].shape[0]

    def cut(x):
        return x[:1] if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == b else x

    return CapturedCall(args=tuple(cut(a) for a in call.args), kwargs={k: cut(v) for k, v in call.kwargs.items()},
                        calls=1)


def run_quality(out: str | Path, settings: QualitySettings | None = None, *, teacher: str | Path | None = None,
                keep_work: bool = True) -> dict[str, Any]:
    """Run the benchmark; write ``out``/quality.{json,md,png} (and ``out/work``: cache, probe, plans, runs,
    exported models). Returns the quality.json content."""
    import torch

    s = settings or QualitySettings()
    t0 = time.time()
    cpu0 = _cpu_seconds()
    teacher_dir = Path(teacher) if teacher else REFERENCE_TEACHER
    if not (teacher_dir / "model_index.json").is_file():
        raise PPCLError(f"reference teacher not found: {teacher_dir} (no model_index.json)")
    if any(not 0 < r <= 1 for r in s.ratios):
        raise PPCLError(f"ratios must be in (0, 1] (got {list(s.ratios)})")
    if s.serve not in SERVE_MODES:
        raise PPCLError(f"serve must be one of {', '.join(SERVE_MODES)} (got {s.serve!r})")
    unknown = sorted(set(s.rows) - set(QualitySettings().rows) - set(OPTIONAL_ROWS))
    if unknown:
        raise PPCLError(f"unknown benchmark row {unknown[0]!r}")
    out = Path(out)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if s.threads:
        torch.set_num_threads(s.threads)

    from ppcl.probe import run_probe

    # ---- data, once
    defaults = build_cache(teacher_dir, work, s)
    timings: dict[str, float] = {"data": time.time() - t0}
    _log(f"cache of {s.data_samples} samples at {defaults.get('height', 32)} px, text length "
         f"{defaults.get('max_sequence_length')}", t0)

    # ---- probe, once
    probe = run_probe(str(teacher_dir), work / "probe", data=str(work / "cache"), samples=s.probe_samples,
                      timesteps=s.probe_timesteps, batch_size=16, seed=s.seed, progress=False, plots=False)
    timings["probe"] = time.time() - t0 - sum(timings.values())
    _log("probe done", t0)

    # ---- plans (every selector on the one probe), then the runs they need (each distinct run once)
    low = min(s.ratios)
    plans, per_ratio = make_plans(probe, teacher_dir, work, s, timings, t0)
    train_seed = s.seed if s.train_seed is None else s.train_seed
    dkw = dict(steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps, timesteps=s.timesteps,
               seed=train_seed, checkpoint_every=10**9, mixed_precision="no", use_8bit_adam=False, progress=False,
               output_loss_weight=s.output_loss_weight, output_loss_keep=s.output_loss_keep,
               output_loss_sequential=s.output_loss_sequential, output_loss_ratios=list(s.output_loss_ratios),
               output_loss_schedule=s.output_loss_schedule,
               ema_decay=s.ema_decay, uncond_ratio=s.uncond_ratio)
    runs, jobs = plan_runs(plans, per_ratio, work, s, dkw, t0)

    # ---- distillation runs, all with the same settings, run side by side (one process per core)
    t_distill = time.time()
    run_seconds, run_groups = distill_runs(teacher_dir, work, jobs, dkw, s, t0)
    timings["distill"] = time.time() - t_distill

    # ---- evaluation
    t_eval = time.time()
    rows = evaluate_rows(teacher_dir, work, plans, per_ratio, runs, s, t0)
    timings["evaluate"] = time.time() - t_eval

    result = {
        "version": 1,
        "teacher": str(teacher_dir),
        "generation": defaults,
        "settings": {**asdict(s), "ratios": list(s.ratios), "rows": list(s.rows),
                     "output_loss_ratios": list(s.output_loss_ratios)},
        "plans": {k: {"intervals": [list(iv) for iv in p.intervals], "keep_fraction": p.params.student / p.params.teacher,
                      "serves": {r: [list(p.intervals[i]) for i in ids] for r, ids in p.serves.items()}}
                  for k, p in {**plans, **{f"ppcl-{r:g}": p for r, p in per_ratio.items()}}.items()},
        "rows": [asdict(r) for r in rows],
        "targets": targets([asdict(r) for r in rows], low),
        "seconds": {**timings, "total": time.time() - t0, "distill_runs": run_seconds},
        "distill_processes": {"processes": len(run_groups),
                              "threads_each": parallel_plan(len(jobs), s.workers, s.threads)[1],
                              "lockstep_groups": run_groups},
        "cpu_seconds": _cpu_seconds() - cpu0,
        "threads": torch.get_num_threads(),
    }
    from ppcl.atomic import write_bytes, write_json

    write_json(out / "quality.json", result)
    write_bytes(out / "quality.md", markdown(result).encode())
    write_bytes(out / "quality.png", plot(result))
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"done: {out / 'quality.md'}", t0)
    return result


def build_cache(teacher_dir: Path, work: Path, s: QualitySettings) -> dict[str, Any]:
    """The latent cache every row trains on (``work/cache``): synth images at the teacher's resolution, sharded,
    encoded with the teacher's VAE and text encoders. Returns the teacher's generation defaults."""
    from ppcl.arch import generation_defaults
    from ppcl.data.encode import encode_shards
    from ppcl.data.shard import shard_source
    from ppcl.data.synth import write_synth

    defaults = generation_defaults(teacher_dir)
    res = defaults.get("height", 32)
    write_synth(work / "synth", s.data_samples, size=res, seed=s.seed)
    shard_source(str(work / "synth"), str(work / "shards"), 2, progress=False)
    encode_shards(str(teacher_dir), str(work / "shards"), str(work / "cache"), resolution=res, batch_size=64,
                  progress=False)
    shutil.rmtree(work / "synth")
    return defaults


def evaluate_rows(teacher_dir: Path, work: Path, plans: dict[str, Any], per_ratio: dict[float, Any],
                  runs: dict[str, Path], s: QualitySettings, t0: float) -> list[Row]:
    """Every row of the table: the teacher, then per ratio each row's export of its run (``work/models``) through
    the one evaluator."""
    from ppcl.arch import load_pipeline
    from ppcl.export import export

    ev = _Evaluator(teacher_dir, s)
    low = min(s.ratios)
    rows: list[Row] = []
    teacher_pipe = load_pipeline(teacher_dir)
    m = ev(teacher_pipe, "teacher")
    total = m["parameters"]
    rows.append(Row("teacher", None, total, 1.0, 1.0, m["judge_accuracy"], m["image_accuracy"], m["judge_fid"], None))
    del teacher_pipe
    _log(f"teacher: accuracy {m['judge_accuracy']:.4f}, FID {m['judge_fid']:.2f}", t0)

    features: dict[tuple[str, float], Any] = {}
    hits: dict[tuple[str, float], Any] = {}

    def add(name: str, ratio: float, pipe, plan, chosen: list[int], run: str | None, note: str = "") -> None:
        m = ev(pipe, name)
        features[(name, ratio)] = ev.last_features
        hits[(name, ratio)] = ev.last_hits
        rows.append(Row(name, ratio, m["parameters"], m["parameters"] / total, m["latency_ratio"],
                        m["judge_accuracy"], m["image_accuracy"], m["judge_fid"], m["latent_psnr_db"],
                        [list(plan.intervals[k]) for k in chosen], run, note=note))
        _log(f"{name} @ {ratio:g}: params {m['parameters'] / total:.3f}, accuracy {m['judge_accuracy']:.4f}, "
             f"FID {m['judge_fid']:.2f}, PSNR {m['latent_psnr_db']}", t0)

    def exported(name: str, plan, run: Path, ratio: float, **kw):
        d = work / "models" / f"{name}-{ratio:g}"
        res_ = export(str(teacher_dir), plan, run, d, **(kw or {"keep_params": ratio}))
        return load_pipeline(d), res_.intervals

    for ratio in s.ratios:
        pipe, chosen = exported("ppcl", plans["ppcl"], runs["ppcl"], ratio)
        add("ppcl", ratio, pipe, plans["ppcl"], chosen, "ppcl")
        if "no-distill" in s.rows:
            add("no-distill", ratio, _untrained_pruned(teacher_dir, plans["ppcl"], chosen), plans["ppcl"], chosen,
                None, "ppcl's intervals, untrained plugs (middle teacher block kept)")
        for name in (*BASELINES, "scattered", "sequential", "trained-probe"):
            if name not in s.rows:
                continue
            plan = plans.get(name, plans["ppcl"])
            if name == "scattered" and ratio == low:
                # the same NUMBER of blocks as ppcl's plan: single blocks weigh less than ppcl's mix, so this
                # row keeps a little more than the budget (its params column says how much)
                pipe, ch = exported(name, plan, runs[name], ratio, all_intervals=True)
                add(name, ratio, pipe, plan, ch, name, "same number of removed blocks as ppcl's plan")
                continue
            pipe, ch = exported(name, plan, runs[name], ratio)
            add(name, ratio, pipe, plan, ch, name)
        if "per-ratio" in s.rows:
            if ratio == low and f"ppcl-{low:g}" not in runs:
                src = next(r for r in rows if r.name == "ppcl" and r.ratio == ratio)
                rows.append(Row(**{**asdict(src), "name": "per-ratio", "note": "the 0.5 run is ppcl's own run"}))
                features[("per-ratio", ratio)] = features[("ppcl", ratio)]
                hits[("per-ratio", ratio)] = hits[("ppcl", ratio)]
            elif ratio == low:
                pipe, ch = exported(f"ppcl-{low:g}", plans["ppcl"], runs[f"ppcl-{low:g}"], ratio, all_intervals=True)
                add("per-ratio", ratio, pipe, plans["ppcl"], ch, f"ppcl-{low:g}",
                    "ppcl's plan, a run for this ratio alone (whole plan in the output-level term)")
            else:
                pipe, ch = exported(f"ppcl-{ratio:g}", per_ratio[ratio], runs[f"ppcl-{ratio:g}"], ratio,
                                    all_intervals=True)
                add("per-ratio", ratio, pipe, per_ratio[ratio], ch, f"ppcl-{ratio:g}", "plan selected at this ratio, own run")
    compare_with_ppcl(rows, features, ev.real_features, hits)
    return rows


def compare_with_ppcl(rows: list[Row], features: dict[tuple[str, float], Any], reference,
                      hits: dict[tuple[str, float], Any] | None = None) -> None:
    """Fill ``beats_ppcl``, ``judge_fid_diff_se`` and (with ``hits``) ``judge_accuracy_diff_se`` of every row with a
    ratio: higher judge accuracy beats ppcl; a lower judge-FID beats it only by more than the standard error of the
    difference (issue 19: "on judge-FID or within its standard error"), from a paired bootstrap of the 512 samples
    (:func:`fid_difference_se`). The accuracy's paired standard error (:func:`accuracy_difference_se`) is reported,
    not used: the issue asks for a lead on accuracy outright."""
    from ppcl.bench.judge import accuracy_difference_se, fid_difference_se

    for r in rows:
        if r.ratio is None or r.name == "ppcl":
            continue
        ref = next(x for x in rows if x.name == "ppcl" and x.ratio == r.ratio)
        r.judge_fid_diff_se = fid_difference_se(features[(r.name, r.ratio)], features[("ppcl", r.ratio)], reference)
        if hits is not None:
            (ha, checks), (hb, _) = hits[(r.name, r.ratio)], hits[("ppcl", r.ratio)]
            r.judge_accuracy_diff_se = accuracy_difference_se(ha, hb, checks)
        r.beats_ppcl = {"judge_accuracy": r.judge_accuracy > ref.judge_accuracy,
                        "judge_fid": r.judge_fid < ref.judge_fid - r.judge_fid_diff_se}


def make_plans(probe, teacher_dir: Path, work: Path, s: QualitySettings, timings: dict[str, float], t0: float
               ) -> tuple[dict[str, Any], dict[float, Any]]:
    """Every row's plan at the lowest ratio (``plans``, by row) and the plans selected at the other ratios
    (``per_ratio``), all written to ``work/plans``."""
    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.plan import save_plan
    from ppcl.select import select

    low = min(s.ratios)
    adapter = get_adapter(load_pipeline(teacher_dir))
    scored = probe
    if s.score != "r2" or "trained-probe" in s.rows:
        scored = trained_probe(probe, teacher_dir, work, adapter, s, timings, t0)
    higher = [r for r in s.ratios if r != low]
    serve = higher if s.serve != "none" else None
    plans: dict[str, Any] = {"ppcl": select_ppcl(scored, low, s.seed, s.score, serve=serve,
                                                 serve_subsets="joint" if s.serve == "joint" else "size_rule")}
    if plans["ppcl"].serves:
        _log("ppcl plan " + ", ".join(f"{k}: {[list(plans['ppcl'].intervals[i]) for i in v]}"
                                      for k, v in plans["ppcl"].serves.items()) + " (the subsets it serves)", t0)
    for m in BASELINES:
        if m in s.rows:
            plans[m] = select(probe, method=m, keep_params=low, seed=s.seed)
    if "scattered" in s.rows:
        plans["scattered"] = scattered_plan(probe, adapter, sum(e - st for st, e in plans["ppcl"].intervals), s.seed)
    if "trained-probe" in s.rows:
        plans["trained-probe"] = select(scored, method="ppcl", score="trained", keep_params=low, seed=s.seed)
    per_ratio = {r: select_ppcl(scored, r, s.seed, s.score) for r in higher}
    for name, plan in plans.items():
        save_plan(plan, work / "plans" / f"{name}.json")
    for r, plan in per_ratio.items():
        save_plan(plan, work / "plans" / f"ppcl-{r:g}.json")
    return plans, per_ratio


def plan_runs(plans: dict[str, Any], per_ratio: dict[float, Any], work: Path, s: QualitySettings,
              dkw: dict[str, Any], t0: float) -> tuple[dict[str, Path], dict[str, tuple[str, dict[str, Any]]]]:
    """The run folder of every row (``runs``) and the distillations to do (``jobs``: run name -> (plan file, settings
    beyond ``dkw``)), longest first; rows whose plan and settings coincide share one run."""
    low = min(s.ratios)
    runs: dict[str, Path] = {}
    jobs: dict[str, tuple[str, dict[str, Any]]] = {}  # run name -> (plan file, extra settings)
    trained: dict[tuple, str] = {}  # (intervals, settings) -> run: a plan two selectors agree on is trained once
    plugs: dict[str, int] = {}

    def train(name: str, plan, plan_file: Path, **kw) -> Path:
        key = (tuple(tuple(iv) for iv in plan.intervals), plan.init, json.dumps({**dkw, **kw}, sort_keys=True))
        if key in trained:  # deterministic: the same plan and settings give the same plugs
            _log(f"distill {name}: same plan and settings as {trained[key]}, its run reused", t0)
            return work / "runs" / trained[key]
        trained[key] = name
        jobs[name] = (str(plan_file), kw)
        plugs[name] = len(plan.intervals)
        return work / "runs" / name

    for name, plan in plans.items():
        runs[name] = train(name, plan, work / "plans" / f"{name}.json")
    if "sequential" in s.rows:
        runs["sequential"] = train("sequential", plans["ppcl"], work / "plans" / "ppcl.json", mode="sequential",
                                  output_loss_sequential=0.0)
    if "per-ratio" in s.rows:
        # one run per ratio, each trained for its own ratio alone (no exported subsets in its output term)
        for r, plan in per_ratio.items():
            runs[f"ppcl-{r:g}"] = train(f"ppcl-{r:g}", plan, work / "plans" / f"ppcl-{r:g}.json",
                                        output_loss_ratios=[])
        if s.output_loss_ratios:  # ppcl's own run also trains the 0.7 subset: the 0.5-only run is another run
            runs[f"ppcl-{low:g}"] = train(f"ppcl-{low:g}", plans["ppcl"], work / "plans" / "ppcl.json",
                                          output_loss_ratios=[])
    # longest first (a step costs more with more plugs), so the last runs on the two cores end close together
    jobs = dict(sorted(jobs.items(), key=lambda kv: -plugs[kv[0]]))
    return runs, jobs


def parallel_plan(jobs: int, workers: int | None, threads: int | None) -> tuple[int, int]:
    """``(processes, torch threads each)`` for ``jobs`` distillation runs: by default one process per core, one
    thread each. A run of the reference teacher is too small for a second thread to pay much (one step: 136 ms on
    one thread, 123 ms on two, same machine), so two single-threaded runs side by side train 1.4-1.9x the steps
    per second of one run on two threads; ``threads`` is the total, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total = threads or cores
    procs = max(1, min(jobs, workers or total))
    return procs, max(1, total // procs)


def groups(costs: dict[str, float], n: int) -> list[list[str]]:
    """``costs`` (run name -> estimated cost of a step beyond the shared teacher pass) split into ``n`` lockstep
    groups of about equal cost: the costliest first, each to the cheapest group so far. Empty groups dropped."""
    out: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for name in sorted(costs, key=lambda k: -costs[k]):
        i = load.index(min(load))
        out[i].append(name)
        load[i] += costs[name]
    return [g for g in out if g]


def step_cost(plan_file: str, kw: dict[str, Any]) -> float:
    """A run's cost per step beyond the shared teacher pass, in blocks run forward and backward: its plugs (one
    block each), plus the output-level term's student from the first plug on (each interval one block), once per
    student a step runs (``output_loss_schedule`` every_step: the whole plan and one per ratio, each counted as the
    whole plan's, an upper bound; sequential mode runs one). Blocks, not parameters: a step of this small teacher
    is bound by per-kernel overhead, and a dual block costs about what a single one does (block counts predicted
    the first lockstep table's two groups at 36 : 45, measured 2.9 : 2.2 steps/s; parameters predicted them
    equal). Only the balance of :func:`groups` uses it."""
    plan = json.loads(Path(plan_file).read_text())
    n = plan["teacher"]["num_blocks"]
    intervals = [tuple(iv) for iv in plan["intervals"]]
    if not intervals or not kw.get("output_loss_weight", 0):
        return float(len(intervals))
    first = min(a for a, _ in intervals)
    inside = {i for a, b in intervals for i in range(a, b + 1)}
    student = len(intervals) + sum(1 for i in range(first, n) if i not in inside)
    ratios = kw.get("output_loss_ratios") or []
    every = ratios and kw.get("output_loss_schedule") == "every_step" and kw.get("mode") != "sequential"
    students = 1 + len(ratios) if every else 1
    return float(len(intervals) + students * student)


def _die_with_parent() -> None:
    """Worker initializer: on Linux, the kernel sends this process SIGTERM when the benchmark's process dies, so
    killing ``ppcl bench quality`` stops its distillations too (they would otherwise train on for many minutes,
    writing into a folder nobody reads). Elsewhere: nothing (the workers end with their current run)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _distill_group(teacher_dir: str, jobs: list[tuple[str, str, str, dict[str, Any]]], data: str, threads: int
                   ) -> dict[str, tuple[float, float, int]]:
    """Runs ``(name, plan file, run folder, settings)`` in lockstep in a worker process (one teacher pass per step
    for all): per run ``(seconds of the group, final total loss, steps)``."""
    import torch

    torch.set_num_threads(threads)
    from ppcl.distill import DistillSettings, distill_many

    t = time.time()
    results = distill_many(teacher_dir, [(plan, run, DistillSettings(**kw)) for _, plan, run, kw in jobs],
                           data=data, progress=False)
    sec = time.time() - t
    return {name: (sec, sum(v for v in r.final_losses.values() if v is not None), r.steps)
            for (name, *_), r in zip(jobs, results)}


def distill_runs(teacher_dir: Path, work: Path, jobs: dict[str, tuple[str, dict[str, Any]]], dkw: dict[str, Any],
                 s: QualitySettings, t0: float) -> tuple[dict[str, float], list[list[str]]]:
    """Every distillation of the table: ``parallel_plan`` processes (spawned: no torch state shared with this
    process), each training one group of runs in lockstep. Returns each run's seconds (its group's) and the
    groups."""
    import concurrent.futures as cf
    import multiprocessing as mp

    procs, threads = parallel_plan(len(jobs), s.workers, s.threads)
    parts = groups({name: step_cost(plan_file, {**dkw, **kw}) for name, (plan_file, kw) in jobs.items()}, procs)
    _log(f"{len(jobs)} distillations of {s.steps} steps, {len(parts)} process(es) x {threads} thread(s), each "
         f"training its runs in lockstep: {' | '.join(', '.join(g) for g in parts)}", t0)
    seconds: dict[str, float] = {}
    if not jobs:
        return seconds, parts
    skw = {k: v for k, v in dkw.items() if k != "progress"}
    with cf.ProcessPoolExecutor(len(parts), mp_context=mp.get_context("spawn"), initializer=_die_with_parent) as pool:
        futures = [pool.submit(_distill_group, str(teacher_dir),
                               [(name, jobs[name][0], str(work / "runs" / name), {**skw, **jobs[name][1]})
                                for name in g], str(work / "cache"), threads) for g in parts]
        for f in cf.as_completed(futures):
            for name, (sec, loss, steps) in f.result().items():
                seconds[name] = sec
                _log(f"distilled {name}: {steps} steps in {sec:.0f}s (its group), final loss {loss:.4f}", t0)
    return seconds, parts


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def targets(rows: list[dict], low: float) -> dict[str, Any]:
    """The issue's targets, measured: each with the numbers it was judged on."""
    teacher = next(r for r in rows if r["name"] == "teacher")
    ppcl = {r["ratio"]: r for r in rows if r["name"] == "ppcl"}
    out: dict[str, Any] = {}
    if low in ppcl:
        rel = (teacher["judge_accuracy"] - ppcl[low]["judge_accuracy"]) / teacher["judge_accuracy"]
        out["ppcl_within_3pct_at_low"] = {"met": rel <= 0.03, "relative_drop": rel}
    losers = [f"{r['name']}@{r['ratio']:g}" for r in rows if r.get("beats_ppcl") and any(r["beats_ppcl"].values())
              and r["name"] not in ("per-ratio",)]
    if any(r.get("beats_ppcl") is not None and r["name"] != "per-ratio" for r in rows):  # nothing to beat: no claim
        out["ppcl_beats_all"] = {"met": not losers, "rows_beating_ppcl_on_a_metric": losers}
        # each accuracy lead over ppcl in units of its paired standard error (below ~2: inside the noise)
        ref = {r["ratio"]: r["judge_accuracy"] for r in rows if r["name"] == "ppcl"}
        leads = {f"{r['name']}@{r['ratio']:g}": (r["judge_accuracy"] - ref[r["ratio"]]) / r["judge_accuracy_diff_se"]
                 for r in rows if r.get("beats_ppcl") and r["beats_ppcl"]["judge_accuracy"]
                 and r["name"] != "per-ratio" and r.get("judge_accuracy_diff_se")}
        if leads:
            out["ppcl_beats_all"]["accuracy_leads_in_paired_se"] = {k: round(v, 2) for k, v in leads.items()}
    per = {r["ratio"]: r for r in rows if r["name"] == "per-ratio"}
    gaps = {f"{k:g}": 100 * (per[k]["judge_accuracy"] - ppcl[k]["judge_accuracy"]) for k in per if k in ppcl}
    if gaps:
        out["one_run_within_1pt"] = {"met": all(g <= 1.0 for g in gaps.values()),
                                     "per_ratio_minus_one_run_points": gaps}
    return out


def _f(x: float | None, d: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "| ratio | row | params | latency ratio | judge acc. (± SE of the difference to ppcl) | image acc. "
        "| judge-FID (± SE of the difference to ppcl) | latent PSNR (dB) | beats PPCL? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        b = r.get("beats_ppcl")
        beats = "—" if b is None else (", ".join(k.replace("judge_", "") for k, v in b.items() if v) or "no")
        lines.append(
            f"| {'' if r['ratio'] is None else format(r['ratio'], 'g')} | {r['name']} | {r['params_ratio']:.3f} "
            f"({r['parameters'] / 1e6:.2f} M) | {r['latency_ratio']:.2f} | {r['judge_accuracy']:.4f}{_acc_se(r)} | "
            f"{r['image_accuracy']:.3f} | {_f(r['judge_fid'], 2)}{_se(r)} | {_f(r['latent_psnr_db'], 2)} | {beats} |"
        )
    t = result["targets"]
    sec = result["seconds"]
    lines += [
        "",
        f"Settings: {s['data_samples']} cached samples, probe {s['probe_samples']} x {s['probe_timesteps']}, "
        f"ppcl's plan by score {s.get('score', 'r2')}, {_serve(s)}, "
        f"{s['steps']} distillation steps x batch {s['batch_size']} (lr {s['lr']:g}, {s['timesteps']}, "
        f"output-level loss weight {s.get('output_loss_weight', 0.0):g}, {_placement(s)}{_sequential(s)}, "
        f"{s.get('uncond_ratio', 0.0):g} of the samples on the empty prompt{_train_seed(s)}), "
        f"{s['eval_n']} evaluation prompts x {s['eval_steps']} steps, true CFG {s['guidance']:g}.",
        f"Time: {sec['total'] / 60:.1f} min wall ({result['cpu_seconds'] / 60:.1f} CPU-min, "
        f"{result['threads']} torch threads); data {sec['data']:.0f}s, probe {sec['probe']:.0f}s, "
        f"distillation {sec['distill']:.0f}s ({_procs(result)}), evaluation {sec['evaluate']:.0f}s.",
        "",
        "Targets:",
    ]
    for k, v in t.items():
        lines.append(f"- {k}: {'met' if v['met'] else 'MISSED'} "
                     f"({', '.join(f'{a}={b:.4f}' if isinstance(b, float) else f'{a}={b}' for a, b in v.items() if a != 'met')})")
    return "\n".join(lines) + "\n"


def _train_seed(s: dict[str, Any]) -> str:
    """``, distillation seed N`` where the runs' seed is not the benchmark's."""
    ts = s.get("train_seed")
    return "" if ts is None or ts == s.get("seed") else f", distillation seed {ts}"


def _acc_se(r: dict[str, Any]) -> str:
    """`` (±SE)`` of a row's judge-accuracy difference to ppcl, where there is one."""
    se = r.get("judge_accuracy_diff_se")
    return "" if se is None else f" (±{se:.4f})"


def _se(r: dict[str, Any]) -> str:
    """`` (±SE)`` of a row's judge-FID difference to ppcl, where there is one."""
    se = r.get("judge_fid_diff_se")
    return "" if se is None else f" (±{se:.2f})"


def _serve(s: dict[str, Any]) -> str:
    """How ppcl's plan serves the higher ratios, in words (``QualitySettings.serve``; tables before it: joint)."""
    return {"plan": "selected for every ratio with the size rule's subsets",
            "joint": "selected for every ratio with the subsets it records",
            "none": "selected for the lowest ratio alone"}[s.get("serve", "joint")]


def _placement(s: dict[str, Any]) -> str:
    """What the output-level term runs with, in words."""
    if s.get("output_loss_ratios"):
        how = ("the whole plan and the subsets exported at {}, every step" if s.get("output_loss_schedule")
               == "every_step" else "the whole plan in turn with the subsets exported at {}")
        return how.format(", ".join(f"{r:g}" for r in s["output_loss_ratios"]))
    keep = s.get("output_loss_keep", 1.0)
    return "every plug in place" if keep >= 1 else f"each plug in place with probability {keep:g}"


def _sequential(s: dict[str, Any]) -> str:
    """`` + W x the sequential D in the whole plan's student`` where ``output_loss_sequential`` is on."""
    w = s.get("output_loss_sequential", 0.0)
    return f", + {w:g} x the sequential loss D in the whole plan's student" if w else ""


def _procs(result: dict[str, Any]) -> str:
    p = result.get("distill_processes") or {"processes": 1, "threads_each": result["threads"]}
    if "lockstep_groups" in p:
        return (f"{p['processes']} process(es) x {p['threads_each']} thread(s), each training its runs in lockstep "
                f"with one teacher pass per step: " + " | ".join(", ".join(g) for g in p["lockstep_groups"]))
    return f"{p['processes']} run(s) at a time x {p['threads_each']} thread(s)"


def plot(result: dict[str, Any]) -> bytes:
    """Two panels (judge accuracy, judge-FID), one group of bars per ratio, teacher as a line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    teacher = rows[0]
    ratios = [r for r in result["settings"]["ratios"]]
    names = list(dict.fromkeys(r["name"] for r in rows if r["ratio"] is not None))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(names))
    for ax, key, label in ((axes[0], "judge_accuracy", "judge attribute accuracy"), (axes[1], "judge_fid", "judge-FID (lower is better)")):
        for j, n in enumerate(names):
            vals = [next((r[key] for r in rows if r["name"] == n and r["ratio"] == k), float("nan")) for k in ratios]
            ax.bar([i + j * width for i in range(len(ratios))], vals, width, label=n)
        ax.axhline(teacher[key], color="k", ls="--", lw=1, label="teacher")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ratios))], [f"keep {k:g}" for k in ratios])
        ax.set_title(label)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
