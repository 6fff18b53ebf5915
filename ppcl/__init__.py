"""ppcl: Pluggable Pruning with Contiguous Layer Distillation for multimodal diffusion transformers.

Importing ppcl silences exactly one warning we cannot act on: transformers logs, for each image processor of a
pipeline (``CLIPImageProcessor``, ``SiglipImageProcessor``), "`X` requires torchvision (not installed); falling
back to `XPil`" on every command that loads a pipeline. ppcl never runs those processors (it encodes images with
the VAE) and its CPU install has no torchvision on purpose, so the two lines were noise on every command. The
filter sits on the one logger that emits them (``transformers.utils.import_utils``) and drops only records with
that text; every other transformers message is unchanged. Nothing heavy is imported here.

Importing ppcl also turns MLflow's usage telemetry off unless the user set ``MLFLOW_DISABLE_TELEMETRY`` themselves:
ppcl sends nothing anywhere but the tracking server and S3 it is given, and MLflow 3's telemetry thread also sets
and unsets an environment variable while other threads read the environment (a demo stage once failed on it).
"""

import logging as _logging
import os as _os

_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"


class _TorchvisionFallbackFilter(_logging.Filter):
    """Drops transformers' "requires torchvision (not installed); falling back to ...Pil" records (see above)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
