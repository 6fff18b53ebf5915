"""Multi-node distillation as a Kubeflow Trainer v2 TrainJob: render, submit, wait, stream logs, resume.

Why Kubeflow Trainer v2 (``trainer.kubeflow.org/v1alpha1`` TrainJob) and not the Training Operator's
PyTorchJob: current Kubeflow releases ship Trainer v2 and the Training Operator v1 is in maintenance only.
The job references a namespaced TrainingRuntime (``manifests/multinode``) that carries everything
cluster-wide (GPU pool node selector and toleration, securityContext, /dev/shm, S3 credentials and the
ConfigMap as env); the TrainJob itself carries only this run: image, N nodes x G GPUs, and the
``python -m torch.distributed.run --nnodes N --nproc_per_node G -m ppcl distill ... --resume`` command of
:func:`ppcl.launch.distill_command`, the same launch as the single-node pipeline step's. Only TrainJob fields that exist in every Trainer v2
release are used (runtimeRef, trainer.*), so it works on v2.0 as on the latest.

Data, plan and checkpoints live on S3 (``s3://`` URIs): every node reads the same latent cache and the rank-0
process writes checkpoints under ``--out``. Retry semantics (a KFP retry re-runs the whole step):
- the job name is derived from the output URI, so a retry finds the job of the previous attempt;
- still running -> attach to it (wait, stream logs); complete -> succeed at once;
- failed -> delete it and create it again: ``ppcl distill --resume`` continues from the last checkpoint
  found under the same ``--out``.
"""

from __future__ import annotations

import copy
import hashlib
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ppcl import cluster
from ppcl.errors import PPCLError
from ppcl.launch import distill_command

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
TEMPLATE = cluster.MANIFESTS_DIR / "trainjob" / "trainjob.yaml"
#: Labels JobSet puts on the pods of a TrainJob (the JobSet has the TrainJob's name); index 0 is node rank 0.
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
CONTAINER = "node"

_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class TrainJobSpec:
    """One multi-node distillation run.

    Attributes:
        model: teacher pipeline (``s3://`` folder or hub id) as ``ppcl distill --model`` takes it.
        plan: ``s3://.../plan.json``.
        data: ``s3://`` latent/text-embedding cache (output of ``ppcl encode``).
        out_uri: ``s3://`` folder for plugs and checkpoints; the same on every retry (resume).
        nodes: training nodes (pods), >= 1.
        gpus: GPUs (= torchrun processes) per node, >= 1.
        image: runtime image; default ``ppcl.cluster.default_image()``.
        name: TrainJob name; default derived from ``out_uri`` so a retry finds the same job.
        cpu, memory: per-node requests = limits (Kubernetes quantities).
        extra_args: more ``ppcl distill`` arguments (``--steps``, ``--lr`` ...).
    """

    model: str
    plan: str
    data: str
    out_uri: str
    nodes: int = 1
    gpus: int = cluster.GPU_POOL.accelerator_count
    image: str | None = None
    name: str | None = None
    cpu: str = "32"
    memory: str = "256Gi"
    extra_args: list[str] = field(default_factory=list)


def job_name(out_uri: str) -> str:
    """Deterministic TrainJob name for an output location: ``ppcl-distill-<10 hex of sha256(out_uri)>``."""
    return "ppcl-distill-" + hashlib.sha256(out_uri.rstrip("/").encode()).hexdigest()[:10]


def _check(spec: TrainJobSpec) -> str:
    """Validate ``spec`` (PPCLError naming the field); returns the image to use."""
    for fname in ("nodes", "gpus"):
        value = getattr(spec, fname)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PPCLError(f"trainjob: --{fname} must be an integer >= 1, got {value!r}")
    image = spec.image if spec.image is not None else cluster.default_image()
    if not image or not image.strip():
        raise PPCLError(f"trainjob: --image is missing (pass --image or set ${cluster.IMAGE_ENV})")
    if any(c.isspace() for c in image):
        raise PPCLError(f"trainjob: --image {image!r} contains whitespace")
    for fname in ("data", "plan", "out_uri"):
        value = getattr(spec, fname)
        if not value:
            raise PPCLError(f"trainjob: --{fname.replace('_', '-')} is missing")
        if not value.startswith("s3://") or len(value) <= len("s3://"):
            # Every node must see the same files; a local path exists only where this command runs.
            raise PPCLError(f"trainjob: --{fname.replace('_', '-')} must be an s3:// URI shared by all nodes, got {value!r}")
    if not spec.model:
        raise PPCLError("trainjob: --model is missing")
    if spec.model.startswith(("/", ".", "~")):
        raise PPCLError(f"trainjob: --model {spec.model!r} is a local path; give an s3:// URI or a hub id")
    if spec.name is not None and (not _NAME_RE.match(spec.name) or len(spec.name) > 63):
        raise PPCLError(f"trainjob: --name {spec.name!r} must be a DNS label (a-z, 0-9, '-', at most 63 chars)")
    return image


def render_trainjob(spec: TrainJobSpec, *, template: str | Path = TEMPLATE) -> dict[str, Any]:
    """The TrainJob object (a dict, as the API takes it) for ``spec``, from the manifests/ template."""
    image = _check(spec)
    try:
        job = yaml.safe_load(Path(template).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PPCLError(f"trainjob template {template}: {e}") from e
    job = copy.deepcopy(job)
    job["metadata"]["name"] = spec.name or job_name(spec.out_uri)
    trainer = job["spec"]["trainer"]
    trainer["image"] = image
    trainer["numNodes"] = spec.nodes
    trainer["numProcPerNode"] = spec.gpus
    # The launch of every distillation (ppcl.launch): node rank and master address from the PET_* variables the
    # Trainer injects; the image's `python` is the one ppcl is installed in.
    trainer["command"] = distill_command(spec.gpus, spec.nodes, python="python")
    trainer["args"] = [
        "--model", spec.model,
        "--plan", spec.plan,
        "--data", spec.data,
        "--out", spec.out_uri,
        *spec.extra_args,
        # Always: on a first attempt there is no checkpoint and distill starts from step 0.
        "--resume",
    ]
    gpu = cluster.GPU_POOL.accelerator_type
    for kind in ("requests", "limits"):
        res = trainer["resourcesPerNode"][kind]
        res[gpu] = spec.gpus
        res["cpu"] = spec.cpu
        res["memory"] = spec.memory
    return job


def to_yaml(obj: dict[str, Any]) -> str:
    """YAML text of one object, keys in template order."""
    return yaml.safe_dump(obj, sort_keys=False)


# --------------------------------------------------------------------------------------------- submit & wait


def _status_code(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def _state(job: dict[str, Any]) -> tuple[str, str]:
    """('Complete'|'Failed'|'Running', message) from a TrainJob's status conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return cond["type"], f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return "Running", ""


def _iter_lines(resp: Any) -> Iterator[str]:
    """Lines of a pod log response: a urllib3 response (``_preload_content=False``) or a plain string."""
    if isinstance(resp, str):
        yield from resp.splitlines()
        return
    buf = b""
    for chunk in resp.stream(decode_content=True):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if buf:
        yield buf.decode("utf-8", "replace")


def _pods(core_api: Any, namespace: str, name: str) -> list[Any]:
    return list(core_api.list_namespaced_pod(namespace, label_selector=f"{JOBSET_LABEL}={name}").items)


def _leader(pods: Iterable[Any]) -> Any | None:
    """The node-rank-0 pod that has started (its log carries the progress), newest first."""
    started = [
        p for p in pods
        if (p.metadata.labels or {}).get(JOB_INDEX_LABEL) == "0" and p.status.phase in ("Running", "Succeeded", "Failed")
    ]
    started.sort(key=lambda p: str(p.metadata.creation_timestamp or ""), reverse=True)
    return started[0] if started else None


def submit_trainjob(
    job: dict[str, Any],
    *,
    namespace: str,
    custom_api: Any,
    core_api: Any,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Create ``job`` (or attach to / replace the one of a previous attempt), wait, stream logs.

    Args:
        job: a rendered TrainJob (``render_trainjob``).
        namespace: where the TrainJob goes (the namespace of the TrainingRuntime and the secrets).
        custom_api: ``kubernetes.client.CustomObjectsApi`` (or a fake with the same methods).
        core_api: ``kubernetes.client.CoreV1Api`` (or a fake): pod listing and logs.
        poll_s: seconds between status polls while no log is streaming.
        timeout_s: give up (PPCLError) after this many seconds; None waits forever.
        log: sink for the job's log lines and our progress lines (default: stdout, i.e. the KFP step log).

    Returns:
        The TrainJob name once it is Complete. Raises PPCLError if it fails or times out.

    Uses exactly the permissions of manifests/multinode/rbac.yaml: trainjobs get/create/delete, pods list,
    pods/log get.
    """
    name = job["metadata"]["name"]
    where = f"TrainJob {namespace}/{name}"
    try:
        existing = custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as e:  # noqa: BLE001 - the kubernetes client raises ApiException; 404 means "none yet"
        if _status_code(e) != 404:
            raise PPCLError(f"{where}: cannot read it: {e}") from e
        existing = None
    if existing is not None:
        state, msg = _state(existing)
        if state == "Complete":
            log(f"[ppcl] {where} already complete (previous attempt)")
            return name
        if state == "Failed":
            log(f"[ppcl] {where} failed in a previous attempt ({msg}); recreating it to resume from its last checkpoint")
            _delete_and_wait(custom_api, namespace, name, poll_s=poll_s, sleep=sleep)
            existing = None
        else:
            log(f"[ppcl] {where} still running from a previous attempt; attaching")
    if existing is None:
        try:
            custom_api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        except Exception as e:  # noqa: BLE001
            raise PPCLError(f"{where}: creation refused: {getattr(e, 'reason', '') or e}") from e
        trainer = job["spec"]["trainer"]
        log(f"[ppcl] created {where}: {trainer['numNodes']} nodes x {trainer['numProcPerNode']} GPUs")

    start = time.monotonic()
    streamed: set[str] = set()
    while True:
        current = custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state, msg = _state(current)
        if state == "Complete":
            log(f"[ppcl] {where} complete")
            return name
        if state == "Failed":
            _log_failed_pods(core_api, namespace, name, log)
            raise PPCLError(f"{where} failed: {msg or 'no reason given'}")
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise PPCLError(f"{where} not finished after {timeout_s:g} s (still running; delete it or retry)")
        leader = _leader(_pods(core_api, namespace, name))
        if leader is not None and leader.metadata.uid not in streamed:
            streamed.add(leader.metadata.uid)
            # follow=True blocks until the container exits, which is exactly the wait we need meanwhile.
            resp = core_api.read_namespaced_pod_log(
                leader.metadata.name, namespace, container=CONTAINER, follow=True, _preload_content=False
            )
            for line in _iter_lines(resp):
                log(line)
        else:
            sleep(poll_s)


def _delete_and_wait(custom_api: Any, namespace: str, name: str, *, poll_s: float, sleep: Callable[[float], None]) -> None:
    """Delete a TrainJob (foreground: its pods go first) and wait until the name is free."""
    try:
        custom_api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground"
        )
    except Exception as e:  # noqa: BLE001
        if _status_code(e) != 404:
            raise PPCLError(f"TrainJob {namespace}/{name}: cannot delete the failed attempt: {e}") from e
    for _ in range(360):
        try:
            custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as e:  # noqa: BLE001
            if _status_code(e) == 404:
                return
            raise
        sleep(poll_s)
    raise PPCLError(f"TrainJob {namespace}/{name}: the failed attempt is still being deleted")


def _log_failed_pods(core_api: Any, namespace: str, name: str, log: Callable[[str], None], tail: int = 50) -> None:
    """Last lines of every failed pod of the job: the rank that crashed is often not rank 0."""
    for pod in _pods(core_api, namespace, name):
        if pod.status.phase != "Failed":
            continue
        log(f"[ppcl] --- last {tail} lines of failed pod {pod.metadata.name} ---")
        try:
            text = core_api.read_namespaced_pod_log(pod.metadata.name, namespace, container=CONTAINER, tail_lines=tail)
        except Exception as e:  # noqa: BLE001 - a log that is gone must not hide the failure itself
            log(f"[ppcl] (log unavailable: {e})")
            continue
        for line in _iter_lines(text):
            log(line)


def kubernetes_clients(namespace: str | None = None) -> tuple[Any, Any, str]:
    """(CustomObjectsApi, CoreV1Api, namespace) from the in-cluster service account, else ~/.kube/config.

    The namespace defaults to the pod's own (in cluster) or the kubeconfig context's, else ``kubeflow``.
    """
    from kubernetes import client, config

    sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        config.load_incluster_config()
        default_ns = sa_ns.read_text().strip() if sa_ns.is_file() else "kubeflow"
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as e:
            raise PPCLError(f"no Kubernetes access: not in a cluster and no usable kubeconfig ({e})") from e
        try:
            _, ctx = config.list_kube_config_contexts()
            default_ns = (ctx or {}).get("context", {}).get("namespace") or "kubeflow"
        except (config.ConfigException, OSError):
            default_ns = "kubeflow"
    return client.CustomObjectsApi(), client.CoreV1Api(), namespace or default_ns


def submit(spec: TrainJobSpec, *, namespace: str | None = None, timeout_s: float | None = None) -> str:
    """Render ``spec``, submit it to the current cluster and wait (what the distill component's
    multi-node mode and ``ppcl cluster submit-trainjob`` call). Returns the TrainJob name."""
    job = render_trainjob(spec)
    custom_api, core_api, ns = kubernetes_clients(namespace)
    return submit_trainjob(job, namespace=ns, custom_api=custom_api, core_api=core_api, timeout_s=timeout_s,
                           log=lambda line: print(line, file=sys.stdout, flush=True))
