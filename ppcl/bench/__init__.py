"""The reference benchmark (issue 9): a small trained FLUX-family teacher and an automatic judge.

- :mod:`ppcl.bench.judge`: ``load_judge()``, ``judge_accuracy(images, attributes)``, ``judge_scores``,
  ``judge_features(images)`` and ``judge_fid``; weights in ``assets/judge.safetensors``.
- :mod:`ppcl.bench.teacher`: the training script of ``assets/reference-teacher/`` (a stock diffusers
  FluxPipeline directory) and its evaluation with the judge.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
REFERENCE_TEACHER = ASSETS / "reference-teacher"
