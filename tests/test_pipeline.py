"""The compiled Kubeflow pipeline (up to date, GPU pool scheduling, no secret values), `ppcl pipeline compile`
and `submit` (against a fake KFP API on 127.0.0.1), and the whole DAG run locally with kfp.local."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import yaml

from ppcl import cluster
from ppcl.cli import main
from ppcl_kfp.dag import PIPELINE_YAML, compile_pipeline

FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIA-FAKE-KEY-ID-0042",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-value-7f3a9c1e",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-x81",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-q2w",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> str:
    """The pipeline compiled now, with credentials in the environment that must NOT leak into it."""
    mp = pytest.MonkeyPatch()
    mp.delenv(cluster.IMAGE_ENV, raising=False)
    for k, v in FAKE_SECRETS.items():
        mp.setenv(k, v)
    try:
        out = compile_pipeline(tmp_path_factory.mktemp("compiled") / "ppcl_pipeline.yaml")
    finally:
        mp.undo()
    return out.read_text()


def _docs(text: str) -> tuple[dict, dict]:
    spec, platform = list(yaml.safe_load_all(text))
    return spec, platform


def test_committed_yaml_is_up_to_date(compiled):
    assert PIPELINE_YAML.read_text() == compiled, "pipelines/ppcl_pipeline.yaml is stale: run `ppcl pipeline compile`"


def test_no_secret_value_in_the_compiled_pipeline(compiled):
    for value in FAKE_SECRETS.values():
        assert value not in compiled
        assert value not in PIPELINE_YAML.read_text()


def test_gpu_stages_get_accelerators_node_selector_and_tolerations(compiled):
    spec, platform = _docs(compiled)
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pool = cluster.GPU_POOL
    for stage in ("shard", "encode", "probe", "select", "distill", "export", "evaluate", "report"):
        resources = executors[f"exec-{stage}"]["container"]["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"]
        assert executors[f"exec-{stage}"]["container"]["image"] == cluster.default_image()
        gpu = stage in ("probe", "distill", "evaluate")
        assert ("accelerator" in resources) == gpu, stage
        assert ("nodeSelector" in k8s[f"exec-{stage}"]) == gpu, stage
        if gpu:
            assert resources["accelerator"]["resourceType"] == pool.accelerator_type
            # the probe is one process: one GPU whatever the pool's count
            count = 1 if stage == "probe" else pool.accelerator_count
            assert int(resources["accelerator"]["resourceCount"]) == count
            assert k8s[f"exec-{stage}"]["nodeSelector"]["labels"] == pool.node_selector
            tol = k8s[f"exec-{stage}"]["tolerations"]
            assert [{k: v for k, v in t.items()} for t in tol] == [t.as_k8s() for t in pool.tolerations]
        # credentials and cluster config come from the named Secret / ConfigMap, by reference
        (secret,) = k8s[f"exec-{stage}"]["secretAsEnv"]
        assert secret["secretName"] == cluster.S3_SECRET.name
        assert {e["secretKey"] for e in secret["keyToEnv"]} == set(cluster.S3_SECRET.keys)
        (cm,) = k8s[f"exec-{stage}"]["configMapAsEnv"]
        assert cm["configMapName"] == cluster.CONFIG_MAP.name


def test_caching_retries_and_parameters(compiled):
    spec, _ = _docs(compiled)
    root = spec["root"]["dag"]["tasks"]
    loop = next(t for t in root.values() if "parallelFor" in json.dumps(t.get("iteratorPolicy", {})) or
                t.get("componentRef", {}).get("name", "").startswith("comp-for-loop"))  # fmt: skip
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    tasks = {**root, **inner}
    assert tasks["shard"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["distill"]["cachingOptions"]["enableCache"] is True
    assert tasks["distill"]["retryPolicy"]["maxRetryCount"] >= 1
    assert tasks["evaluate"]["retryPolicy"]["maxRetryCount"] >= 1
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"teacher", "data_source", "ratios", "distill_steps", "learning_rate"} <= set(params)
    assert "defaultValue" not in params["teacher"]  # the teacher is a required run parameter
    assert params["ratios"]["parameterType"] == "LIST"


def test_compile_command_with_config(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cluster.IMAGE_ENV, raising=False)
    monkeypatch.setenv(cluster.IMAGE_ENV, "registry.example/ppcl:test")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": "s3://models/flux", "ratios": [0.7, 0.4],
                                   "resources": {"gpu": {"type": "nvidia.com/gpu", "count": 4}}}))  # fmt: skip
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--config", str(cfg)]) == 0
    spec, _ = _docs(out.read_text())
    res = spec["deploymentSpec"]["executors"]["exec-distill"]["container"]
    assert res["image"] == "registry.example/ppcl:test"
    assert res["resources"]["accelerator"]["resourceCount"] == "4"
    probe = spec["deploymentSpec"]["executors"]["exec-probe"]["container"]
    assert probe["resources"]["accelerator"]["resourceCount"] == "1"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["teacher"]["defaultValue"] == "s3://models/flux"
    assert params["ratios"]["defaultValue"] == [0.7, 0.4] and params["keep_params"]["defaultValue"] == 0.4


class _FakeKFP(http.server.BaseHTTPRequestHandler):
    """Just enough of the KFP v2beta1 REST API for kfp.Client.create_run_from_pipeline_func."""

    requests: list[tuple[str, str, dict]] = []

    def _reply(self, out: dict, status: int = 200) -> None:
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.requests.append(("GET", self.path, {}))
        self._reply({"experiments": []} if "/experiments" in self.path else {})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self.path.endswith("/experiments"):
            self._reply({"experiment_id": "exp-7", "display_name": body["display_name"]})
        elif self.path.endswith("/runs"):
            self._reply({"run_id": "run-42", "display_name": body["display_name"], "experiment_id": "exp-7"})
        else:
            self._reply({"error": "not found"}, 404)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_kfp():
    _FakeKFP.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeKFP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", _FakeKFP.requests
    server.shutdown()


def test_submit_prints_the_run_url(fake_kfp, tmp_path, capsys, monkeypatch):
    host, requests = fake_kfp
    for k, v in FAKE_SECRETS.items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": "s3://models/flux", "data": {"source": "s3://data/set"},
                                   "distill": {"steps": 123}}))  # fmt: skip
    assert main(["pipeline", "submit", "--host", host, "--config", str(cfg), "--experiment", "ppcl-test"]) == 0
    assert f"submitted: {host}/#/runs/details/run-42" in capsys.readouterr().out
    (run,) = [body for method, path, body in requests if method == "POST" and path.endswith("/runs")]
    assert run["experiment_id"] == "exp-7"
    params = run["runtime_config"]["parameters"]
    assert params["teacher"] == "s3://models/flux" and params["distill_steps"] == 123
    assert params["data_source"] == "s3://data/set"
    sent = json.dumps(requests)
    assert not any(v in sent for v in FAKE_SECRETS.values())


def test_submit_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": "s3://models/flux", "data": {"source": "s3://data/set"}}))
    # a port nothing listens on, on 127.0.0.1
    rc = main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "http://127.0.0.1:9" in err
    cfg.write_text(yaml.safe_dump({"teacher": "s3://models/flux"}))
    assert main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--config", str(cfg)]) == 2
    assert "data.source" in capsys.readouterr().err


def test_full_dag_runs_locally_and_produces_every_artifact(tmp_path, tiny_pipe_dir, capsys, monkeypatch):
    """The whole DAG through kfp.local on a tiny FLUX: plan, plugs, one pruned model + evaluation per ratio,
    report. Kept as small as the stages allow (it is the slowest test of the suite)."""
    from ppcl_kfp.dag import find_outputs

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = {
        "name": "ppcl-test", "teacher": str(tiny_pipe_dir["flux"]), "family": "flux", "ratios": [0.8, 0.6],
        "data": {"shards": 1, "synth_samples": 8, "synth_size": 32},
        "encode": {"resolution": 32, "batch_size": 8},
        "probe": {"samples": 8, "timesteps": 2, "batch_size": 4, "hsic_tokens": 16},
        "distill": {"steps": 3, "lr": 1e-3, "batch_size": 4, "timesteps": "uniform", "warmup_steps": 1},
        "evaluate": {"steps": 1, "height": 32, "width": 32, "prompts": ["a red circle"], "latency_warmup": 0,
                     "latency_repeats": 1, "grid_samples": 1},
        "run_root": str(tmp_path / "runs"),
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "run", "--local", "--config", str(tmp_path / "c.yaml"), "--run-id", "r1"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "r1"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["distill"]["steps"] == 3
    (kfp_run,) = (run_dir / "kfp").iterdir()
    found = find_outputs(kfp_run)
    plan = json.loads((found["select"] / "plan.json").read_text())
    assert plan["intervals"] and plan["params"]["student"] / plan["params"]["teacher"] <= 0.6
    assert (found["distill"] / "plugs.safetensors").is_file()
    assert json.loads((found["distill"] / "run.json").read_text())["settings"]["steps"] == 3
    assert len(found["export"]) == len(found["evaluate"]) == 2
    ratios = []
    for model, evaluation in zip(found["export"], found["evaluate"]):
        assert (model / "model_index.json").is_file() and (model / "transformer").is_dir()
        metrics = json.loads((evaluation / "metrics.json").read_text())
        (pruned,) = [m for m in metrics["models"] if m["role"] != "teacher"]
        ratios.append(pruned["parameters_ratio"])
        assert (evaluation / "grid.png").is_file()
    # two different ratios, each within its budget, from ONE distillation run
    assert ratios[0] != ratios[1] and ratios[0] <= 0.8 + 1e-9 and ratios[1] <= 0.6 + 1e-9
    report = found["report"] / "report.html"
    # each branch is labelled by the fraction its export achieved, the ratio asked beside it (ppcl.report.ratio_label)
    from ppcl.report import ratio_label

    html = report.read_text() if report.is_file() else ""
    for achieved, asked in zip(ratios, (0.8, 0.6)):
        assert ratio_label(achieved, asked) in html, ratio_label(achieved, asked)
    assert f"report: {report}" in out
