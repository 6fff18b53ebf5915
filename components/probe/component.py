"""KFP component ``probe``: streaming block-similarity statistics of the teacher (CKA, linear probes, trend).

Body: marshalling only; the work is :func:`ppcl.stages.probe`.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from ppcl.cluster import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def probe(teacher: str, cache: Input[Dataset], settings: dict, probe: Output[Artifact], metrics: Output[Metrics]):
    """Probe ``teacher`` on calibration samples from ``cache``; ``probe`` holds probe.json and plots."""
    from ppcl import stages

    for name, value in stages.probe(teacher, cache.path, probe.path, settings).items():
        metrics.log_metric(name, value)
