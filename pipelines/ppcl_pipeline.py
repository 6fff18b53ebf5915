"""The ppcl DAG on Kubeflow Pipelines (system.md):

    shard -> encode -> probe -> select -> distill (GPU) -> ParallelFor(ratio): export -> evaluate (GPU) -> report

Compile: ``ppcl pipeline compile`` (writes pipelines/ppcl_pipeline.yaml, the file committed and uploaded to
Kubeflow) or ``python pipelines/ppcl_pipeline.py``. The components are the ones of ``components/`` (loaded from
their Python definitions so ``$PPCL_IMAGE`` set at compile time reaches every step).

Cluster settings, every name from :mod:`ppcl.cluster` (the manifests use the same):
- every step: the S3 credentials Secret and the cluster ConfigMap as environment variables (values never
  appear in the compiled YAML, only the Secret/ConfigMap names and keys), CPU and memory requests;
- probe, distill and evaluate: the accelerator type, the GPU pool's node selector and tolerations; the
  accelerator count ``resources.gpu.count`` for evaluate, ``distill.gpus_per_node`` (default: the same count)
  for distill, which starts one training process per GPU (:mod:`ppcl.launch`; with several, a 32 GiB memory
  /dev/shm for NCCL), one GPU for the probe (one process running its teacher in bf16;
  on CPU in fp32 a 20B teacher needs ~99 GB of RAM). Not distill in multi-node mode (``distill.nodes`` > 1 at
  compile time): its pod only submits the TrainJob;
- caching: on for every stage whose output is a function of its inputs; OFF for shard (it reads an external
  source whose URI may stay the same while its content changes; shard itself skips unchanged shards) and for
  report (cheap, and it should reflect the evaluations just run);
- retries (exponential backoff from 30 s): steps that move data through S3 or may lose a preemptible GPU node
  (shard, encode, distill, export, evaluate); distill resumes from its last checkpoint inside its output.
"""


from typing import List

from kfp import dsl, kubernetes

from ppcl import cluster
from ppcl.config import RunConfig
from ppcl_kfp.dag import load_component

PIPELINE_NAME = "ppcl"
GPU_STAGES = ("probe", "distill", "evaluate")
CACHED_STAGES = ("encode", "probe", "select", "distill", "export", "evaluate")
RETRIED_STAGES = {"shard": 2, "encode": 2, "distill": 1, "export": 2, "evaluate": 2}
#: /dev/shm of a multi-GPU distill pod (the TrainingRuntime of manifests/multinode gives its nodes the same)
DISTILL_SHM = "32Gi"


def _configure(task: dsl.PipelineTask, stage: str, config: RunConfig) -> dsl.PipelineTask:  # noqa: D401
    """Resources, scheduling, credentials, caching and retries of one step (see the module docstring)."""
    res = config.resources.stages[stage]
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    task.set_caching_options(stage in CACHED_STAGES)
    if stage in RETRIED_STAGES:
        task.set_retry(num_retries=RETRIED_STAGES[stage], backoff_duration="30s", backoff_factor=2.0)
    # Multi-node distill trains in a TrainJob; its own pod only submits, waits and downloads: no GPU.
    if stage in GPU_STAGES and not (stage == "distill" and config.distill.nodes > 1):
        # the probe is one process on one device: more GPUs would sit idle; distill starts one process per GPU
        # (distill.gpus_per_node, which defaults to resources.gpu.count: ppcl.launch)
        count = {"probe": 1, "distill": config.distill.gpus_per_node}.get(stage, config.resources.gpu.count)
        task.set_accelerator_type(config.resources.gpu.type).set_accelerator_limit(count)
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


def _defaults(config: RunConfig | None) -> RunConfig:
    # The committed YAML: the schema's defaults; "teacher" stays a required run parameter (see make_pipeline).
    return config if config is not None else RunConfig(teacher="<required>")


def pipeline_arguments(config: RunConfig) -> dict:
    """The run arguments of :func:`make_pipeline`'s pipeline for ``config`` (local run and submit use them)."""
    return {
        "teacher": config.teacher,
        "data_source": config.data.source or "",
        "ratios": list(config.ratios),
        "keep_params": config.keep_params,
        "distill_steps": config.distill.steps,
        "learning_rate": config.distill.lr,
        **{f"{stage}_settings": config.stage_settings(stage) for stage in
           ("shard", "encode", "probe", "select", "distill", "export", "evaluate")},
    }  # fmt: skip


def make_pipeline(config: RunConfig | None = None, *, ratio_parallelism: int = 0):
    """The pipeline function for ``config``'s resources and defaults (None: schema defaults, teacher required).

    ``ratio_parallelism``: how many ratio branches run at once (0: all). On a cluster each branch has its own
    GPU pod; a local run shares one machine, where concurrent branches would time each other's latency.
    """
    cfg = _defaults(config)
    args = pipeline_arguments(cfg)
    shard, encode, probe, select = (load_component(s) for s in ("shard", "encode", "probe", "select"))
    distill, export, evaluate, report = (load_component(s) for s in ("distill", "export", "evaluate", "report"))

    def ppcl(
        teacher: str,
        data_source: str = args["data_source"],
        ratios: List[float] = args["ratios"],
        keep_params: float = args["keep_params"],
        distill_steps: int = args["distill_steps"],
        learning_rate: float = args["learning_rate"],
        shard_settings: dict = args["shard_settings"],
        encode_settings: dict = args["encode_settings"],
        probe_settings: dict = args["probe_settings"],
        select_settings: dict = args["select_settings"],
        distill_settings: dict = args["distill_settings"],
        export_settings: dict = args["export_settings"],
        evaluate_settings: dict = args["evaluate_settings"],
    ):
        """PPCL compression of a diffusers MMDiT: probe, select contiguous intervals, distil plugs, export and
        evaluate one pruned model per keep-params ratio, report."""
        t_shard = _configure(shard(source=data_source, settings=shard_settings), "shard", cfg)
        t_encode = _configure(encode(teacher=teacher, data=t_shard.outputs["data"], settings=encode_settings),
                              "encode", cfg)  # fmt: skip
        t_probe = _configure(probe(teacher=teacher, cache=t_encode.outputs["cache"], settings=probe_settings),
                             "probe", cfg)  # fmt: skip
        t_select = _configure(select(probe=t_probe.outputs["probe"], settings=select_settings), "select", cfg)
        t_distill = _configure(
            distill(teacher=teacher, plan=t_select.outputs["plan"], cache=t_encode.outputs["cache"],
                    steps=distill_steps, learning_rate=learning_rate, settings=distill_settings),
            "distill", cfg,
        )  # fmt: skip
        with dsl.ParallelFor(ratios, name="ratio", parallelism=ratio_parallelism) as ratio:
            t_export = _configure(
                export(teacher=teacher, plan=t_select.outputs["plan"], plugs=t_distill.outputs["plugs"],
                       keep_params=ratio, settings=export_settings),
                "export", cfg,
            )  # fmt: skip
            t_eval = _configure(
                evaluate(model=t_export.outputs["model"], teacher=teacher, settings=evaluate_settings),
                "evaluate", cfg,
            )  # fmt: skip
        _configure(report(evaluations=dsl.Collected(t_eval.outputs["evaluation"]), settings={}), "report", cfg)

    if config is not None:
        ppcl.__defaults__ = None
        ppcl.__kwdefaults__ = None
        import inspect

        sig = inspect.signature(ppcl)
        params = [p.replace(default=args[p.name]) for p in sig.parameters.values()]
        ppcl.__signature__ = sig.replace(parameters=params)
    return dsl.pipeline(name=cfg.name if config is not None else PIPELINE_NAME)(ppcl)


if __name__ == "__main__":  # python pipelines/ppcl_pipeline.py -> pipelines/ppcl_pipeline.yaml
    from ppcl_kfp.dag import compile_pipeline

    print(compile_pipeline())
