"""Names the compiled pipeline and the cluster manifests share: the one source of truth.

The pipeline (kfp-kubernetes ``use_secret_as_env``, ``use_config_map_as_env``, ``add_node_selector``,
``add_toleration``, ``set_accelerator_type``/``set_accelerator_limit``) and the kustomize manifests under
``manifests/`` must agree on every name below; ``tests/test_manifests.py`` renders every overlay and fails if
a Secret, ConfigMap, key, label or taint there differs from this module.

Design choices recorded here (system.md is silent on them):
- Generated Secret/ConfigMap names carry no kustomize hash suffix: the compiled pipeline refers to them by a
  fixed name, so a changed value takes effect on the next pipeline step (and after a restart of MLflow).
- No MLflow credentials Secret: the tracking server of ``manifests/`` is a ClusterIP service without auth,
  reachable only inside the cluster. A site that fronts MLflow with auth adds ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` to the S3 secret's env file; nothing here needs to change.
- The GPU pool is selected by the label the NVIDIA GPU operator's feature discovery puts on every GPU node
  (``nvidia.com/gpu.present=true``) and tolerated through the common ``nvidia.com/gpu`` NoSchedule taint
  (GKE/AKS/EKS GPU pools set it; ``docs/kubeflow.md`` shows how to set both by hand).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ppcl import __version__
from ppcl.errors import PPCLError

#: Environment variable that overrides the runtime image everywhere (pipeline compile, TrainJob render).
IMAGE_ENV = "PPCL_IMAGE"
#: Repository of the published runtime image; the tag defaults to the package version.
IMAGE_REPOSITORY = "ghcr.io/ppcl/ppcl"


def default_image() -> str:
    """The runtime image: ``$PPCL_IMAGE`` if set, else ``ghcr.io/ppcl/ppcl:<ppcl version>``."""
    return os.environ.get(IMAGE_ENV) or f"{IMAGE_REPOSITORY}:{__version__}"


@dataclass(frozen=True)
class EnvSource:
    """A Kubernetes Secret or ConfigMap whose keys become environment variables of the same names."""

    name: str
    keys: tuple[str, ...]

    @property
    def key_to_env(self) -> dict[str, str]:
        """The mapping kfp-kubernetes' ``use_secret_as_env`` / ``use_config_map_as_env`` take (key -> env var)."""
        return {k: k for k in self.keys}


@dataclass(frozen=True)
class Toleration:
    """One pod toleration; ``value`` is None with operator ``Exists`` (any value of the taint)."""

    key: str
    operator: str
    effect: str
    value: str | None = None

    def as_k8s(self) -> dict[str, str]:
        out = {"key": self.key, "operator": self.operator, "effect": self.effect}
        if self.value is not None:
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class GpuPool:
    """Where GPU stages run: node selector, tolerations, and the default accelerator request."""

    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: tuple[Toleration, ...] = (Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),)
    #: the extended resource the NVIDIA device plugin advertises (``set_accelerator_type``).
    accelerator_type: str = "nvidia.com/gpu"
    #: GPUs per GPU stage pod by default (``set_accelerator_limit``).
    accelerator_count: int = 1


#: S3 credentials (any S3 API: AWS, MinIO, SeaweedFS); boto3 and MLflow read these env vars natively.
S3_SECRET = EnvSource(name="ppcl-s3-credentials", keys=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))

#: Database of the MLflow server: ``MLFLOW_BACKEND_STORE_URI`` (a SQLAlchemy DSN) and, in the dev overlay,
#: the in-cluster PostgreSQL password (libpq reads it as PGPASSWORD, so the DSN carries none). Only the MLflow
#: Deployment reads it; pipeline steps never see the database.
MLFLOW_DB_SECRET = EnvSource(name="ppcl-mlflow-db", keys=("MLFLOW_BACKEND_STORE_URI", "POSTGRES_PASSWORD"))

#: Non-secret cluster settings every pipeline step reads through env. ``AWS_ENDPOINT_URL`` is what boto3
#: (>=1.28) and MLflow's S3 artifact client honour; ``PPCL_S3_ENDPOINT`` is the same URL for ppcl's own code.
CONFIG_MAP = EnvSource(
    name="ppcl-cluster-config",
    keys=(
        "PPCL_IMAGE",
        "MLFLOW_TRACKING_URI",
        "PPCL_S3_ENDPOINT",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "PPCL_BUCKET",
    ),
)

GPU_POOL = GpuPool()

#: Service account the KFP pipeline steps run as (standalone KFP; multi-user Kubeflow uses ``default-editor``
#: in each profile namespace, see docs/kubeflow.md), and the Role it is bound to for the multi-node path.
PIPELINE_RUNNER_SA = "pipeline-runner"
TRAINJOB_ROLE = "ppcl-trainjob-submitter"

#: The namespaced Kubeflow Trainer runtime that ppcl's TrainJobs reference (manifests/multinode/).
TRAINING_RUNTIME = "ppcl-torch-distributed"

#: Name and port of the in-cluster MLflow tracking service.
MLFLOW_SERVICE = "ppcl-mlflow"
MLFLOW_PORT = 5000

#: The manifests/ folder: $PPCL_MANIFESTS_DIR (the image sets it: the package is installed into
#: site-packages there, away from the checkout), else the one beside the package in a checkout.
MANIFESTS_DIR = Path(os.environ.get("PPCL_MANIFESTS_DIR") or Path(__file__).resolve().parent.parent / "manifests")


def _env_files(kustomization: Path) -> list[Path]:
    """Env files the secretGenerators of one kustomization read (relative to its folder)."""
    doc = yaml.safe_load(kustomization.read_text()) or {}
    return [kustomization.parent / env for gen in doc.get("secretGenerator", []) or [] for env in gen.get("envs", []) or []]


def render_overlay(overlay: str | os.PathLike, *, kubectl: str | None = None) -> str:
    """``kubectl kustomize`` one overlay and return the YAML stream.

    Checks first that every secret env file the overlay (and the folders it pulls in) needs exists, so a fresh
    clone gets "create manifests/overlays/dev/s3.env from s3.env.example" instead of a kustomize stack trace.

    Args:
        overlay: a folder with a kustomization.yaml, or the name of one under manifests/overlays/.
        kubectl: the kubectl binary (default: the one on PATH).
    """
    path = Path(overlay)
    if not path.is_dir() and (MANIFESTS_DIR / "overlays" / str(overlay)).is_dir():
        path = MANIFESTS_DIR / "overlays" / str(overlay)
    kfile = path / "kustomization.yaml"
    if not kfile.is_file():
        raise PPCLError(f"{path}: no kustomization.yaml (an overlay is a folder such as manifests/overlays/dev)")
    pending, seen = [path], set()
    while pending:
        folder = pending.pop().resolve()
        if folder in seen or not (folder / "kustomization.yaml").is_file():
            continue
        seen.add(folder)
        for env in _env_files(folder / "kustomization.yaml"):
            if not env.is_file():
                example = env.with_name(env.name + ".example")
                hint = f" (copy {example.name} and fill it in)" if example.is_file() else ""
                raise PPCLError(f"overlay {path}: secret env file {env} is missing{hint}")
        doc = yaml.safe_load((folder / "kustomization.yaml").read_text()) or {}
        pending += [folder / r for r in (doc.get("resources") or []) + (doc.get("components") or [])]
    exe = kubectl or shutil.which("kubectl")
    if not exe:
        raise PPCLError("kubectl not found on PATH (needed to render manifests with `kubectl kustomize`)")
    proc = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PPCLError(f"kubectl kustomize {path} failed: {proc.stderr.strip()}")
    return proc.stdout
