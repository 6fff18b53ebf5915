"""CLIP score (torchmetrics' ``CLIPScore``) with a CLIP loaded from a path or hub id, and a tiny random CLIP.

CLIP score of an image and its prompt is ``max(100 * cos(E_image, E_text), 0)``, averaged over samples.
The CLIP is always loaded with ``CLIPModel.from_pretrained`` + ``CLIPProcessor.from_pretrained`` from what the
user names; nothing is downloaded unless the user names a hub id on a machine with access. Tests save a tiny
random CLIP (:func:`build_tiny_clip`) and load it through the same :func:`load_clip`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ppcl.errors import PPCLError


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings (B, projection_dim), whether transformers returns a tensor or an output."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _ClipForScore(nn.Module):
    """What torchmetrics' CLIPScore expects of a CLIP: ``get_*_features`` returning tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (projected embeddings in ``pooler_output``) where
    torchmetrics 1.9 expects the tensor itself.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def get_image_features(self, pixel_values):
        return image_embeddings(self.model, pixel_values.to(next(self.model.parameters()).dtype))

    def get_text_features(self, input_ids, attention_mask=None):
        return text_embeddings(self.model, input_ids, attention_mask)


def load_clip(path_or_id: str, device: str | torch.device = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local directory or a hub id. PPCLError if it cannot be loaded."""
    from transformers import CLIPModel, CLIPProcessor

    p = Path(path_or_id).expanduser()
    looks_local = p.is_absolute() or path_or_id.startswith((".", "~")) or p.exists()
    if looks_local and not p.is_dir():
        raise PPCLError(f"CLIP model not found: {path_or_id}")
    if "://" in path_or_id:
        raise PPCLError(f"CLIP model must be a local directory or a hub id, got URI {path_or_id}")
    src = str(p) if looks_local else path_or_id
    try:
        model = CLIPModel.from_pretrained(src).eval().to(device)
        processor = CLIPProcessor.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise PPCLError(f"cannot load CLIP from {path_or_id}: {str(e).splitlines()[0]}") from None
    model.requires_grad_(False)
    return model, processor


class ClipScorer:
    """Streaming CLIP score: :meth:`update` per batch, :meth:`compute` the mean; :meth:`reset` between models."""

    def __init__(self, model, processor):
        from torchmetrics.multimodal.clip_score import CLIPScore

        wrapped = _ClipForScore(model)
        self.device = next(model.parameters()).device
        self.metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor))
        self.metric.to(self.device)

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        """images: float (B, 3, H, W) in [0, 1]; prompts: B strings."""
        # CLIPProcessor rescales by 1/255: feed 8-bit values, the same quantisation as saved images.
        # torchmetrics moves the CLIP to the images' device: keep them on the CLIP's (shared with FD-CLIP).
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).to(self.device)
        self.metric.update(pixels, list(prompts))

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()


def clip_score(images: torch.Tensor, prompts: list[str], clip) -> float:
    """Mean CLIP score of images (B, 3, H, W) in [0, 1] against their prompts; ``clip`` = (model, processor)."""
    scorer = ClipScorer(*clip)
    scorer.update(images, prompts)
    return scorer.compute()


def build_tiny_clip(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny random CLIP (model + tokenizer + image processor) to ``out``; scores it gives mean nothing.

    For tests and the offline demo. The tokenizer is the tiny pipelines' locally built CLIP tokenizer
    (:func:`ppcl.arch.tiny.tiny_clip_tokenizer`), so captions tokenize into words, not bytes.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from ppcl.arch.tiny import tiny_clip_tokenizer

    try:
        from transformers import CLIPImageProcessorPil as _ImageProcessor  # transformers >= 5 without torchvision
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as _ImageProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos, **small),
        vision_config=dict(image_size=image_size, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = _ImageProcessor(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
