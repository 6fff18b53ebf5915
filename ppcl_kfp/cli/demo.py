"""``ppcl demo``: the whole pipeline locally on embedded defaults (the README's main command, ``make demo``).

Synthetic captioned data, a tiny teacher (the shipped reference teacher, a trained FLUX-family model; with
``--arch X`` a tiny RANDOM teacher of family X built into the run folder, said so in the output, because no
trained reference ships for the other families), two keep-params ratios, MLflow on sqlite; every stage of the
Kubeflow DAG runs through kfp.local in this environment.

Console: one line per stage with its status and time, then the closing summary (where the report is, the command
that opens MLflow on the run). Everything kfp.local prints (executor JSON, each task's own log) goes to
``<run folder>/kfp.log`` instead (:class:`StageConsole`); when a stage fails, the end of that log is shown.
"""

from __future__ import annotations

import argparse
import re

from ppcl.arch import FAMILIES

HELP = "run the whole PPCL pipeline locally on a tiny model and synthetic data (minutes, CPU only)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config overriding the demo defaults (see docs/pipeline.md)")
    parser.add_argument("--run-root", default=None, help="parent of the run folder (default ./ppcl-runs)")
    parser.add_argument("--run-id", default=None, help="run folder name (default demo-<date>-<time>-<hex>)")
    parser.add_argument("--arch", default=None, choices=list(FAMILIES),
                        help="build a tiny RANDOM teacher of this family into the run folder instead of using "
                             "the shipped reference teacher (a trained FLUX-family model); random weights draw "
                             "noise, so this exercises the family's code path, not quality")  # fmt: skip


def reference_teacher():
    """The shipped reference teacher folder (ppcl/bench/assets/reference-teacher), or None when absent."""
    from pathlib import Path

    import ppcl

    path = Path(ppcl.__file__).parent / "bench" / "assets" / "reference-teacher"
    return path if (path / "model_index.json").is_file() else None


class StageConsole:
    """A stand-in for ``sys.stdout`` / ``sys.stderr`` while kfp.local runs: every character goes to ``log``; the
    console (``out``) gets one line per finished task, ``[demo] <task> <status> in <seconds> s``.

    kfp.local reports through ``print`` and a logging handler it builds on ``sys.stdout`` for each task ("Executing
    task 'x'" ... "Task 'x' finished with status SUCCESS", its name coloured with ANSI codes), and streams each
    task subprocess's output through ``print`` too, so swapping ``sys.stdout`` catches all of it. ``labels``:
    per task name, the label of its n-th run (the ratio of a ParallelFor branch, which runs in ratio order here:
    ``ratio_parallelism=1``).
    """

    _START = re.compile(r"Executing task '([^']+)'")
    _END = re.compile(r"Task '([^']+)' finished with status (\w+)")
    _ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, log, out, labels: dict[str, list[str]] | None = None, clock=None):
        import time

        self.log, self.out, self.labels = log, out, labels or {}
        self.clock = clock or time.perf_counter
        self.started: dict[str, float] = {}
        self.seen: dict[str, int] = {}
        self.failed: list[str] = []
        self._line = ""

    def write(self, text: str) -> int:
        self.log.write(text)
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            self._scan(self._ANSI.sub("", line))
        return len(text)

    def _scan(self, line: str) -> None:
        if m := self._START.search(line):
            self.started[m.group(1)] = self.clock()
        elif m := self._END.search(line):
            name, status = m.group(1), m.group(2)
            now = self.clock()
            dt = now - self.started.pop(name, now)
            k = self.seen[name] = self.seen.get(name, 0) + 1
            extra = self.labels.get(name, [])
            label = f"{name} ({extra[k - 1]})" if k <= len(extra) else name
            if status != "SUCCESS":
                self.failed.append(name)
            word = "done" if status == "SUCCESS" else status
            print(f"[demo] {label:<22} {word:<8} {dt:6.1f} s", file=self.out, flush=True)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:  # progress bars below us write plain lines into the log (ppcl.progress)
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"


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
    import contextlib
    import os
    import sys
    import time
    from pathlib import Path

    from ppcl.config import demo_config_data, read_config_file, validate_config
    from ppcl.errors import PPCLError
    from ppcl_kfp.dag import find_outputs, new_run_id, prepare_run_dir, run_local

    t0 = time.perf_counter()
    data = demo_config_data(read_config_file(args.config) if args.config else {})
    if args.run_root:
        data["run_root"] = args.run_root
    run_dir = Path(data.get("run_root", "ppcl-runs")) / (args.run_id or new_run_id("demo"))
    if args.arch and data.get("teacher"):
        raise PPCLError(f"--arch {args.arch} builds a tiny random teacher, but the config gives teacher "
                        f"{data['teacher']}: pass one or the other")
    ref = None if args.arch else reference_teacher()
    build_teacher = not data.get("teacher") and ref is None
    if not data.get("teacher"):
        data["teacher"] = str(ref if ref is not None else (run_dir / "teacher").resolve())
        if ref is None:
            data["family"] = args.arch or data.get("family") or "flux"
    # everything is validated before the first file is written
    config = validate_config(data, source=args.config or "demo config")
    run_dir = prepare_run_dir(config, run_dir)
    if build_teacher:
        from ppcl.arch.tiny import build_tiny_pipeline

        why = f"--arch {args.arch}" if args.arch else "no reference teacher in this install"
        print(f"[demo] teacher: a tiny RANDOM {config.family} pipeline ({why}), built in {config.teacher}; its "
              "images are noise: this run exercises the pipeline, not quality", flush=True)
        build_tiny_pipeline(config.family, config.teacher, seed=0)
    else:
        print(f"[demo] teacher: {config.teacher}", flush=True)
    print(f"[demo] ratios {config.ratios}; {config.data.synth_samples} synthetic images at {config.data.synth_size} "
          f"px; {config.distill.steps} distillation steps", flush=True)
    log_path = run_dir / "kfp.log"
    print(f"[demo] running shard -> encode -> probe -> select -> distill -> (export -> evaluate) x "
          f"{len(config.ratios)} -> report with kfp.local; task logs in {log_path}", flush=True)
    ratios = [f"keep {r:g}" for r in config.ratios]
    with open(log_path, "a", encoding="utf-8") as log:
        console = StageConsole(log, sys.stdout, {"export": ratios, "evaluate": ratios})
        try:
            with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
                kfp_run = run_local(config, run_dir)
        except PPCLError:
            log.flush()
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
            print(f"[demo] the end of {log_path}:", *("  " + line for line in tail), sep="\n", file=sys.stderr)
            raise
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
    print(f"[demo] MLflow:  mlflow ui --backend-store-uri {uri}")
    if "report" in outputs:
        for line in summary.read_text().splitlines() if summary.is_file() else []:
            print(f"[demo] {line}")
    return 0
