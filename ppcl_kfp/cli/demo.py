"""``ppcl demo``: the whole pipeline locally on embedded defaults (the README's main command, ``make demo``).

Synthetic captioned data, a tiny teacher (the shipped reference teacher when present, else a tiny random FLUX
built into the run folder), two keep-params ratios, MLflow on sqlite in the run folder; every stage of the
Kubeflow DAG runs through kfp.local in this environment. At the end it prints where the report is and the
command that opens the MLflow UI on this run.
"""

from __future__ import annotations

import argparse

from ppcl.arch import FAMILIES

HELP = "run the whole PPCL pipeline locally on a tiny model and synthetic data (minutes, CPU only)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config overriding the demo defaults (see docs/pipeline.md)")
    parser.add_argument("--run-root", default=None, help="parent of the run folder (default ./ppcl-runs)")
    parser.add_argument("--run-id", default=None, help="run folder name (default demo-<date>-<time>-<hex>)")
    parser.add_argument("--arch", default="flux", choices=list(FAMILIES),
                        help="family of the tiny teacher built when neither the config nor the shipped "
                             "reference teacher gives one (default flux)")  # fmt: skip


def reference_teacher():
    """The shipped reference teacher folder (ppcl/bench/assets/reference-teacher), or None when absent."""
    from pathlib import Path

    import ppcl

    path = Path(ppcl.__file__).parent / "bench" / "assets" / "reference-teacher"
    return path if (path / "model_index.json").is_file() else None


def _achieved(model) -> str:
    """`` (keep 0.58, asked 0.6)`` from an export's stage.json; empty when it cannot be read."""
    import json

    from ppcl.report import ratio_label

    try:
        m = json.loads((model / "stage.json").read_text())["metrics"]
        return f"  ({ratio_label(m['parameters_ratio'], m.get('keep_params'))})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def run(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    from ppcl.config import DEMO_DEFAULTS, merge, read_config_file, validate_config
    from ppcl_kfp.dag import find_outputs, new_run_id, prepare_run_dir, run_local

    t0 = time.perf_counter()
    data = merge(DEMO_DEFAULTS, read_config_file(args.config) if args.config else {})
    if args.run_root:
        data["run_root"] = args.run_root
    run_dir = Path(data.get("run_root", "ppcl-runs")) / (args.run_id or new_run_id("demo"))
    build_teacher = False
    if not data.get("teacher"):
        ref = reference_teacher()
        build_teacher = ref is None
        data["teacher"] = str(ref if ref is not None else (run_dir / "teacher").resolve())
        if ref is None:
            data["family"] = data.get("family") or args.arch
    # everything is validated before the first file is written
    config = validate_config(data, source=args.config or "demo config")
    run_dir = prepare_run_dir(config, run_dir)
    if build_teacher:
        from ppcl.arch.tiny import build_tiny_pipeline

        print(f"[demo] building a tiny random {config.family} teacher in {config.teacher}", flush=True)
        build_tiny_pipeline(config.family, config.teacher, seed=0)
    print(f"[demo] teacher {config.teacher}; ratios {config.ratios}; {config.data.synth_samples} synthetic images "
          f"at {config.data.synth_size} px; {config.distill.steps} distillation steps", flush=True)
    print(f"[demo] running shard -> encode -> probe -> select -> distill -> (export -> evaluate) x "
          f"{len(config.ratios)} -> report with kfp.local; artifacts under {run_dir / 'kfp'}", flush=True)
    kfp_run = run_local(config, run_dir)
    outputs = find_outputs(kfp_run)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s. Run folder: {run_dir}")
    if "select" in outputs:
        print(f"[demo] plan:    {outputs['select'] / 'plan.json'}")
    for model in outputs.get("export", []):
        print(f"[demo] pruned:  {model}{_achieved(model)}")
    if "report" in outputs:
        print(f"[demo] report:  {outputs['report'] / 'report.html'}")
        from ppcl.report import SUMMARY_FILE

        summary = outputs["report"] / SUMMARY_FILE
        for line in summary.read_text().splitlines() if summary.is_file() else []:
            print(f"[demo] {line}")
    print(f"[demo] MLflow:  mlflow ui --backend-store-uri {uri}")
    return 0
