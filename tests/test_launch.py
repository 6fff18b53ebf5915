"""One process per GPU (issue 15, item 2): the launch command for 1 GPU, 8 GPUs and several nodes, the GPU
count from the run config to the compiled pipeline and the launcher, and the launching process (live metrics,
failures). A real launch of `ppcl distill` on two CPU processes: the slow test at the end (and the gloo test of
the training loop itself in test_distill)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ppcl import launch
from ppcl.config import RunConfig
from ppcl.errors import PPCLError

PY = "/opt/venv/bin/python"
TAIL = ["-m", "ppcl", "distill"]


def test_one_gpu_eight_gpus_and_two_nodes_argv():
    assert launch.distill_command(1, python=PY) == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "1", *TAIL]
    assert launch.distill_command(8, python=PY) == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "8", *TAIL]
    # several nodes: the counts only; node rank and master address come from PET_* (Kubeflow Trainer)
    two = launch.distill_command(8, 2, python=PY)
    assert two == [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8", *TAIL]
    assert not any(f.startswith(("--node_rank", "--master", "--rdzv")) for f in two)
    assert launch.distill_command(2)[0] == sys.executable


def test_distill_args_carry_locations_settings_and_resume():
    args = launch.distill_args("/m", "/p/plan.json", "/out", data="/cache", settings_args=["--steps", "7"],
                               resume=True)
    assert args == ["--model", "/m", "--plan", "/p/plan.json", "--data", "/cache", "--out", "/out", "--steps", "7",
                    "--resume"]
    assert "--data" not in launch.distill_args("/m", "/p", "/o") and "--resume" not in launch.distill_args("/m", "/p", "/o")


@pytest.mark.parametrize("nproc, nnodes", [(0, 1), (2, 0), (True, 1), (1.5, 1)])
def test_bad_counts_are_one_line_errors(nproc, nnodes):
    with pytest.raises(PPCLError, match=r"^launch: (nproc|nnodes) must be an integer >= 1"):
        launch.distill_command(nproc, nnodes)


def test_more_processes_than_gpus_is_refused_cpu_only_runs_gloo(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(PPCLError, match=r"distill.gpus_per_node is 8 but this machine shows 4 GPU\(s\)"):
        launch.check_gpus(8)
    launch.check_gpus(4)
    assert "ACCELERATE_USE_CPU" not in launch.worker_env({})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    launch.check_gpus(8)  # no GPU at all: CPU processes (laptop, CI)
    assert launch.worker_env({"X": "1"}) == {"X": "1", "ACCELERATE_USE_CPU": "true"}


def _line(step: int) -> str:
    return json.dumps({"step": step, "loss": 1.0 / step}) + "\n"


def test_metrics_tail_reports_each_new_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_line(1) + _line(2) + _line(3))  # an earlier attempt's curve
    tail = launch.MetricsTail(path)
    assert tail.new() == []
    path.write_text(_line(1) + _line(2))  # the resumed run trims to its checkpoint (step 2) ...
    with open(path, "a") as f:
        f.write(_line(3) + _line(4) + '{"step": 5, "lo')  # ... replays step 3, and step 5 is half written
    assert [s for s, _ in tail.new()] == [4]  # 3 was logged by the earlier attempt; 5 not complete yet
    with open(path, "a") as f:
        f.write('ss": 0.2}\n')
    assert [(s, r["loss"]) for s, r in tail.new()] == [(5, 0.2)]
    assert tail.new() == []
    assert launch.MetricsTail(tmp_path / "none.jsonl").new() == []


def _worker(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_run_distill_streams_metrics_while_the_processes_run(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    gate = tmp_path / "gate"
    argv = _worker(tmp_path, f"""
        import json, pathlib, time
        m, gate = pathlib.Path({str(metrics)!r}), pathlib.Path({str(gate)!r})
        for step in (1, 2, 3):
            with open(m, "a") as f:
                f.write(json.dumps({{"step": step, "loss": 0.5}}) + "\\n")
            if step == 2:  # wait until the launcher has reported steps 1 and 2: they were read live
                while not gate.exists():
                    time.sleep(0.02)
    """)
    seen = []

    def on_step(step, record):
        seen.append(step)
        if step == 2:
            gate.touch()

    launch.run_distill(argv, metrics, on_step=on_step, poll_s=0.05)
    assert seen == [1, 2, 3]


def test_a_failed_launch_is_one_error(tmp_path):
    argv = _worker(tmp_path, "import sys; sys.exit(3)") + ["--nproc_per_node", "8"]
    with pytest.raises(PPCLError, match=r"^distill: the launch of 8 process\(es\) exited with status 3"):
        launch.run_distill(argv, tmp_path / "metrics.jsonl")


# --------------------------------------------------------------------- from the run config to the launcher


def test_gpu_count_defaults_to_the_gpu_stages_count():
    cfg = RunConfig(teacher="t", resources={"gpu": {"count": 8}})
    assert cfg.distill.gpus_per_node == 8 and cfg.stage_settings("distill")["gpus_per_node"] == 8
    own = RunConfig(teacher="t", resources={"gpu": {"count": 8}}, distill={"gpus_per_node": 4})
    assert own.distill.gpus_per_node == 4


def _compiled(tmp_path: Path, config: dict) -> tuple[dict, dict]:
    from ppcl_kfp.dag import compile_pipeline

    from ppcl.config import validate_config

    out = compile_pipeline(tmp_path / "p.yaml", config=validate_config(config))
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_pipeline_gives_distill_its_gpus_and_the_launcher_their_count(tmp_path):
    spec, k8s = _compiled(tmp_path, {"teacher": "s3://m/flux", "resources": {"gpu": {"count": 8}},
                                     "evaluate": {"steps": 4}})
    res = spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]
    assert res["accelerator"]["resourceCount"] == "8"
    # the run parameter the step's launcher reads (ppcl.stages.distill -> ppcl.launch.distill_on_gpus)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["distill_settings"]["defaultValue"]["gpus_per_node"] == 8
    # eight NCCL processes in one pod: /dev/shm is a memory volume, not the container's 64 MiB
    (shm,) = k8s["exec-distill"]["emptyDirMounts"]
    assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    assert "emptyDirMounts" not in k8s["exec-evaluate"]

    spec, k8s = _compiled(tmp_path, {"teacher": "s3://m/flux", "resources": {"gpu": {"count": 8}},
                                     "distill": {"gpus_per_node": 2}})
    execs = spec["deploymentSpec"]["executors"]
    assert execs["exec-distill"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    assert execs["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceCount"] == "8"
    assert spec["root"]["inputDefinitions"]["parameters"]["distill_settings"]["defaultValue"]["gpus_per_node"] == 2

    spec, k8s = _compiled(tmp_path, {"teacher": "s3://m/flux"})  # one GPU: one process, no shm volume
    assert spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]["accelerator"][
        "resourceCount"] == "1"
    assert "emptyDirMounts" not in k8s["exec-distill"]


# --------------------------------------------------------------------- a real launch (slow: two interpreters)


@pytest.mark.slow
def test_stage_distill_on_two_cpu_processes(tiny_pipe_dir, tmp_path, monkeypatch):
    """The pipeline step with gpus_per_node 2 on a machine without GPU: torchrun starts two gloo ranks, rank 0
    writes the run (world size 2 in run.json), the step's own process reads the losses back and has logged the
    curve to MLflow (live from metrics.jsonl, every step once)."""
    from mlflow.tracking import MlflowClient

    from ppcl import stages
    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.plan import make_plan, save_plan

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "launch")
    plan = make_plan(get_adapter(load_pipeline(tiny_pipe_dir["flux"])), [[1, 2]])
    save_plan(plan, tmp_path / "plan" / "plan.json")
    metrics = stages.distill(str(tiny_pipe_dir["flux"]), str(tmp_path / "plan"), None, str(tmp_path / "run"),
                             {"steps": 4, "warmup_steps": 1, "checkpoint_every": 2, "n_samples": 4,
                              "batch_size": 2, "gpus_per_node": 2})
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 4
    assert metrics["steps"] == 4 and metrics["plugs"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("launch")
    (distill_run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "distill"]
    steps = [m.step for m in client.get_metric_history(distill_run.info.run_id, "loss")]
    assert sorted(s for s in steps if s > 0) == [1, 2, 3, 4]  # (step 0: the stage's summary metric "loss")
