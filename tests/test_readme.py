"""README.md runs as written: every shell command of its fenced ``bash`` blocks, in order, in a fresh folder.

A new user copies these lines one by one; each must work on a fresh clone after `make`. The test extracts the
blocks from README.md itself (so an edited README is what is tested) and runs each line with the README's own
small sizes. ``ppcl ...`` and ``.venv/bin/ppcl ...`` lines run through :func:`ppcl.cli.main` in this process (the
same argv, one torch import instead of fifteen: the block must stay well under a minute and a half); every other
line runs in bash. The lines it does NOT run, and why, are in :data:`SKIPPED`: each names a prefix, and a line
that matches none of them and is not a ppcl or plain shell command fails the test, so a new kind of README line
cannot be silently ignored.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

#: line prefix -> why the test does not run it.
SKIPPED: dict[str, str] = {
    "make demo": "bootstrap + the demo: the venv exists already here, and the demo has its own tests (test_demo*)",
    "make test": "bootstrap + this very test suite",
    ". .venv/bin/activate": "bootstrap: the test runs ppcl from the checkout's interpreter",
    "mlflow ui": "starts a server that runs until stopped (the database it reads is checked below)",
    "export PPCL_IMAGE": "Kubeflow section: needs a registry, docker and a cluster",
    "docker ": "Kubeflow section: needs a registry, docker and a cluster",
    "cp manifests/": "Kubeflow section: writes into the checkout, for a cluster",
    "kubectl ": "Kubeflow section: needs a cluster",
    "ppcl pipeline compile": "Kubeflow section: rewrites the checkout's pipelines/ (tests/test_pipeline.py compiles it)",
    "ppcl pipeline submit": "Kubeflow section: needs a Kubeflow Pipelines server",
    "ppcl lora ": "LoRA section: needs the user's own LoRA trained on the teacher (tests/test_lora.py runs remap and "
                  "transfer on LoRAs it trains)",
}
#: Plain shell commands the README may use to prepare inputs; run in bash.
SHELL = ("printf ", "echo ", "mkdir ", "cat ")


def shell_lines(text: str) -> list[str]:
    """The command lines of every ```bash block, in order (comments and blank lines dropped)."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            cmd = " ".join(shlex.split(line, comments=True))  # strips a trailing # comment outside quotes
            if cmd:
                lines.append(line.strip())
    return lines


def _command(line: str) -> str:
    return line.removeprefix(".venv/bin/").strip()


def _skip_reason(line: str) -> str | None:
    cmd = _command(line)
    return next((why for prefix, why in SKIPPED.items() if cmd.startswith(prefix)), None)


def test_every_readme_line_is_run_or_skipped_for_a_stated_reason():
    lines = shell_lines(README.read_text())
    assert any(_command(x).startswith("ppcl evaluate") for x in lines)
    unknown = [x for x in lines if _skip_reason(x) is None and not _command(x).startswith(("ppcl ", *SHELL))]
    assert not unknown, f"README lines this test neither runs nor skips with a reason: {unknown}"


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from ppcl.cli import main

    # a fresh user: no tracking server configured, the local default store in the working folder
    for name in ("PPCL_LOCAL_TRACKING", "MLFLOW_TRACKING_URI", "PPCL_TRACKING", "PPCL_RUN_ID", "MLFLOW_RUN_ID",
                 "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "PPCL_ARTIFACT_ROOT", "PPCL_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in shell_lines(README.read_text()):
        if _skip_reason(line):
            continue
        cmd = _command(line)
        if cmd.startswith("ppcl "):
            argv = shlex.split(cmd, comments=True)[1:]
            code = main(argv)
            out = capsys.readouterr()
            assert code == 0, f"README line failed (exit {code}): {line}\n{out.out[-2000:]}\n{out.err[-2000:]}"
        else:
            r = subprocess.run(["bash", "-ec", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"README line failed: {line}\n{r.stderr}"
        ran.append(cmd.split()[1] if cmd.startswith("ppcl ") else cmd.split()[0])

    assert "evaluate" in ran and "compare" in ran
    # evaluate drove both pipelines at the tiny teacher's own 64 px and 4 steps (its ppcl.json), not 512 px x 20
    metrics = json.loads((tmp_path / "runs/eval/metrics.json").read_text())
    assert (metrics["settings"]["height"], metrics["settings"]["width"], metrics["settings"]["steps"]) == (64, 64, 4)
    cache = json.loads((tmp_path / "runs/cache/manifest.json").read_text())
    assert cache["resolution"] == 64
    # the standalone stages logged to the local store, and compare found the evaluated model there
    assert (tmp_path / "ppcl-runs/mlflow.db").is_file()
    table = (tmp_path / "ppcl-runs/compare/ppcl/compare.csv").read_text().splitlines()
    header, rows = table[0].split(","), [r.split(",") for r in table[1:]]
    assert len(rows) >= 1
    ratio = float(rows[-1][header.index("parameters_ratio")])
    assert 0.3 < ratio < 0.95
    # the select step drew the plot the README names
    assert (tmp_path / "runs/plan_trend.png").is_file()
