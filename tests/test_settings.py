"""One settings model per stage (ppcl/settings.py): the CLI, the run config and the compiled pipeline agree on
every default; the CLI and the YAML refuse a bad value with the same message; the docs table is current."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from ppcl.cli import build_parser, main
from ppcl.config import RunConfig, load_config
from ppcl.errors import PPCLError
from ppcl.settings import (
    STAGE_SETTINGS,
    DistillSettings,
    ProbeSettings,
    markdown_table,
    settings_cli_args,
    settings_from_args,
)

ROOT = Path(__file__).resolve().parents[1]

#: The fewest arguments each stage's command accepts: the files it reads and writes (and a budget where one is
#: required), none of them a setting.
REQUIRED = {
    "shard": ["--source", "src", "--out", "out"],
    "encode": ["--model", "m", "--data", "d", "--out", "out"],
    "probe": ["--model", "m", "--out", "out"],
    "select": ["--probe", "p.json", "--remove-blocks", "1", "--out", "plan.json"],
    "distill": ["--model", "m", "--plan", "plan.json", "--out", "out"],
    "export": ["--model", "m", "--plan", "plan.json", "--plugs", "run", "--all", "--out", "out"],
    "evaluate": ["--model", "m", "--teacher", "t", "--prompts", "p.txt", "--out", "out"],
}
#: Fields a command does not take as a flag (given by REQUIRED above, or meaningful in the pipeline only).
NOT_FLAGS = {"shard": {"source", "synth_samples", "synth_size"}, "select": {"keep_params"},
             "export": {"keep_params", "intervals", "all_intervals"}, "evaluate": {"prompts"}}  # fmt: skip


def _cli_namespace(stage: str, extra: list[str] = ()) -> argparse.Namespace:
    return build_parser().parse_args([stage, *REQUIRED[stage], *extra])


@pytest.fixture(scope="module")
def compiled_defaults() -> dict:
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "ppcl_pipeline.yaml").read_text()))  # then: platform spec
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {name: p.get("defaultValue") for name, p in params.items()}


def test_every_stage_has_its_model():
    assert list(STAGE_SETTINGS) == ["shard", "encode", "probe", "select", "distill", "export", "evaluate"]
    for model in STAGE_SETTINGS.values():
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize("stage", list(STAGE_SETTINGS))
def test_cli_config_and_compiled_pipeline_defaults_agree(stage, compiled_defaults):
    """The same defaults from `ppcl <stage>` with no settings flags, RunConfig's section and the compiled
    pipeline's `<stage>_settings` parameter: a user by hand and the pipeline run the same thing."""
    model = STAGE_SETTINGS[stage]
    defaults = model().model_dump(mode="json")
    cli = _cli_namespace(stage)
    config = RunConfig(teacher="t").stage_settings(stage)
    compiled = compiled_defaults[f"{stage}_settings"]
    if stage == "select":  # the plan's budget: the smallest ratio, everywhere
        assert config.pop("keep_params") == compiled.pop("keep_params") == min(RunConfig(teacher="t").ratios)
    if stage == "distill":  # the multi-node job's shape: a pipeline setting, not a flag of one process
        for key in ("nodes", "gpus_per_node"):
            assert config.pop(key) == compiled.pop(key)
    differences = []
    for name, default in defaults.items():
        if name not in NOT_FLAGS.get(stage, set()):
            value = model.model_validate({name: getattr(cli, name)}).model_dump(mode="json")[name]
            if value != default:
                differences.append(f"{stage}.{name}: cli {value!r} != schema {default!r}")
        for where, got in (("config", config), ("compiled pipeline", compiled)):
            value = got.get(name)  # absent: null (KFP Struct parameters cannot hold null)
            if value != default:
                differences.append(f"{stage}.{name}: {where} {value!r} != schema {default!r}")
    assert not differences, "; ".join(differences)
    assert set(config) == set(compiled) <= set(defaults)  # no setting only one side knows
    if stage == "distill":  # the pipeline's top-level parameters feed the same two settings
        assert compiled_defaults["distill_steps"] == defaults["steps"]
        assert compiled_defaults["learning_rate"] == defaults["lr"]


def test_distill_by_hand_is_the_pipelines_run():
    """The paper's released Qwen-Image settings, not the old smoke-test CLI defaults (200 steps, lr 1e-4)."""
    s = settings_from_args(DistillSettings, _cli_namespace("distill"))
    assert (s.steps, s.lr, s.batch_size, s.timesteps, s.checkpoint_every, s.warmup_steps) == (
        2000, 1e-5, 1, "logit_normal", 500, 10)
    assert s.model_dump() == RunConfig(teacher="t").distill.model_dump(exclude={"nodes", "gpus_per_node"})


def _yaml_error(tmp_path, section: str, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"teacher": "t", section: data}))
    with pytest.raises(PPCLError) as e:
        load_config(path)
    return str(e.value)


@pytest.mark.parametrize("stage, flags, section, data, field", [
    ("distill", ["--warmup-steps", "2000"], "distill", {"warmup_steps": 2000}, "warmup_steps"),
    ("distill", ["--steps", "50", "--warmup-steps", "50"], "distill", {"steps": 50, "warmup_steps": 50},
     "warmup_steps"),
    ("distill", ["--lr", "0"], "distill", {"lr": 0}, "lr"),
    ("distill", ["--output-loss-keep", "1.5"], "distill", {"output_loss_keep": 1.5}, "output_loss_keep"),
    ("probe", ["--max-interval", "1"], "probe", {"max_interval": 1}, "max_interval"),
    ("probe", ["--probe-dim", "-3"], "probe", {"probe_dim": -3}, "probe_dim"),
    ("encode", ["--batch-size", "0"], "encode", {"batch_size": 0}, "batch_size"),
    ("evaluate", ["--steps", "0"], "evaluate", {"steps": 0}, "steps"),
])  # fmt: skip
def test_cli_and_yaml_refuse_a_bad_value_with_the_same_message(stage, flags, section, data, field, tmp_path,
                                                                capsys):
    rc = main([stage, *REQUIRED[stage], *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    flag = "--" + field.replace("_", "-")
    cli_prefix = f"ppcl {stage}: error: {stage} settings: field '{field}' ({flag}) "
    assert err.startswith(cli_prefix), err
    yaml_err = _yaml_error(tmp_path, section, data)
    yaml_prefix = f"{tmp_path / 'run.yaml'}: field '{section}.{field}' "
    assert yaml_err.startswith(yaml_prefix), yaml_err
    assert err.removeprefix(cli_prefix) == yaml_err.removeprefix(yaml_prefix)  # one message, from the model
    assert not (tmp_path / "out").exists()


def test_a_stage_fed_by_hand_gets_the_same_message(tmp_path):
    from ppcl import stages

    with pytest.raises(PPCLError, match=r"^probe settings: field 'max_interval' Input should be greater than or "
                                        r"equal to 2$"):
        stages.probe("teacher", str(tmp_path / "cache"), str(tmp_path / "probe"), {"max_interval": 1})
    with pytest.raises(PPCLError, match=r"^distill settings: field 'learning_rate' is not a known setting$"):
        stages.distill("teacher", str(tmp_path), str(tmp_path), str(tmp_path / "d"), {"learning_rate": 1e-4})
    assert not (tmp_path / "probe").exists() and not (tmp_path / "d").exists()


def test_settings_cli_args_rebuild_the_settings_exactly():
    """What a multi-node TrainJob's `ppcl distill` receives reproduces every field, defaults included."""
    settings = DistillSettings(steps=7, lr=2.5e-4, warmup_steps=0, init="first", guidance=3.5, max_grad_norm=None,
                               use_8bit_adam=False, gradient_checkpointing=True, timesteps="uniform")
    args = settings_cli_args(settings)
    assert args[args.index("--lr") + 1] == "0.00025" and "--no-use-8bit-adam" in args
    assert settings_from_args(DistillSettings, _cli_namespace("distill", args)) == settings
    probe = ProbeSettings(probe_dim=0, samples=3)
    assert settings_from_args(ProbeSettings, _cli_namespace("probe", settings_cli_args(probe))) == probe


def test_optional_bool_and_list_flags():
    ns = _cli_namespace("distill", ["--init", "none", "--max-grad-norm", "0", "--gradient-checkpointing"])
    s = settings_from_args(DistillSettings, ns)
    assert s.init is None and s.max_grad_norm is None and s.gradient_checkpointing is True
    ns = build_parser().parse_args(["select", "--probe", "p", "--keep-params", "0.5", "--out", "o", "--protect",
                                    "0,5,7", "--allow-ends"])  # fmt: skip
    assert (ns.protect, ns.allow_ends, ns.keep_params) == ([0, 5, 7], True, 0.5)
    with pytest.raises(SystemExit):  # a choice outside the Literal: argparse's own one-line error, status 2
        _cli_namespace("distill", ["--mode", "magic"])


def test_evaluate_resolution_fills_only_the_sides_not_given():
    from ppcl.cli.evaluate import eval_settings

    s = eval_settings(_cli_namespace("evaluate", ["--resolution", "128", "--height", "64"]))
    assert (s.height, s.width) == (64, 128)
    # a side not given stays open: evaluate fills it from the teacher's generation defaults (ppcl.json)
    assert eval_settings(_cli_namespace("evaluate", ["--width", "96"])).height is None


def test_docs_table_is_current():
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert committed == markdown_table(), "docs/settings.md is stale: python -m ppcl.settings > docs/settings.md"
    for model in STAGE_SETTINGS.values():
        for name in model.model_fields:
            assert f"| `{name}` |" in committed


def test_export_takes_one_budget(tmp_path):
    from ppcl import stages

    with pytest.raises(PPCLError, match=r"^export settings: field 'intervals' cannot be given with keep_params"):
        stages.export("teacher", str(tmp_path), str(tmp_path), 0.5, str(tmp_path / "model"), {"intervals": [0]})
    assert not (tmp_path / "model").exists()
