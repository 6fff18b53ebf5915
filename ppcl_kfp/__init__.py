"""ppcl_kfp: the Python of the DAG layer (system.md: pipelines -> components -> ppcl).

The library ``ppcl/`` computes; ``components/`` wraps one stage each for KFP; ``pipelines/`` chains them. This
package is the code that drives those two folders of the source checkout: :mod:`ppcl_kfp.dag` loads, compiles
and runs them (locally with kfp.local, or on a cluster), and :mod:`ppcl_kfp.cli` holds the ``ppcl pipeline`` and
``ppcl demo`` commands. It imports ppcl; ppcl never imports it (tests/test_layers.py): the ``ppcl`` dispatcher
names these commands' modules as strings (see :mod:`ppcl.cli`).

``ppcl cluster`` and ``ppcl bench`` stay in the library: neither touches components/ or pipelines/ (cluster
renders manifests/ and the multi-node TrainJob that the distill stage itself submits; bench calls the library's
stage functions directly, without KFP).

Installed by the same pyproject as ppcl. ``components/`` and ``pipelines/`` themselves stay folders of the
checkout, loaded by path (:data:`ppcl_kfp.dag.REPO_ROOT`).
"""
