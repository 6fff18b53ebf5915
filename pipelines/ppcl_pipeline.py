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

from kfp import dsl

from ppcl.config import RunConfig
from ppcl_kfp.dag import load_component
from ppcl_kfp.tasks import CACHED_STAGES, DISTILL_SHM, GPU_STAGES, RETRIED_STAGES, configure_task  # noqa: F401

PIPELINE_NAME = "ppcl"


def _configure(task: dsl.PipelineTask, stage: str, config: RunConfig) -> dsl.PipelineTask:
    """Resources, scheduling, credentials, caching and retries of one step: :func:`ppcl_kfp.tasks.configure_task`,
    the helper a reused component gets too (one definition of the cluster settings)."""
    return configure_task(task, stage, config)


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
