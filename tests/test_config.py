"""The run config: one typed YAML file, validated before anything runs; bad fields named in one line."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from ppcl.cli import main
from ppcl.config import DEMO_DEFAULTS, RunConfig, load_config, validate_config
from ppcl.errors import PPCLError

BAD = [
    ({"teacher": "t", "distill": {"steps": -5}}, "distill.steps"),
    ({"teacher": "t", "ratios": [0.5, 1.5]}, "ratios"),
    ({"teacher": "t", "ratios": [0.0]}, "ratios"),
    ({"teacher": "t", "family": "dalle"}, "family"),
    ({"ratios": [0.5]}, "teacher"),
    ({"teacher": "t", "distill": {"lr": 0}}, "distill.lr"),
    ({"teacher": "t", "distill": {"steps": 100, "warmup_steps": 100}}, "distill.warmup_steps"),
    ({"teacher": "t", "probe": {"max_interval": 1}}, "probe.max_interval"),
    ({"teacher": "t", "aws_secret_access_key": "hunter2"}, "aws_secret_access_key"),
    ({"teacher": "t", "select": {"method": "magic"}}, "select.method"),
    ({"teacher": "t", "ratios": [0.8, 0.5], "select": {"keep_params": 0.7}}, "select.keep_params"),
    ({"teacher": "t", "resources": {"stages": {"train": {"cpu": "1"}}}}, "resources.stages"),
]


def _write(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("data,field", BAD, ids=[f for _, f in BAD])
def test_bad_config_names_the_field(data, field, tmp_path):
    with pytest.raises(PPCLError) as e:
        load_config(_write(tmp_path, data))
    msg = str(e.value)
    assert f"field '{field}'" in msg and "\n" not in msg and "run.yaml" in msg


@pytest.mark.parametrize("command", [["pipeline", "run", "--local"], ["pipeline", "submit", "--host", "http://127.0.0.1:9"],
                                     ["demo"]])  # fmt: skip
@pytest.mark.parametrize("data,field", [BAD[0], BAD[1], BAD[3]], ids=["steps", "ratio", "family"])
def test_cli_rejects_bad_config_before_anything_runs(command, data, field, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {**data, "run_root": str(tmp_path / "runs")}
    rc = main([*command, "--config", _write(tmp_path, data)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and f"field '{field}'" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ppcl-runs").exists()


def test_missing_teacher_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "run", "--local"]) == 2
    assert "field 'teacher' is required" in capsys.readouterr().err
    assert not (tmp_path / "ppcl-runs").exists()


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: x\nratios: [0.5\n")
    with pytest.raises(PPCLError, match=r"c.yaml line \d+: not valid YAML"):
        load_config(path)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, {"teacher": "s3://m/flux", "ratios": [0.9, 0.6], "distill": {"steps": 7}}))
    assert cfg.keep_params == 0.6  # the plan is selected for the smallest ratio
    assert cfg.distill.steps == 7 and cfg.distill.lr == 1e-5
    assert cfg.stage_settings("select")["keep_params"] == 0.6
    # a stage section is plain JSON without nulls (KFP Struct parameters cannot carry null)
    assert all(v is not None for v in cfg.stage_settings("encode").values())
    from ppcl.cluster import GPU_POOL

    assert cfg.resources.gpu.type == GPU_POOL.accelerator_type and cfg.resources.gpu.count == GPU_POOL.accelerator_count
    assert cfg.resources.stages["distill"].memory == "64G"


def test_demo_defaults_validate():
    cfg = validate_config({**DEMO_DEFAULTS, "teacher": "/x"})
    assert len(cfg.ratios) in (2, 3) and cfg.data.synth_size <= 64
    # the reference teacher's own generation defaults (10 Euler steps in the benchmark) on >= 64 synth prompts
    assert cfg.evaluate.steps == 10 and len(cfg.evaluate.prompts) >= 64


def test_sections_match_the_stage_apis():
    """Every config field reaches a real parameter of the stage it configures (no setting silently ignored), and
    every knob of the training loop is a setting (nothing only a Python caller can change)."""
    from ppcl.config import DistillConfig
    from ppcl.distill import DistillSettings
    from ppcl.evaluate.metrics import EvalSettings
    from ppcl.probe import ProbeAccumulator, iter_batches, probe_device, probe_transformer
    from ppcl.settings import EvaluateSettings, ProbeSettings
    from ppcl.trainjob import TrainJobSpec

    import ppcl.settings

    # the training loop takes the one settings model itself; the run config adds only the TrainJob's shape
    assert DistillSettings is ppcl.settings.DistillSettings
    multinode = {"nodes": "nodes", "gpus_per_node": "gpus"}  # the TrainJob's shape (multi-node mode)
    assert issubclass(DistillConfig, DistillSettings)
    assert set(DistillConfig.model_fields) - set(DistillSettings.model_fields) == set(multinode)
    assert set(multinode.values()) <= {f.name for f in dataclasses.fields(TrainJobSpec)}
    assert set(EvaluateSettings.model_fields) - {"prompts"} == set(EvalSettings.model_fields)
    probe_params = set().union(*(inspect.signature(f).parameters for f in (iter_batches, probe_transformer,
                                                                          ProbeAccumulator.__init__, probe_device)))
    # the trained_* fields reach run_probe's trained-plug probe as its steps, uncond_ratio and output_guidance
    from ppcl.probe_trained import trained_interval_scores

    trained = {"trained_steps": "steps", "trained_uncond_ratio": "uncond_ratio",
               "trained_output_guidance": "output_guidance"}
    assert set(trained.values()) <= set(inspect.signature(trained_interval_scores).parameters)
    assert set(ProbeSettings.model_fields) - set(trained) <= probe_params


def test_no_credential_field_in_the_schema():
    names = set(RunConfig.model_fields)
    for section in ("data", "tracking", "resources"):
        names |= set(RunConfig.model_fields[section].annotation.model_fields)
    assert not {n for n in names if any(w in n.lower() for w in ("secret", "password", "token", "key_id"))}
