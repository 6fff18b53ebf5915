"""Commands run by hand log to MLflow as pipeline steps do: the local store ./ppcl-runs/mlflow.db by default,
$MLFLOW_TRACKING_URI when set, nothing with --no-tracking; the environment is left as it was."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def probe_json(tmp_path_factory):
    from ppcl.arch import get_adapter
    from ppcl.arch.tiny import tiny_transformer, tiny_transformer_config
    from ppcl.probe import probe_transformer, write_probe

    cfg = tiny_transformer_config("flux")
    g = torch.Generator().manual_seed(0)
    batches = [{"latents": torch.randn(2, 16, 8, 8, generator=g),
                "prompt_embeds": torch.randn(2, 6, cfg["joint_attention_dim"], generator=g),
                "pooled_prompt_embeds": torch.randn(2, cfg["pooled_projection_dim"], generator=g)}]  # fmt: skip
    acc, sig = probe_transformer(get_adapter(tiny_transformer("flux")), {"shift": 3.0}, batches, timesteps=2)
    probe = acc.result(family="flux", model="tiny", calibration=dict(
        source="synthetic", samples=2, batch_size=2, timesteps=2, sigmas=sig, seed=0))
    folder = tmp_path_factory.mktemp("probe") / "probe"
    write_probe(probe, folder, plots=False)
    return folder / "probe.json"


@pytest.fixture
def user_env(monkeypatch, tmp_path):
    """A user's shell: no tracking configured, working in an empty folder."""
    for name in ("PPCL_LOCAL_TRACKING", "MLFLOW_TRACKING_URI", "PPCL_TRACKING", "PPCL_RUN_ID", "MLFLOW_RUN_ID",
                 "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "PPCL_ARTIFACT_ROOT", "PPCL_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _runs(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ppcl")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_select_by_hand_logs_to_the_local_store(user_env, probe_json, capsys):
    from ppcl.cli import main

    assert main(["select", "--probe", str(probe_json), "--keep-params", "0.7", "--out", "plan.json"]) == 0
    assert "[mlflow] select: run" in capsys.readouterr().err
    db = user_env / "ppcl-runs" / "mlflow.db"
    (run,) = _runs(f"sqlite:///{db}")
    assert run.data.tags["ppcl.stage"] == "select" and run.info.status == "FINISHED"
    assert 0 < run.data.metrics["predicted_keep"] <= 0.7
    assert run.data.params["select.method"] == "ppcl" and "plan.intervals" in run.data.params
    assert "MLFLOW_TRACKING_URI" not in os.environ  # set for the command only


def test_no_tracking_writes_no_store_and_the_environment_uri_wins(user_env, probe_json, tmp_path_factory,
                                                                   monkeypatch, capsys):
    from ppcl.cli import main

    assert main(["select", "--probe", str(probe_json), "--keep-params", "0.7", "--out", "a.json",
                 "--no-tracking"]) == 0
    assert not (user_env / "ppcl-runs").exists() and "[mlflow]" not in capsys.readouterr().err
    assert "PPCL_TRACKING" not in os.environ

    uri = f"sqlite:///{tmp_path_factory.mktemp('server') / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["select", "--probe", str(probe_json), "--keep-params", "0.7", "--out", "b.json"]) == 0
    assert not (user_env / "ppcl-runs").exists()
    assert [r.data.tags["ppcl.stage"] for r in _runs(uri)] == ["select"]
