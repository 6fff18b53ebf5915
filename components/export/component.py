"""KFP component ``export``: build the pruned pipeline at one keep-params ratio from the trained plugs.

Body: marshalling only; the work is :func:`ppcl.stages.export`.
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from ppcl.cluster import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def export(
    teacher: str,
    plan: Input[Artifact],
    plugs: Input[Model],
    keep_params: float,
    settings: dict,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Export ``teacher`` pruned to ``keep_params`` of its transformer parameters; ``model`` is a pipeline folder."""
    from ppcl import stages

    for name, value in stages.export(teacher, plan.path, plugs.path, keep_params, model.path, settings).items():
        metrics.log_metric(name, value)
