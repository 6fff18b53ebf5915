"""The ppcl KFP components, one folder per stage (``component.py``, the compiled ``component.yaml``, a README).

Installed as ``ppcl_kfp.components`` (``ppcl_kfp/components`` links to this folder, so the checkout and the
installed package hold the same files). Reuse one in your own pipeline with
:func:`ppcl_kfp.tasks.load_component` and :func:`ppcl_kfp.tasks.configure_task` (README, "Reuse a component").
"""
