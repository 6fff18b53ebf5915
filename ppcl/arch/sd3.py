"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): one list of joint (dual-stream) blocks.

Two structural facts matter for pruning:
- the last block is built with ``context_pre_only=True``: it updates only the image stream and returns ``None``
  for the text stream; the constructor gives that role to whatever block sits last, so a pruned model's last
  position must hold a block with that structure;
- SD3.5 blocks listed in ``dual_attention_layers`` carry a second image self-attention; the list must be
  recomputed for the kept blocks (the structure of each new position is that of its source block).

Timestep convention: the SD3 pipeline passes ``t`` in [0, 1000], i.e. ``sigma * 1000``. Latents enter unpacked
``(B, C, h, w)``; the transformer patchifies inside and unpatchifies in its head.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from ppcl.arch.common import (
    Adapter,
    BlockCall,
    FrozenTextAdaLNZero,
    kl_vae_decode,
    kl_vae_encode,
    width_transformer_class,
)


class SD3Adapter(Adapter):
    family = "sd3"
    block_lists = (("transformer_blocks", "dual"),)
    transformer_class = SD3Transformer2DModel
    #: the structure of the width ops for the exported, ppcl-free model code (:mod:`ppcl.width_runtime`); must agree
    #: with :meth:`ffn_module_name`, :meth:`text_stream_parts` and :meth:`frozen_text_modulation` below
    width_code = {"block_lists": ["transformer_blocks"],
                  "ffn": {"image": "ff", "text": "ff_context"},
                  "text_stream": {"modulation": "norm1_context", "ffn": "ff_context", "out": "attn.to_add_out"},
                  "frozen_modulation": "adaln_zero"}

    def block_streams(self, block):
        return ("image",) if getattr(block, "context_pre_only", False) else ("image", "text")

    def plug_source(self, start, end, mode="middle"):
        # The block at the last position must be context_pre_only; only the teacher's last block has that
        # structure, so an interval that reaches the end is initialised from it whatever the mode.
        if end == self.num_blocks - 1:
            return end
        return super().plug_source(start, end, mode)

    def head(self, output: dict[str, torch.Tensor], call: BlockCall, model_inputs: dict[str, Any]) -> torch.Tensor:
        t = self.transformer
        x = t.proj_out(t.norm_out(output["image"], call.kwargs["temb"]))
        p = t.config.patch_size
        height, width = model_inputs["hidden_states"].shape[-2:]
        h, w = height // p, width // p
        x = x.reshape(x.shape[0], h, w, p, p, t.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], t.out_channels, h * p, w * p)

    def model_inputs(self, latents, text, sigma, guidance=None):
        return {
            "hidden_states": latents,
            "encoder_hidden_states": text["prompt_embeds"],
            "pooled_projections": text["pooled_prompt_embeds"],
            "timestep": (sigma * 1000).to(latents.dtype),
        }

    def to_output_layout(self, latents):
        return latents

    def encode_prompts(self, pipe, prompts, max_sequence_length: int | None = None):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=pipe.device,
            do_classifier_free_guidance=False, **kw,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def prompt_token_counts(self, pipe, prompts) -> list[int]:
        """Tokens each prompt takes in the T5 encoder (with its end token), before ``max_sequence_length`` cuts
        it; 0 without a T5 encoder (its part of the embedding is then zeros, nothing is cut)."""
        if getattr(pipe, "tokenizer_3", None) is None:
            return [0] * len(prompts)
        return [len(ids) for ids in pipe.tokenizer_3(list(prompts), add_special_tokens=True, verbose=False).input_ids]

    def encode_images(self, pipe, pixels):
        return kl_vae_encode(pipe.vae, pixels)

    def decode_latents(self, pipe, latents, height, width):
        return kl_vae_decode(pipe.vae, latents)

    def latent_channels(self, pipe):
        return pipe.transformer.config.in_channels

    def pipeline_call_kwargs(self, guidance_scale, max_sequence_length=None):
        return super().pipeline_call_kwargs(guidance_scale, max_sequence_length)

    def ffn_module_name(self, block, stream):
        """``ff`` (image) / ``ff_context`` (text) of a joint block; the last (``context_pre_only``) block has no
        text FFN."""
        name = {"image": "ff", "text": "ff_context"}.get(stream)
        return name if name is not None and getattr(block, name, None) is not None else None

    def text_stream_parts(self, block):
        """``norm1_context`` (AdaLayerNormZero), ``ff_context``, ``attn.to_add_out``; the last
        (``context_pre_only``) block has no text update of its own: no text_freeze reaches it."""
        if getattr(block, "context_pre_only", False):
            return None
        return {"modulation": "norm1_context", "ffn": "ff_context", "out": "attn.to_add_out"}

    def frozen_text_modulation(self, source, init=True):
        return FrozenTextAdaLNZero.from_source(source.norm1_context, init=init)

    def pruned_config(self, keep):
        """``keep["transformer_blocks"]``: for each new position, the teacher block whose structure it has."""
        cfg = dict(self.transformer.config)
        kept = keep.get("transformer_blocks", [])
        dual = set(cfg.get("dual_attention_layers") or ())
        cfg["num_layers"] = len(kept)
        cfg["dual_attention_layers"] = tuple(j for j, src in enumerate(kept) if src in dual)
        return cfg


# diffusers' pipeline loader type-checks a component passed as ``transformer=`` against the ModelMixin of the
# library named in model_index.json (this module, for width-pruned exports), so it must be importable from here.
from diffusers import ModelMixin  # noqa: E402,F401

#: SD3 transformer with width operations (config field ``width_ops``); exported by ``ppcl export``.
PPCLSD3Transformer2DModel = width_transformer_class(SD3Adapter, "PPCLSD3Transformer2DModel", __name__)
