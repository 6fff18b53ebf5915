"""ppcl: Pluggable Pruning with Contiguous Layer Distillation for multimodal diffusion transformers."""

__version__ = "0.1.0"
