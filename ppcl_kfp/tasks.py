"""The cluster settings of one KFP task, in one place: used by the ppcl pipeline for each of its steps and by
anyone who reuses a ppcl component in their own pipeline.

A component alone (``component.yaml``) knows its inputs and its command; what makes it run on OUR cluster is
set on the task: the runtime image, the S3 credentials Secret and the cluster ConfigMap as environment variables
(names from :mod:`ppcl.cluster`, values never in the YAML), CPU and memory requests, and for the GPU stages the
accelerator type and count with the GPU pool's node selector and tolerations. Without these a reused task runs
on a placeholder image, cannot read ``s3://`` and lands on a CPU node. :func:`configure_task` applies them;
:func:`load_component` gives the component of a stage from the installed package (``ppcl_kfp.components``, the
``components/`` folder of the checkout)::

    from kfp import dsl
    from ppcl_kfp.tasks import configure_task, load_component

    evaluate = load_component("evaluate")

    @dsl.pipeline(name="score-my-model")
    def score():
        model = dsl.importer(artifact_uri="s3://models/my-pruned-flux", artifact_class=dsl.Model).output
        task = evaluate(model=model, teacher="s3://models/flux-dev", settings={"prompts": ["a cat"]})
        configure_task(task, "evaluate", image="ghcr.io/me/ppcl:0.1.0", gpus=1)

Decisions: caching is on for every stage whose output is a function of its inputs; off for shard (its source
URI may keep its name while its content changes) and report (cheap, and it should reflect the evaluations just
run). Retries with exponential backoff from 30 s for steps that move data through S3 or may lose a preemptible
GPU node. The probe gets one GPU whatever the count (one process, one device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ppcl import cluster
from ppcl.config import STAGES, RunConfig
from ppcl.errors import PPCLError

GPU_STAGES = ("probe", "distill", "evaluate")
CACHED_STAGES = ("encode", "probe", "select", "distill", "export", "evaluate")
RETRIED_STAGES = {"shard": 2, "encode": 2, "distill": 1, "export": 2, "evaluate": 2}
#: /dev/shm of a multi-GPU distill pod (the TrainingRuntime of manifests/multinode gives its nodes the same)
DISTILL_SHM = "32Gi"

#: The components folder, a package of this one (``ppcl_kfp/components`` is the checkout's ``components/``).
COMPONENTS_DIR = Path(__file__).resolve().parent / "components"


def component_yaml(stage: str) -> Path:
    """The compiled ``component.yaml`` of ``stage`` (shipped with the installed package)."""
    if stage not in STAGES:
        raise PPCLError(f"unknown stage '{stage}': expected one of {', '.join(STAGES)}")
    path = COMPONENTS_DIR / stage / "component.yaml"
    if not path.is_file():
        raise PPCLError(f"{path} not found: this ppcl_kfp install lacks its components")
    return path


def load_component(stage: str):
    """The KFP component of ``stage``, loaded from its compiled ``component.yaml``."""
    from kfp import components

    return components.load_component_from_file(str(component_yaml(stage)))


def configure_task(task, stage: str, config: RunConfig | None = None, *, image: str | None = None,
                   gpus: int | None = None, gpu_type: str | None = None, cpu: str | None = None,
                   memory: str | None = None) -> Any:
    """Apply the cluster settings of ``stage`` to the KFP ``task`` (see the module doc); returns the task.

    Args:
        task: a ``PipelineTask`` of a ppcl component (or of any container component).
        stage: which ppcl stage it runs (decides GPU, caching and retries).
        config: the run config whose ``resources`` and ``tracking.experiment`` apply (default: the schema's
            defaults, e.g. 1 ``nvidia.com/gpu``, experiment ``ppcl``).
        image: the runtime image (default: the one compiled into the component, ``$PPCL_IMAGE`` at compile time).
        gpus, gpu_type: override ``config.resources.gpu`` for a GPU stage (distill: ``config.distill.gpus_per_node``;
            the component's ``gpus_per_node`` setting must say the same, it starts one process per GPU).
        cpu, memory: override the stage's requests.
    """
    from kfp import kubernetes

    if stage not in STAGES:
        raise PPCLError(f"unknown stage '{stage}': expected one of {', '.join(STAGES)}")
    config = config if config is not None else RunConfig(teacher="<required>")
    if image:
        if task.container_spec is None:
            raise PPCLError(f"configure_task: task {task.name} is not a container component; cannot set its image")
        task.container_spec.image = image
    res = config.resources.stages[stage]
    task.set_cpu_request(cpu or res.cpu).set_memory_request(memory or res.memory)
    task.set_caching_options(stage in CACHED_STAGES)
    if stage in RETRIED_STAGES:
        task.set_retry(num_retries=RETRIED_STAGES[stage], backoff_duration="30s", backoff_factor=2.0)
    # Multi-node distill trains in a TrainJob; its own pod only submits, waits and downloads: no GPU.
    if stage in GPU_STAGES and not (stage == "distill" and config.distill.nodes > 1):
        # the probe is one process on one device: more GPUs would sit idle; distill starts one process per GPU
        # (distill.gpus_per_node, which defaults to resources.gpu.count: ppcl.launch)
        count = {"probe": 1, "distill": gpus or config.distill.gpus_per_node}.get(
            stage, gpus or config.resources.gpu.count)
        task.set_accelerator_type(gpu_type or config.resources.gpu.type).set_accelerator_limit(count)
        if stage == "distill" and count > 1:
            # NCCL between the processes of one pod goes through /dev/shm; a container's default is 64 MiB
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=DISTILL_SHM)
        for key, value in cluster.GPU_POOL.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in cluster.GPU_POOL.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    # optional: a local Kubeflow without the Secret/ConfigMap still runs (stages then use local defaults)
    kubernetes.use_secret_as_env(task, cluster.S3_SECRET.name, cluster.S3_SECRET.key_to_env, optional=True)
    kubernetes.use_config_map_as_env(task, cluster.CONFIG_MAP.name, cluster.CONFIG_MAP.key_to_env, optional=True)
    # The tracking layer groups every step of a run under this experiment (cluster runs have no local env).
    task.set_env_variable("MLFLOW_EXPERIMENT_NAME", config.tracking.experiment)
    return task.set_display_name(stage)
