"""Evaluation of pruned pipelines against their teacher (method.md section 5).

Entry point: :func:`ppcl.evaluate.evaluation.evaluate_models` writes ``metrics.json`` (schema
:mod:`ppcl.evaluate.metrics`), ``grid.png`` and ``report.html``. The pieces are usable on their own:

- :mod:`~ppcl.evaluate.generate`: ``read_prompts``, ``make_samples``, ``generate`` (latents + images, one run);
- :mod:`~ppcl.evaluate.fid`: ``frechet_distance``, ``FIDAccumulator``, ``load_extractor``, ``reference_statistics``;
- :mod:`~ppcl.evaluate.clip`: ``load_clip``, ``ClipScorer``, ``clip_score``, ``build_tiny_clip``;
- :mod:`~ppcl.evaluate.fidelity`: ``fidelity``, ``FidelityAccumulator``, ``psnr_db``;
- :mod:`~ppcl.evaluate.cost`: ``capture_transformer_call``, ``measure_latency``, ``PeakMemory``.

The package itself re-exports nothing: each name is imported from the module that defines it, so importing one
piece (the CLI's ``--help`` reads :mod:`~ppcl.evaluate.metrics`) never loads the others, and the package cannot
sit in an import cycle with its own modules.
"""
