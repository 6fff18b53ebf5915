"""The KFP components: compiled YAML up to date and loadable, and each component run ALONE through kfp.local,
fed artifacts from a previous run's folders (the reuse case: someone else's pipeline, our component)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from ppcl import cluster
from ppcl.config import DEMO_DEFAULTS, STAGES, merge, validate_config
from ppcl_kfp.dag import COMPONENTS_DIR, compile_components

#: Smaller than the demo: the reuse tests only need each stage to produce its artifact.
TINY = merge(DEMO_DEFAULTS, {
    "ratios": [0.7],
    "data": {"shards": 1, "synth_samples": 8},
    "probe": {"samples": 4, "timesteps": 1},
    "select": {"method": "uniform"},  # robust on a 4-sample probe; the full-DAG test runs the ppcl selector
    "distill": {"steps": 2, "batch_size": 2, "warmup_steps": 1},
    "evaluate": {"steps": 1, "prompts": ["a red circle"], "latency_repeats": 1, "latency_warmup": 0, "grid_samples": 1},
})  # fmt: skip


def test_component_yaml_up_to_date(tmp_path, monkeypatch):
    monkeypatch.delenv(cluster.IMAGE_ENV, raising=False)
    fresh = compile_components(tmp_path)
    for stage in STAGES:
        committed = COMPONENTS_DIR / stage / "component.yaml"
        assert committed.read_text() == fresh[stage].read_text(), (
            f"{committed} is stale: run `ppcl pipeline compile --components`"
        )


@pytest.mark.parametrize("stage", STAGES)
def test_component_yaml_loads_and_uses_the_runtime_image(stage, monkeypatch):
    from kfp.components import load_component_from_file

    monkeypatch.delenv(cluster.IMAGE_ENV, raising=False)
    component = load_component_from_file(str(COMPONENTS_DIR / stage / "component.yaml"))
    assert component.name == stage
    container = component.pipeline_spec.deployment_spec["executors"][f"exec-{stage}"]["container"]
    assert container["image"] == cluster.default_image()
    assert "pip install" not in str(container)  # install_kfp_package=False: the image has everything
    outputs = component.component_spec.outputs
    assert outputs["metrics"].type == "system.Metrics@0.0.1"
    for name in ("README.md", "metadata.yaml"):
        assert (COMPONENTS_DIR / stage / name).is_file()


# ------------------------------------------------------------------------------------------- reuse via kfp.local


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, tiny_pipe_dir):
    """Artifacts of a previous run, produced by the plain stage functions into ordinary folders."""
    from ppcl import stages

    root = tmp_path_factory.mktemp("previous_run")
    teacher = str(tiny_pipe_dir["flux"])
    cfg = validate_config({**TINY, "teacher": teacher, "family": "flux"})
    p = {k: root / k for k in ("data", "cache", "probe", "plan", "plugs", "model", "evaluation")}
    stages.shard("", str(p["data"]), cfg.stage_settings("shard"), progress=False)
    stages.encode(teacher, str(p["data"]), str(p["cache"]), cfg.stage_settings("encode"), progress=False)
    stages.probe(teacher, str(p["cache"]), str(p["probe"]), cfg.stage_settings("probe"), progress=False)
    stages.select(str(p["probe"]), str(p["plan"]), cfg.stage_settings("select"))
    stages.distill(teacher, str(p["plan"]), str(p["cache"]), str(p["plugs"]), cfg.stage_settings("distill"),
                   progress=False)  # fmt: skip
    stages.export(teacher, str(p["plan"]), str(p["plugs"]), 0.7, str(p["model"]), cfg.stage_settings("export"))
    stages.evaluate(str(p["model"]), teacher, str(p["evaluation"]), cfg.stage_settings("evaluate"), progress=False)
    return {"teacher": teacher, "config": cfg, "root": root, **{k: str(v) for k, v in p.items()}}


@pytest.fixture
def kfp_local(tmp_path):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    original_print = builtins.print
    yield tmp_path / "kfp"
    builtins.print = original_print  # kfp.local can leave its indenting print installed (see ppcl_kfp.dag)


def _run(pipeline_func, root: Path) -> Path:
    pipeline_func()
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


def _stage_metrics(folder: Path) -> dict:
    return json.loads((folder / "stage.json").read_text())["metrics"]


def _importer(uri: str, cls):
    from kfp import dsl

    return dsl.importer(artifact_uri=uri, artifact_class=cls, reimport=False).output


def test_shard_alone(previous_run, kfp_local):
    from kfp import dsl

    from ppcl_kfp.dag import load_component

    source = str(previous_run["root"] / "data-synth-source")  # the imagefolder the previous run synthesised
    shard = load_component("shard")

    @dsl.pipeline(name="reuse-shard")
    def p():
        shard(source=source, settings={"shards": 3})

    run = _run(p, kfp_local)
    out = run / "shard" / "data"
    assert len(list(out.glob("shard-*-of-00003.parquet"))) == 3
    assert _stage_metrics(out)["samples"] == TINY["data"]["synth_samples"]


def test_encode_alone(previous_run, kfp_local):
    from kfp import dsl
    from kfp.dsl import Dataset

    from ppcl_kfp.dag import load_component

    encode = load_component("encode")

    @dsl.pipeline(name="reuse-encode")
    def p():
        encode(teacher=previous_run["teacher"], data=_importer(previous_run["data"], Dataset),
               settings={"resolution": 32, "batch_size": 4})  # fmt: skip

    out = _run(p, kfp_local) / "encode" / "cache"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == TINY["data"]["synth_samples"] and manifest["resolution"] == 32


def test_probe_alone(previous_run, kfp_local):
    from kfp import dsl
    from kfp.dsl import Dataset

    from ppcl_kfp.dag import load_component

    probe = load_component("probe")

    @dsl.pipeline(name="reuse-probe")
    def p():
        probe(teacher=previous_run["teacher"], cache=_importer(previous_run["cache"], Dataset),
              settings={"samples": 4, "timesteps": 1, "hsic_tokens": 8})  # fmt: skip

    out = _run(p, kfp_local) / "probe" / "probe"
    result = json.loads((out / "probe.json").read_text())
    assert len(result["blocks"]) == 10 and _stage_metrics(out)["blocks"] == 10
    assert 0 < _stage_metrics(out)["mean_cka"] <= 1


def test_select_alone(previous_run, kfp_local):
    from kfp import dsl
    from kfp.dsl import Artifact

    from ppcl_kfp.dag import load_component

    select = load_component("select")

    @dsl.pipeline(name="reuse-select")
    def p():
        select(probe=_importer(previous_run["probe"], Artifact), settings={"keep_params": 0.8, "method": "uniform"})

    out = _run(p, kfp_local) / "select" / "plan"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["params"]["student"] / plan["params"]["teacher"] <= 0.8 and plan["intervals"]
    assert _stage_metrics(out)["predicted_keep"] == pytest.approx(plan["params"]["student"] / plan["params"]["teacher"])


def test_distill_alone(previous_run, kfp_local):
    from kfp import dsl
    from kfp.dsl import Artifact, Dataset

    from ppcl_kfp.dag import load_component

    distill = load_component("distill")

    @dsl.pipeline(name="reuse-distill")
    def p():
        distill(teacher=previous_run["teacher"], plan=_importer(previous_run["plan"], Artifact),
                cache=_importer(previous_run["cache"], Dataset), steps=3, learning_rate=1e-3,
                settings={"batch_size": 2, "warmup_steps": 1})  # fmt: skip

    out = _run(p, kfp_local) / "distill" / "plugs"
    run = json.loads((out / "run.json").read_text())
    assert (out / "plugs.safetensors").is_file() and _stage_metrics(out)["steps"] == 3
    assert run["settings"]["lr"] == 1e-3
    assert _stage_metrics(out)["loss"] > 0


def test_export_and_evaluate_alone(previous_run, kfp_local):
    from kfp import dsl
    from kfp.dsl import Artifact, Model

    from ppcl_kfp.dag import load_component

    export, evaluate = load_component("export"), load_component("evaluate")
    settings = previous_run["config"].stage_settings("evaluate")

    @dsl.pipeline(name="reuse-export-evaluate")
    def p():
        export(teacher=previous_run["teacher"], plan=_importer(previous_run["plan"], Artifact),
               plugs=_importer(previous_run["plugs"], Model), keep_params=0.9, settings={})  # fmt: skip
        # evaluate is fed the PREVIOUS run's pruned model, not this export: each runs alone
        evaluate(model=_importer(previous_run["model"], Model), teacher=previous_run["teacher"], settings=settings)

    run = _run(p, kfp_local)
    model = run / "export" / "model"
    assert (model / "model_index.json").is_file()
    assert _stage_metrics(model)["parameters_ratio"] <= 0.9
    evaluation = run / "evaluate" / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    pruned = [m for m in metrics["models"] if m["role"] != "teacher"]
    assert len(pruned) == 1 and pruned[0]["parameters_ratio"] < 1
    assert (run / "evaluate" / "report").read_text().lstrip().lower().startswith("<!doctype html")


def test_report_alone(previous_run, kfp_local, tmp_path):
    import shutil

    from kfp import dsl
    from kfp.dsl import Artifact

    from ppcl_kfp.dag import load_component

    # two evaluation folders, as a ratio loop would leave them
    folders = []
    for name in ("eval-a", "eval-b"):
        shutil.copytree(previous_run["evaluation"], tmp_path / name)
        folders.append(str(tmp_path / name))
    report = load_component("report")

    @dsl.pipeline(name="reuse-report")
    def p():
        with dsl.ParallelFor(folders) as uri:
            imported = dsl.importer(artifact_uri=uri, artifact_class=Artifact, reimport=False)
        report(evaluations=dsl.Collected(imported.output), settings={"title": "reused report"})

    run = _run(p, kfp_local)
    html = (run / "report" / "report").read_text()
    assert "reused report" in html and (run / "report" / "plots" / "quality_vs_parameters.png").is_file()
    assert _stage_metrics(run / "report" / "plots")["evaluations"] == 2
