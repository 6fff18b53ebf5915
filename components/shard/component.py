"""KFP component ``shard``: raw image-text source -> deterministic Parquet shards + manifest.json.

Body: marshalling only; the work is :func:`ppcl.stages.shard`.
"""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from ppcl.cluster import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def shard(source: str, settings: dict, data: Output[Dataset], metrics: Output[Metrics]):
    """Shard ``source`` (imagefolder / Parquet / WebDataset; local path or s3://; empty: synthetic data)."""
    from ppcl import stages

    for name, value in stages.shard(source, data.path, settings).items():
        metrics.log_metric(name, value)
