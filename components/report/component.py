"""KFP component ``report``: one HTML page and plots across all evaluated ratios.

Body: marshalling only; the work is :func:`ppcl.stages.report`. ``evaluations`` is a list (``dsl.Collected``
over the ratio loop in the ppcl pipeline); ``report`` is the page the KFP UI renders, ``plots`` the folder
with the page, its plots and a summary.
"""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from ppcl.cluster import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def report(
    evaluations: Input[List[Artifact]],
    settings: dict,
    report: Output[HTML],
    plots: Output[Artifact],
    metrics: Output[Metrics],
):
    """Write the cross-ratio report of ``evaluations`` (folders with metrics.json)."""
    import shutil
    from pathlib import Path

    from ppcl import stages

    for name, value in stages.report([e.path for e in evaluations], plots.path, settings).items():
        metrics.log_metric(name, value)
    shutil.copyfile(Path(plots.path) / "report.html", report.path)
