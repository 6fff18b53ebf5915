"""``ppcl compare`` on a local sqlite tracking store (the laptop default) filled through ppcl.tracking."""

from __future__ import annotations

import contextlib
import csv
import io

import pytest

from ppcl import tracking
from ppcl.cli import main

# (pipeline run, ratio) -> evaluation numbers as the evaluate stage would log them
RESULTS = {
    ("run-a", 0.75): {"parameters": 300.0, "parameters_ratio": 0.74, "ms_per_step": 12.5, "speedup": 1.31,
                      "fid": 21.5, "clip_score": 30.25, "latent_psnr_db": 31.0, "latent_cosine": 0.98},
    ("run-a", 0.5): {"parameters": 200.0, "parameters_ratio": 0.49, "ms_per_step": 8.25, "speedup": 1.98,
                     "fid": 35.0, "clip_score": 28.5, "latent_psnr_db": 24.0, "latent_cosine": 0.93},
    ("run-b", 0.5): {"parameters": 210.0, "parameters_ratio": 0.51, "ms_per_step": 8.5, "speedup": 1.9,
                     "latent_psnr_db": 26.5, "latent_cosine": 0.95},
}  # fmt: skip


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "cmp")
    for k in ("PPCL_RUN_ID", "PPCL_ARTIFACT_ROOT", "PPCL_BUCKET", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "PPCL_TRACKING"):
        monkeypatch.delenv(k, raising=False)
    for pid, method in (("run-a", "ppcl"), ("run-b", "shortgpt")):
        with tracking.stage_run("select", pipeline_id=pid) as run:
            run.log_params({"method": method}, prefix="select.")
    for (pid, ratio), metrics in RESULTS.items():
        with tracking.stage_run("evaluate", ratio=ratio, pipeline_id=pid) as run:
            run.log_metrics(metrics)
            run.context.run(run.branch).log_metrics(metrics)
    return uri


def _compare(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["compare", *args])
    return rc, out.getvalue(), err.getvalue()


def test_table_csv_plot_and_logged_run(store, tmp_path):
    out = tmp_path / "cmp"
    rc, printed, _ = _compare("--experiment", "cmp", "--tracking-uri", store, "--out", str(out))
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO((out / "compare.csv").read_text())))
    assert len(rows) == len(RESULTS)
    for row in rows:
        expected = RESULTS[(row["pipeline"], float(row["ratio"]))]
        for key in ("parameters", "ms_per_step", "speedup", "fid", "clip_score", "latent_psnr_db"):
            assert (float(row[key]) if row[key] else None) == expected.get(key), key
        assert row["method"] == ("ppcl" if row["pipeline"] == "run-a" else "shortgpt")
    md = (out / "compare.md").read_text()
    assert "| run-a | 0.75 | ppcl |" in md and "| run-b | 0.5 | shortgpt |" in md and md.splitlines()[-1] in printed
    assert (out / "quality_vs_size.png").read_bytes()[:4] == b"\x89PNG"
    # logged back to MLflow: a "compare" run holding the three files
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=store)
    exp = c.get_experiment_by_name("cmp")
    logged = c.search_runs([exp.experiment_id], "tags.`ppcl.kind` = 'compare'")
    assert len(logged) == 1
    assert {a.path for a in c.list_artifacts(logged[0].info.run_id)} == {"compare.md", "compare.csv", "quality_vs_size.png"}


def test_injected_kubeflow_runs_are_read_from_evaluate_runs(store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=store)
    exp = c.get_experiment_by_name("cmp")
    injected = c.create_run(exp.experiment_id, run_name="kfp-task").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", injected)
    with tracking.stage_run("evaluate", ratio=0.4, pipeline_id="kfp-run") as run:
        assert run.run_id == injected  # logs into the run Kubeflow made, creates none
        run.log_metrics({"parameters": 150.0, "speedup": 2.5})
    monkeypatch.delenv("MLFLOW_RUN_ID")
    out = tmp_path / "cmp"
    assert _compare("--experiment", "cmp", "--tracking-uri", store, "--out", str(out), "--no-log")[0] == 0
    rows = list(csv.DictReader(io.StringIO((out / "compare.csv").read_text())))
    kfp = [r for r in rows if r["pipeline"] == "kfp-run"]
    assert len(kfp) == 1 and float(kfp[0]["ratio"]) == 0.4 and float(kfp[0]["speedup"]) == 2.5


def test_unknown_experiment_is_one_line_and_writes_nothing(store, tmp_path):
    out = tmp_path / "cmp"
    rc, _, err = _compare("--experiment", "nope", "--tracking-uri", store, "--out", str(out))
    assert rc == 2
    assert err.strip().count("\n") == 0 and "experiment 'nope' not found" in err
    assert not out.exists()


def test_experiment_without_evaluations_is_an_error(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "empty")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with tracking.stage_run("probe", pipeline_id="p") as run:
        run.log_metrics({"blocks": 4})
    rc, _, err = _compare("--experiment", "empty", "--out", str(tmp_path / "cmp"))
    assert rc == 2 and "has no evaluated ratios" in err
