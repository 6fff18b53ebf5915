"""ppcl: Pluggable Pruning with Contiguous Layer Distillation for multimodal diffusion transformers.

Importing ppcl silences exactly one warning we cannot act on: transformers logs, for each image processor of a
pipeline (``CLIPImageProcessor``, ``SiglipImageProcessor``), "`X` requires torchvision (not installed); falling
back to `XPil`" on every command that loads a pipeline. ppcl never runs those processors (it encodes images with
the VAE) and its CPU install has no torchvision on purpose, so the two lines were noise on every command. The
filter sits on the one logger that emits them (``transformers.utils.import_utils``) and drops only records with
that text; every other transformers message is unchanged. Nothing heavy is imported here.
"""

import logging as _logging

__version__ = "0.1.0"


class _TorchvisionFallbackFilter(_logging.Filter):
    """Drops transformers' "requires torchvision (not installed); falling back to ...Pil" records (see above)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
