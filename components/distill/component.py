"""KFP component ``distill``: train every plug of the plan against the frozen teacher (GPU stage).

Body: marshalling only; the work is :func:`ppcl.stages.distill`. ``steps`` and ``learning_rate`` are separate
parameters (the pipeline exposes them at the top level); they override the same keys of ``settings``. With
``settings["gpus_per_node"] > 1`` the step trains with one process per GPU of its pod (:mod:`ppcl.launch`); with
``settings["nodes"] > 1`` it submits a multi-node TrainJob and waits for it instead of training itself.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from ppcl.cluster import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def distill(
    teacher: str,
    plan: Input[Artifact],
    cache: Input[Dataset],
    steps: int,
    learning_rate: float,
    settings: dict,
    plugs: Output[Model],
    metrics: Output[Metrics],
):
    """Distil the plugs of ``plan`` from ``teacher`` on ``cache``; ``plugs`` holds the trained plugs."""
    from ppcl import stages

    settings = {**settings, "steps": steps, "lr": learning_rate}  # the setting is `lr`
    # The artifact URIs serve the multi-node mode (settings "nodes" > 1), whose TrainJob reads the cache from S3.
    for name, value in stages.distill(teacher, plan.path, cache.path, plugs.path, settings, cache_uri=cache.uri,
                                      out_uri=plugs.uri).items():
        metrics.log_metric(name, value)
