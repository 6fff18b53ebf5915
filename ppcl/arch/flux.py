"""FLUX.1 (``FluxTransformer2DModel``): dual-stream ``transformer_blocks`` then single-stream
``single_transformer_blocks``.

Checked in diffusers 0.42: single blocks take and return the two streams separately (they concatenate inside), so
both lists share one call convention. The forward multiplies ``timestep`` (and ``guidance`` for guidance-distilled
models such as FLUX.1-dev) by 1000, so we feed the pipeline's convention, ``sigma`` in [0, 1]. Latents are packed
into 2x2 patches: ``(B, C, h, w) -> (B, h/2 * w/2, 4C)``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

from ppcl.arch.common import (
    Adapter,
    BlockCall,
    FrozenTextAdaLNZero,
    kl_vae_decode,
    kl_vae_encode,
    width_transformer_class,
)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)`` (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for latents of spatial size ``h x w``."""
    b, _, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rotary position ids of the packed image tokens, ``(h/2 * w/2, 3)`` (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(Adapter):
    family = "flux"
    block_lists = (("transformer_blocks", "dual"), ("single_transformer_blocks", "single"))
    transformer_class = FluxTransformer2DModel
    #: the structure of the width ops for the exported, ppcl-free model code (:mod:`ppcl.width_runtime`); must agree
    #: with :meth:`ffn_module_name`, :meth:`text_stream_parts` and :meth:`frozen_text_modulation` below
    width_code = {"block_lists": ["transformer_blocks", "single_transformer_blocks"],
                  "ffn": {"image": "ff", "text": "ff_context"},
                  "text_stream": {"modulation": "norm1_context", "ffn": "ff_context", "out": "attn.to_add_out"},
                  "frozen_modulation": "adaln_zero"}
    # sd-scripts (``_convert_kohya_flux_lora_to_diffusers``) and its "mixture" variant with diffusers' own names
    lora_kohya_blocks = {"lora_unet_double_blocks_": "transformer_blocks",
                         "lora_unet_single_blocks_": "single_transformer_blocks",
                         "lora_transformer_transformer_blocks_": "transformer_blocks",
                         "lora_transformer_single_transformer_blocks_": "single_transformer_blocks"}
    #: FLUX.1-dev's default embedded guidance when the model is guidance-distilled and none is given.
    default_guidance = 3.5

    def head(self, output: dict[str, torch.Tensor], call: BlockCall, model_inputs: dict[str, Any]) -> torch.Tensor:
        t = self.transformer
        return t.proj_out(t.norm_out(output["image"], call.kwargs["temb"]))

    def model_inputs(self, latents, text, sigma, guidance=None):
        b, _, h, w = latents.shape
        embeds = text["prompt_embeds"]
        kwargs: dict[str, Any] = {
            "hidden_states": pack(latents),
            "encoder_hidden_states": embeds,
            "pooled_projections": text["pooled_prompt_embeds"],
            "timestep": sigma.to(latents.dtype),
            "img_ids": image_ids(h, w, latents.device, latents.dtype),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
        }
        if self.transformer.config.guidance_embeds:
            g = self.default_guidance if guidance is None else guidance
            kwargs["guidance"] = torch.full((b,), float(g), device=latents.device, dtype=latents.dtype)
        return kwargs

    def to_output_layout(self, latents):
        return pack(latents)

    def encode_prompts(self, pipe, prompts, max_sequence_length: int | None = None):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=pipe.device, **kw)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def prompt_token_counts(self, pipe, prompts) -> list[int]:
        """Tokens each prompt takes in the T5 encoder (with its end token), before ``max_sequence_length`` cuts
        it: the sequence that setting bounds (CLIP's pooled input is always cut at 77 tokens by design)."""
        return [len(ids) for ids in pipe.tokenizer_2(list(prompts), add_special_tokens=True, verbose=False).input_ids]

    def encode_images(self, pipe, pixels):
        return kl_vae_encode(pipe.vae, pixels)

    def decode_latents(self, pipe, latents, height, width):
        f = pipe.vae_scale_factor
        h, w = 2 * (height // (f * 2)), 2 * (width // (f * 2))
        return kl_vae_decode(pipe.vae, unpack(latents, h, w) if latents.ndim == 3 else latents)

    def latent_channels(self, pipe):
        return pipe.transformer.config.in_channels // 4

    def pipeline_call_kwargs(self, guidance_scale, max_sequence_length=None):
        """A guidance-distilled model (``guidance_embeds``, FLUX.1-dev) takes guidance as an input, not CFG. A model
        trained with caption dropout and no guidance embedding (the reference teacher) gets true classifier-free
        guidance instead: ``true_cfg_scale`` with the empty negative prompt it was trained on (a second pass per
        step), when the scale is above 1."""
        kw: dict[str, Any] = {}
        if guidance_scale is not None:
            if self.transformer.config.guidance_embeds:
                kw["guidance_scale"] = guidance_scale
            elif guidance_scale > 1:
                kw.update(true_cfg_scale=guidance_scale, negative_prompt=self.negative_prompt)
        if max_sequence_length is not None:
            kw["max_sequence_length"] = max_sequence_length
        return kw

    def ffn_module_name(self, block, stream):
        """Dual blocks: ``ff`` (image) / ``ff_context`` (text), each a gated residual branch. Single blocks have no
        separate FFN: their MLP is fused with attention in one ``proj_out`` over the concatenated streams, so
        ``ffn_linear`` on a single block is refused (a plan must not ask for it)."""
        if isinstance(block, FluxSingleTransformerBlock):
            return None
        return {"image": "ff", "text": "ff_context"}.get(stream)

    def text_stream_parts(self, block):
        """Dual blocks: ``norm1_context`` (AdaLayerNormZero), ``ff_context``, ``attn.to_add_out``. Single blocks
        have no text stream of their own (one set of weights over the concatenated streams): no text_freeze."""
        if isinstance(block, FluxSingleTransformerBlock):
            return None
        return {"modulation": "norm1_context", "ffn": "ff_context", "out": "attn.to_add_out"}

    def frozen_text_modulation(self, source, init=True):
        return FrozenTextAdaLNZero.from_source(source.norm1_context, init=init)

    def pruned_config(self, keep):
        cfg = dict(self.transformer.config)
        cfg["num_layers"] = len(keep.get("transformer_blocks", []))
        cfg["num_single_layers"] = len(keep.get("single_transformer_blocks", []))
        return cfg


# diffusers' pipeline loader type-checks a component passed as ``transformer=`` against the ModelMixin of the
# library named in model_index.json (this module, for width-pruned exports), so it must be importable from here.
from diffusers import ModelMixin  # noqa: E402,F401

#: FLUX transformer with width operations (config field ``width_ops``); exported by ``ppcl export``.
PPCLFluxTransformer2DModel = width_transformer_class(FluxAdapter, "PPCLFluxTransformer2DModel", __name__)
