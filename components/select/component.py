"""KFP component ``select``: probe.json -> plan.json (contiguous intervals under a parameter budget).

Body: marshalling only; the work is :func:`ppcl.stages.select`.
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from ppcl.cluster import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def select(probe: Input[Artifact], settings: dict, plan: Output[Artifact], metrics: Output[Metrics]):
    """Select the intervals to prune from ``probe``; ``plan`` holds plan.json."""
    from ppcl import stages

    for name, value in stages.select(probe.path, plan.path, settings).items():
        metrics.log_metric(name, value)
