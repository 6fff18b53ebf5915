"""Evaluation of pruned pipelines against their teacher (method.md section 5).

Entry point: :func:`evaluate_models` writes ``metrics.json`` (schema :mod:`ppcl.evaluate.metrics`), ``grid.png``
and ``report.html``. The pieces are usable on their own:

- :mod:`~ppcl.evaluate.generate`: ``read_prompts``, ``make_samples``, ``generate`` (latents + images, one run);
- :mod:`~ppcl.evaluate.fid`: ``frechet_distance``, ``FIDAccumulator``, ``load_extractor``, ``reference_statistics``;
- :mod:`~ppcl.evaluate.clip`: ``load_clip``, ``ClipScorer``, ``clip_score``, ``build_tiny_clip``;
- :mod:`~ppcl.evaluate.fidelity`: ``fidelity``, ``FidelityAccumulator``, ``psnr_db``;
- :mod:`~ppcl.evaluate.cost`: ``capture_transformer_call``, ``measure_latency``, ``PeakMemory``.

Heavy libraries are imported lazily (this package is imported by the CLI's ``--help``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ppcl.evaluate.metrics import METRICS_VERSION, EvalMetrics, EvalSettings, ModelMetrics, load_metrics

if TYPE_CHECKING:  # pragma: no cover
    from ppcl.evaluate.evaluation import EvalResult, evaluate_models

__all__ = [
    "METRICS_VERSION", "EvalMetrics", "EvalResult", "EvalSettings", "ModelMetrics", "evaluate_models",
    "load_metrics", "frechet_distance", "FIDAccumulator", "clip_score", "fidelity", "measure_latency",
]

_LAZY = {
    "evaluate_models": "ppcl.evaluate.evaluation",
    "EvalResult": "ppcl.evaluate.evaluation",
    "frechet_distance": "ppcl.evaluate.fid",
    "FIDAccumulator": "ppcl.evaluate.fid",
    "clip_score": "ppcl.evaluate.clip",
    "fidelity": "ppcl.evaluate.fidelity",
    "measure_latency": "ppcl.evaluate.cost",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
