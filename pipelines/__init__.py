"""The ppcl pipeline (``ppcl_pipeline.py``) and its compiled YAML; installed as ``ppcl_kfp.pipelines``
(``ppcl_kfp/pipelines`` links to this folder)."""
