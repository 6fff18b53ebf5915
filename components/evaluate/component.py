"""KFP component ``evaluate``: a pruned pipeline against its teacher (FID, CLIP, fidelity, latency, memory).

Body: marshalling only; the work is :func:`ppcl.stages.evaluate`. ``report`` is a copy of the evaluation's
report.html so the KFP UI renders it.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from ppcl.cluster import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def evaluate(
    model: Input[Model],
    teacher: str,
    settings: dict,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Evaluate ``model`` against ``teacher``; ``evaluation`` holds metrics.json, grid.png and report.html."""
    import shutil
    from pathlib import Path

    from ppcl import stages

    for name, value in stages.evaluate(model.path, teacher, evaluation.path, settings).items():
        metrics.log_metric(name, value)
    shutil.copyfile(Path(evaluation.path) / "report.html", report.path)
