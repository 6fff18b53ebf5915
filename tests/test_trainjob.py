"""Multi-node distillation TrainJob: rendering (valid against the vendored Trainer v2 CRD schema), input
validation, and submit/wait/log-streaming/retry against an in-process fake of the Kubernetes API that grants
exactly the Role of manifests/multinode/rbac.yaml."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from ppcl import cluster, trainjob
from ppcl.cli import main as ppcl_main
from ppcl.errors import PPCLError

try:  # the tiny teacher + plan + latent cache fixture of the S3 distill tests
    from tests.test_distill_s3 import inputs  # noqa: F401
except ImportError:  # tests/ is not a package: pytest puts this folder itself on sys.path
    from test_distill_s3 import inputs  # noqa: F401

DATA = Path(__file__).resolve().parent / "data"
NS = "kubeflow"


def _spec(**kw) -> trainjob.TrainJobSpec:
    base = dict(model="s3://ppcl/teacher", plan="s3://ppcl/run/plan.json", data="s3://ppcl/cache",
                out_uri="s3://ppcl/run/distill", nodes=2, gpus=8, image="ghcr.io/acme/ppcl:0.1.0")
    base.update(kw)
    return trainjob.TrainJobSpec(**base)


# ------------------------------------------------------------------------------------------ CRD validation


def _strict(schema: dict) -> dict:
    """Kubernetes structural schema -> JSON Schema that rejects unknown fields (the API server's strict field
    validation) and knows int-or-string."""
    schema = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k not in ("format", "default")}
    if "properties" in schema:
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        schema.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _strict(schema["additionalProperties"])
    if "items" in schema:
        schema["items"] = _strict(schema["items"])
    if "anyOf" in schema:
        schema["anyOf"] = [_strict(s) for s in schema["anyOf"]]
    return schema


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    crd = yaml.safe_load((DATA / "trainjob-crd-v1alpha1.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _validate(job: dict, schema: dict) -> None:
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    jsonschema.validate(job, schema)
    # The CRD's two CEL rules on the object (not evaluated by jsonschema), verbatim.
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63


def test_2x8_job_is_valid_against_the_crd_and_carries_locations_and_resume(crd_schema):
    job = trainjob.render_trainjob(_spec(extra_args=["--steps", "2000"]))
    _validate(job, crd_schema)
    t = job["spec"]["trainer"]
    assert (t["numNodes"], t["numProcPerNode"], t["image"]) == (2, 8, "ghcr.io/acme/ppcl:0.1.0")
    assert t["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == 8 == t["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    # the launch of ppcl.launch: 2 nodes x 8 processes; node rank and master address from PET_* (not pinned)
    assert t["command"] == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8",
                            "-m", "ppcl", "distill"]
    args = t["args"]
    pairs = dict(zip(args[:-1:2], args[1::2]))
    assert pairs["--data"] == "s3://ppcl/cache" and pairs["--out"] == "s3://ppcl/run/distill"
    assert pairs["--plan"] == "s3://ppcl/run/plan.json" and pairs["--steps"] == "2000"
    assert args[-1] == "--resume"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": cluster.TRAINING_RUNTIME}
    # Same output location -> same job name (a retry finds the previous attempt); another -> another name.
    assert job["metadata"]["name"] == trainjob.render_trainjob(_spec(nodes=4))["metadata"]["name"]
    assert job["metadata"]["name"] != trainjob.render_trainjob(_spec(out_uri="s3://ppcl/other"))["metadata"]["name"]


def test_one_node_job_launches_standalone_like_the_pipeline_step(crd_schema):
    job = trainjob.render_trainjob(_spec(nodes=1, gpus=4))
    _validate(job, crd_schema)
    assert job["spec"]["trainer"]["command"] == ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes",
                                                 "1", "--nproc_per_node", "4", "-m", "ppcl", "distill"]


def test_schema_check_can_fail(crd_schema):
    job = trainjob.render_trainjob(_spec())
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numNode"] = 2  # misspelt field: the API server would reject it
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, crd_schema)
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["resourcesPerNode"]["limits"]["memory"] = "lots"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, crd_schema)


def test_cli_render_prints_yaml(capsys, crd_schema):
    argv = ["cluster", "render-trainjob", "--nodes", "2", "--gpus", "8", "--image", "ghcr.io/acme/ppcl:1",
            "--model", "s3://b/teacher", "--plan", "s3://b/plan.json", "--data", "s3://b/cache", "--out-uri", "s3://b/run"]
    assert ppcl_main(argv) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    _validate(job, crd_schema)
    assert job["spec"]["trainer"]["numNodes"] == 2 and "--resume" in job["spec"]["trainer"]["args"]


def test_default_image_follows_env(monkeypatch):
    monkeypatch.delenv(cluster.IMAGE_ENV, raising=False)
    assert trainjob.render_trainjob(_spec(image=None))["spec"]["trainer"]["image"] == cluster.default_image()
    monkeypatch.setenv(cluster.IMAGE_ENV, "registry.local/ppcl:dev")
    assert trainjob.render_trainjob(_spec(image=None))["spec"]["trainer"]["image"] == "registry.local/ppcl:dev"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(nodes=0), "--nodes must be an integer >= 1, got 0"),
        (dict(gpus=0), "--gpus must be an integer >= 1, got 0"),
        (dict(gpus=-2), "--gpus"),
        (dict(image=""), "--image is missing"),
        (dict(data="/mnt/cache"), "--data must be an s3:// URI"),
        (dict(out_uri="runs/x"), "--out-uri must be an s3:// URI"),
        (dict(model="./teacher"), "--model './teacher' is a local path"),
        (dict(name="Bad_Name"), "--name 'Bad_Name' must be a DNS label"),
    ],
)
def test_bad_input_names_the_field(change, message):
    with pytest.raises(PPCLError, match=re.escape(message)):
        trainjob.render_trainjob(_spec(**change))


def test_cli_bad_input_exit_2_one_line(capsys):
    argv = ["cluster", "render-trainjob", "--nodes", "0", "--gpus", "8", "--image", "x:1", "--model", "s3://b/t",
            "--plan", "s3://b/p", "--data", "s3://b/c", "--out-uri", "s3://b/r"]
    assert ppcl_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "ppcl cluster: error: trainjob: --nodes must be an integer >= 1, got 0"


# ------------------------------------------------------------------------------- fake cluster, real RBAC


@pytest.fixture(scope="module")
def role_rules() -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (kustomize) not installed")
    objs = yaml.safe_load_all(cluster.render_overlay(cluster.MANIFESTS_DIR / "multinode"))
    role = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == cluster.TRAINJOB_ROLE)
    return role["rules"]


class FakeCluster:
    """CustomObjectsApi + CoreV1Api methods ppcl/trainjob.py calls, with a scripted job life and RBAC.

    ``script``: the states successive status reads report after creation, e.g. ["Running", "Complete"]; the
    last one sticks. Node pods appear once the job runs; rank 0's log is ``log_lines``.
    """

    def __init__(self, rules, script, *, log_lines=(), existing=None, fail_message="node 1 exited with 137"):
        self.rules, self.script, self.log_lines, self.fail_message = rules, list(script), list(log_lines), fail_message
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.reads = 0
        if existing is not None:
            job, state = existing
            self.jobs[job["metadata"]["name"]] = self._with_state(copy.deepcopy(job), state)

    # RBAC: a call outside the Role is a 403, as on a real API server.
    def _authorize(self, group: str, resource: str, verb: str) -> None:
        for rule in self.rules:
            if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
                return
        raise ApiException(status=403, reason=f"Forbidden: {verb} {resource}.{group}")

    def _with_state(self, job, state):
        if state in ("Complete", "Failed"):
            msg = self.fail_message if state == "Failed" else "TrainJob completed"
            job["status"] = {"conditions": [{"type": state, "status": "True", "reason": f"Jobs{state}", "message": msg}]}
        else:
            job["status"] = {"conditions": [{"type": "Created", "status": "True", "reason": "JobsCreated", "message": ""}]}
        return job

    # CustomObjectsApi
    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._authorize(group, plural, "get")
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        job = self.jobs[name]
        if job.get("_fresh"):
            self.reads += 1
            state = self.script[min(self.reads - 1, len(self.script) - 1)]
            self._with_state(job, state)
        return {k: v for k, v in job.items() if k != "_fresh"}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self._authorize(group, plural, "create")
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(copy.deepcopy(body))
        self.jobs[name] = dict(copy.deepcopy(body), _fresh=True)
        self.reads = 0

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self._authorize(group, plural, "delete")
        self.deleted.append(name)
        self.jobs.pop(name)

    # CoreV1Api
    def _pod(self, name, index, phase):
        return SimpleNamespace(
            metadata=SimpleNamespace(
                name=f"{name}-node-0-{index}", uid=f"uid-{name}-{index}",
                labels={trainjob.JOBSET_LABEL: name, trainjob.JOB_INDEX_LABEL: str(index)},
                creation_timestamp=dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
            ),
            status=SimpleNamespace(phase=phase),
        )

    def list_namespaced_pod(self, namespace, label_selector):
        self._authorize("", "pods", "list")
        key, name = label_selector.split("=")
        assert key == trainjob.JOBSET_LABEL
        job = self.jobs.get(name)
        if not job or self.reads == 0:
            return SimpleNamespace(items=[])
        failed = job["status"]["conditions"][0]["type"] == "Failed"
        return SimpleNamespace(items=[self._pod(name, 0, "Running"), self._pod(name, 1, "Failed" if failed else "Running")])

    def read_namespaced_pod_log(self, name, namespace, container, follow=False, tail_lines=None, _preload_content=True):
        self._authorize("", "pods/log", "get")
        assert container == "node"
        if name.endswith("-1"):
            return "Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n"
        body = "".join(line + "\n" for line in self.log_lines).encode()

        class Stream:  # what urllib3 gives with _preload_content=False: chunks that split lines anywhere
            def stream(self, decode_content=True):
                for i in range(0, len(body), 7):
                    yield body[i : i + 7]

        return Stream()


def _submit(fake, job, lines):
    return trainjob.submit_trainjob(job, namespace=NS, custom_api=fake, core_api=fake, poll_s=0,
                                    log=lines.append, sleep=lambda s: None)


def test_submit_streams_logs_and_returns_when_complete(role_rules):
    job = trainjob.render_trainjob(_spec())
    logs = ["step 1/3 loss=0.91", "step 2/3 loss=0.55", "step 3/3 loss=0.40 checkpoint s3://ppcl/run/distill/ckpt-3"]
    fake = FakeCluster(role_rules, ["Running", "Running", "Complete"], log_lines=logs)
    lines: list[str] = []
    assert _submit(fake, job, lines) == job["metadata"]["name"]
    assert [ln for ln in lines if not ln.startswith("[ppcl]")] == logs  # each line once, whole, in order
    assert lines[0].startswith(f"[ppcl] created TrainJob {NS}/{job['metadata']['name']}: 2 nodes x 8 GPUs")
    assert lines[-1].endswith("complete")
    assert fake.created == [job]


def test_failed_job_fails_the_step_with_its_reason(role_rules):
    job = trainjob.render_trainjob(_spec())
    fake = FakeCluster(role_rules, ["Running", "Failed"], log_lines=["step 1/3 loss=0.91"])
    lines: list[str] = []
    with pytest.raises(PPCLError, match=r"TrainJob kubeflow/ppcl-distill-\w+ failed: JobsFailed: node 1 exited with 137"):
        _submit(fake, job, lines)
    # The crashed rank's last lines are in the step log.
    assert "RuntimeError: CUDA out of memory" in lines
    assert any("failed pod" in ln and ln.endswith("-1 ---") for ln in lines)


def test_retry_after_failure_recreates_the_job_and_resumes(role_rules):
    job = trainjob.render_trainjob(_spec())
    fake = FakeCluster(role_rules, ["Running", "Complete"], log_lines=["resumed from step 2"], existing=(job, "Failed"))
    lines: list[str] = []
    _submit(fake, trainjob.render_trainjob(_spec()), lines)
    assert fake.deleted == [job["metadata"]["name"]]
    assert len(fake.created) == 1
    resubmitted = fake.created[0]["spec"]["trainer"]["args"]
    assert resubmitted[resubmitted.index("--out") + 1] == "s3://ppcl/run/distill" and resubmitted[-1] == "--resume"
    assert "resumed from step 2" in lines


def test_retry_attaches_to_a_running_job_and_skips_a_complete_one(role_rules):
    job = trainjob.render_trainjob(_spec())
    done = FakeCluster(role_rules, ["Complete"], existing=(job, "Complete"))
    lines: list[str] = []
    _submit(done, job, lines)
    assert done.created == [] and done.deleted == [] and "already complete" in lines[0]

    running = FakeCluster(role_rules, ["Running"], existing=(job, "Running"))
    running.jobs[job["metadata"]["name"]]["_fresh"] = True
    running.script = ["Running", "Complete"]
    running.reads = 0
    _submit(running, job, lines)
    assert running.created == [] and running.deleted == []


def test_timeout_is_an_error(role_rules):
    job = trainjob.render_trainjob(_spec())
    fake = FakeCluster(role_rules, ["Running"])
    with pytest.raises(PPCLError, match="not finished after 0 s"):
        trainjob.submit_trainjob(job, namespace=NS, custom_api=fake, core_api=fake, poll_s=0, timeout_s=0,
                                 log=lambda s: None, sleep=lambda s: None)


def test_role_without_log_access_is_refused(role_rules):
    """The fake enforces RBAC: the Role of manifests/ is what makes the tests above pass."""
    rules = [r for r in role_rules if "pods/log" not in r["resources"]]
    fake = FakeCluster(rules, ["Running", "Complete"], log_lines=["x"])
    with pytest.raises(ApiException, match="Forbidden"):
        _submit(fake, trainjob.render_trainjob(_spec()), [])


# ------------------------------------------------------------------- the distill stage in multi-node mode


class JobRunningCluster(FakeCluster):
    """A fake cluster whose TrainJob really runs: on creation, the job's own arguments go to ``ppcl distill`` (one
    process standing in for every node), against the real S3 server."""

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        super().create_namespaced_custom_object(group, version, namespace, plural, body)
        command = body["spec"]["trainer"]["command"]
        assert command[:3] == ["python", "-m", "torch.distributed.run"] and command[-3:] == ["-m", "ppcl", "distill"]
        self.exit_codes = getattr(self, "exit_codes", []) + [ppcl_main(["distill", *body["spec"]["trainer"]["args"]])]


def test_distill_stage_multinode_runs_a_trainjob_and_collects_its_outputs(role_rules, s3_server, inputs, tmp_path,
                                                                         monkeypatch, capsys):
    from ppcl import stages, storage
    from ppcl.distill_s3 import complete_checkpoints

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PPCL_ARTIFACT_ROOT", "s3://multinode/artifacts")
    monkeypatch.setenv("PPCL_SCRATCH", str(tmp_path / "node-scratch"))
    storage._CLIENTS.clear()
    bucket = s3_server.make_bucket("multinode")
    teacher, cache = f"{bucket}/teacher", f"{bucket}/kfp-root/encode/cache"
    storage.upload_dir(inputs["model"], teacher)
    storage.upload_dir(inputs["cache"], cache)
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    shutil.copy(inputs["plan"], plan_dir / "plan.json")
    settings = {"steps": 4, "lr": 2e-3, "batch_size": 2, "warmup_steps": 2, "checkpoint_every": 2,
                "lsq_batches": 2, "timesteps": "uniform", "family": "flux", "nodes": 2, "gpus_per_node": 4}
    out_uri = f"{bucket}/kfp-root/distill/plugs"
    fake = JobRunningCluster(role_rules, ["Running", "Complete"], log_lines=["[rank 0] step 4/4"])
    monkeypatch.setattr(trainjob, "kubernetes_clients", lambda namespace=None: (fake, fake, namespace or NS))

    # The local cache path of the KFP pod is not what the job reads: its artifact URI on S3 is.
    metrics = stages.distill(teacher, str(plan_dir), str(tmp_path / "pod-local-cache"), str(tmp_path / "plugs"),
                             settings, cache_uri=cache, out_uri=out_uri)  # fmt: skip
    assert fake.exit_codes == [0] and len(fake.created) == 1
    t = fake.created[0]["spec"]["trainer"]
    assert (t["numNodes"], t["numProcPerNode"], t["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) == (2, 4, 4)
    args = t["args"]
    pairs = dict(zip(args[:-1:2], args[1::2]))
    job_out = pairs["--out"]
    assert pairs["--model"] == teacher and pairs["--data"] == cache and args[-1] == "--resume"
    assert job_out.startswith("s3://multinode/artifacts/distill-jobs/") and pairs["--plan"].startswith(job_out[:-3])
    assert "[rank 0] step 4/4" in capsys.readouterr().out  # the job's log is in the step's log

    # What the job wrote to S3 is the step's output artifact; its checkpoints stay on S3.
    out = tmp_path / "plugs"
    assert (out / "plugs.safetensors").read_bytes() == storage.read_bytes(f"{job_out}/plugs.safetensors")
    meta = json.loads((out / "run.json").read_text())
    assert meta["steps"] == 4 and meta["settings"]["lr"] == 2e-3 and meta["settings"]["checkpoint_every"] == 2
    assert meta["settings"]["timesteps"] == "uniform" and meta["data"] == cache
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "trainjob.json").read_text())["checkpoints"] == f"{job_out}/checkpoints"
    assert complete_checkpoints(job_out) == ["step-000002", "step-000004"]
    assert metrics["steps"] == 4 and metrics["plugs"] == 2 and metrics["loss"] > 0

    # A KFP retry of the step (same output URI): the complete job is found, not run again; outputs collected.
    retry = JobRunningCluster(role_rules, ["Complete"], existing=(fake.created[0], "Complete"))
    monkeypatch.setattr(trainjob, "kubernetes_clients", lambda namespace=None: (retry, retry, NS))
    stages.distill(teacher, str(plan_dir), "", str(tmp_path / "plugs-retry"), settings, cache_uri=cache,
                   out_uri=out_uri)  # fmt: skip
    assert retry.created == [] and (tmp_path / "plugs-retry" / "plugs.safetensors").read_bytes() == (
        out / "plugs.safetensors").read_bytes()

    # Inputs a multi-node job cannot read: one line naming them, no job.
    with pytest.raises(PPCLError, match=r"the cache must be on S3 .* got '/mnt/cache'"):
        stages.distill(teacher, str(plan_dir), "/mnt/cache", str(tmp_path / "x"), settings)
    with pytest.raises(PPCLError, match=r"the teacher must be an s3:// URI"):
        stages.distill(str(inputs["model"]), str(plan_dir), cache, str(tmp_path / "x"), settings)
    assert not (tmp_path / "x").exists()
