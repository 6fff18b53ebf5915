"""``ppcl evaluate``: FID, CLIP score, fidelity to the teacher, speed and memory; metrics.json + grid + report."""

from __future__ import annotations

import argparse

HELP = "evaluate pruned pipelines against the teacher: FID, CLIP score, fidelity, latency, memory, image grid"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ppcl.settings import EvaluateSettings, add_settings_arguments

    parser.add_argument("--model", action="append", required=True, metavar="PRUNED",
                        help="pruned pipeline directory (repeat for several)")
    parser.add_argument("--teacher", required=True, metavar="PIPE", help="teacher pipeline directory")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="prompts: one per line, or .jsonl with a 'prompt' or 'caption' field")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: metrics.json, grid.png, report.html")
    parser.add_argument("--resolution", type=int, default=None, metavar="R",
                        help="square generation resolution: sets --height and --width where they are not given")
    # every setting of metrics.json, generated from EvalSettings (the run config's evaluate section has the same
    # fields); the prompts come from --prompts, the reference statistics' cache from --fid-cache-dir
    add_settings_arguments(parser, EvaluateSettings, exclude=("prompts",))
    parser.add_argument("--fid-cache", dest="fid_cache_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--name", action="append", help="display name per --model, in order (default: folder name)")


def eval_settings(args: argparse.Namespace):
    """The :class:`ppcl.evaluate.metrics.EvalSettings` of the parsed flags: ``--resolution`` sets the height and
    width whose own flags were not given. (``--prompts`` is a file, read after the settings are checked.)"""
    from ppcl.settings import EvaluateSettings, settings_from_args

    given = getattr(args, "settings_given", set())
    size = {k: args.resolution for k in ("height", "width") if args.resolution is not None and k not in given}
    return settings_from_args(EvaluateSettings, args, exclude=("prompts",), **size).eval_settings()


def model_metrics(m) -> dict:
    """The numbers of one evaluated model that MLflow and ``ppcl compare`` show (the pipeline's evaluate step logs
    the same names)."""
    metrics = {"parameters": m.parameters, "parameters_ratio": m.parameters_ratio,
               "ms_per_step": m.latency.per_step_s * 1e3, "speedup": m.speedup, "fid": m.fid,
               "clip_score": m.clip_score}  # fmt: skip
    if getattr(m, "memory", None) is not None and getattr(m.memory, "peak_bytes", None) is not None:
        metrics["peak_memory_mb"] = m.memory.peak_bytes / 2**20
    if m.fidelity is not None:
        metrics.update(latent_psnr_db=m.fidelity.latent_psnr_db, latent_cosine=m.fidelity.latent_cosine)
    return metrics


def _track(result, settings) -> None:
    """One MLflow run for this evaluation: the pruned model's metrics under their plain names (what ``ppcl compare``
    reads); with several ``--model``, each model's under ``<name>/<metric>`` so no number is credited to the
    wrong model."""
    from ppcl.tracking import log_command

    pruned = [m for m in result.metrics.models if m.role != "teacher"]
    if len(pruned) == 1:
        metrics = model_metrics(pruned[0])
    else:
        metrics = {f"{m.name}/{k}": v for m in pruned for k, v in model_metrics(m).items()}
    log_command("evaluate", metrics, result.metrics_path.parent, settings.model_dump(mode="json"))


def run(args: argparse.Namespace) -> int:
    settings = eval_settings(args)  # checked before torch is even imported

    from ppcl.evaluate.generate import read_prompts

    prompts = read_prompts(args.prompts)

    import torch

    from ppcl.evaluate.evaluation import evaluate_models
    from ppcl.evaluate.html import fmt

    # Scoped, not global: the CLI also runs in-process (tests, `ppcl demo`), where later training needs grad.
    with torch.no_grad():
        result = evaluate_models(args.model, args.teacher, prompts, args.out, settings, names=args.name,
                                 progress=not args.no_progress)
    for m in result.metrics.models:
        f = m.fidelity
        extra = ""
        if f is not None:
            psnr = "inf (identical)" if f.latent_psnr_db is None else f"{f.latent_psnr_db:.2f} dB"
            extra = f"  latent PSNR {psnr}  cos {f.latent_cosine:.4f}"
        st = m.speedup_stats
        speed = f"speedup {m.speedup:.2f}" + (f" [{st.q25:.2f}-{st.q75:.2f}]" if st else "")
        if st is not None and not st.reliable:
            speed += " (UNRELIABLE: spread too wide)"
        judge = f"  judge acc. {m.judge_accuracy:.4f}  judge-FID {fmt(m.judge_fid)}" if m.judge_accuracy is not None else ""
        print(f"{m.name}: {m.parameters:,} params ({m.parameters_ratio:.3f})  "
              f"{m.latency.per_step_s * 1e3:.2f} ms/step  {speed}  FID {fmt(m.fid)}  "
              f"CLIP {fmt(m.clip_score)}{judge}{extra}")
    _track(result, settings)
    print(f"wrote {result.metrics_path}, {result.grid_path}, {result.report_path}")
    return 0
