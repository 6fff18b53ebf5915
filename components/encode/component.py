"""KFP component ``encode``: data shards -> cache of VAE latents and prompt embeddings (teacher's encoders).

Body: marshalling only; the work is :func:`ppcl.stages.encode`.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from ppcl.cluster import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def encode(teacher: str, data: Input[Dataset], settings: dict, cache: Output[Dataset], metrics: Output[Metrics]):
    """Encode the shards in ``data`` with ``teacher``'s VAE and text encoders into ``cache``."""
    from ppcl import stages

    for name, value in stages.encode(teacher, data.path, cache.path, settings).items():
        metrics.log_metric(name, value)
