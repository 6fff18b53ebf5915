"""Qwen-Image (``QwenImageTransformer2DModel``): one list of dual-stream blocks (60 in the 20B model).

The VAE is video-shaped: latents are ``(B, C, 1, h, w)``; we cache them as ``(B, C, h, w)`` and add the frame axis
back only to decode. Normalisation uses the VAE's per-channel ``latents_mean``/``latents_std``. Text conditions are
the VL encoder's hidden states with a boolean mask (``prompt_embeds_mask``; the pipeline drops an all-ones mask,
we always keep one). The forward takes ``sigma`` (the pipeline passes ``t / 1000``) and multiplies guidance (when
embedded) by 1000. diffusers 0.42's forward takes no ``txt_seq_lens``; the text length comes from the mask.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from torch import nn

from ppcl.arch.common import Adapter, BlockCall, copy_attention_modulation, width_transformer_class
from ppcl.arch.flux import pack, unpack


def _latent_stats(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, dtype)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(device, dtype)
    return mean, std


class FrozenTextQwenMod(nn.Module):
    """Stands for a text-frozen block's ``txt_mod`` (``SiLU -> Linear(D, 6D)``) under text_freeze.

    Returns ``(B, 6D)`` laid out as the block expects, ``[shift1, scale1, gate1, shift2, scale2, gate2]``, with
    ``shift1, scale1 = linear(silu(temb))`` (a copy of rows ``0:2D`` of block ``a``'s ``txt_mod`` linear) and the rest
    zeros: the block's ``txt_norm1`` + modulation then give block ``a``'s modulated text state for joint attention,
    and both text gates are 0, so the text state leaves the block unchanged."""

    def __init__(self, dim: int, emb_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(emb_dim, 2 * dim, bias=bias)

    @classmethod
    def from_source(cls, txt_mod: nn.Module, init: bool = True) -> "FrozenTextQwenMod":
        lin = txt_mod[1]
        dim = lin.out_features // 6
        mod = cls(dim, lin.in_features, bias=lin.bias is not None)
        if init:  # without init: shapes only (parameter counting under ``torch.device("meta")``)
            mod.to(device=lin.weight.device, dtype=lin.weight.dtype)
            copy_attention_modulation(mod.linear, lin, dim)
        return mod

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        shift_scale = self.linear(nn.functional.silu(temb))
        rest = shift_scale.new_zeros(*shift_scale.shape[:-1], 2 * shift_scale.shape[-1])
        return torch.cat([shift_scale, rest], dim=-1)


class QwenImageAdapter(Adapter):
    family = "qwenimage"
    block_lists = (("transformer_blocks", "dual"),)
    transformer_class = QwenImageTransformer2DModel
    #: the released inference's blank negative prompt (the pipeline runs true CFG only when one is given)
    negative_prompt = " "
    #: the structure of the width ops for the exported, ppcl-free model code (:mod:`ppcl.width_runtime`); must agree
    #: with :meth:`ffn_module_name`, :meth:`text_stream_parts` and :meth:`frozen_text_modulation` below
    width_code = {"block_lists": ["transformer_blocks"],
                  "ffn": {"image": "img_mlp", "text": "txt_mlp"},
                  "text_stream": {"modulation": "txt_mod", "ffn": "txt_mlp", "out": "attn.to_add_out"},
                  "frozen_modulation": "silu_linear_6d"}
    # ``_convert_non_diffusers_qwen_lora_to_diffusers``: ``lora_unet_transformer_blocks_<i>_attn_to_q.lora_down...``
    lora_kohya_blocks = {"lora_unet_transformer_blocks_": "transformer_blocks"}
    default_guidance = 1.0

    def head(self, output: dict[str, torch.Tensor], call: BlockCall, model_inputs: dict[str, Any]) -> torch.Tensor:
        t = self.transformer
        temb = call.kwargs["temb"]
        if getattr(t, "zero_cond_t", False):
            temb = temb.chunk(2, dim=0)[0]  # the forward doubles temb for zero_cond_t models
        return t.proj_out(t.norm_out(output["image"], temb))

    def model_inputs(self, latents, text, sigma, guidance=None):
        b, _, h, w = latents.shape
        embeds = text["prompt_embeds"]
        mask = text.get("prompt_embeds_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        kwargs: dict[str, Any] = {
            "hidden_states": pack(latents),
            "encoder_hidden_states": embeds,
            "encoder_hidden_states_mask": mask,
            "timestep": sigma.to(latents.dtype),
            "img_shapes": [[(1, h // 2, w // 2)]] * b,
        }
        if self.transformer.config.guidance_embeds:
            g = self.default_guidance if guidance is None else guidance
            kwargs["guidance"] = torch.full((b,), float(g), device=latents.device, dtype=latents.dtype)
        return kwargs

    def to_output_layout(self, latents):
        return pack(latents)

    def encode_prompts(self, pipe, prompts, max_sequence_length: int | None = None):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, mask = pipe.encode_prompt(prompt=list(prompts), device=pipe.device, **kw)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def prompt_token_counts(self, pipe, prompts) -> list[int]:
        """Tokens each prompt keeps after the pipeline drops its chat template's prefix, before
        ``max_sequence_length`` cuts it (the pipeline tokenises ``prompt_template_encode.format(prompt)``)."""
        texts = [pipe.prompt_template_encode.format(p) for p in prompts]
        drop = pipe.prompt_template_encode_start_idx
        return [max(len(ids) - drop, 0) for ids in pipe.tokenizer(texts, verbose=False).input_ids]

    def encode_images(self, pipe, pixels):
        vae = pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.mode()
        mean, std = _latent_stats(vae, latents.device, latents.dtype)
        return ((latents - mean) / std)[:, :, 0]

    def decode_latents(self, pipe, latents, height, width):
        vae = pipe.vae
        f = pipe.vae_scale_factor
        h, w = 2 * (height // (f * 2)), 2 * (width // (f * 2))
        x = unpack(latents, h, w) if latents.ndim == 3 else latents
        x = x.unsqueeze(2).to(vae.dtype)
        mean, std = _latent_stats(vae, x.device, x.dtype)
        images = vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def latent_channels(self, pipe):
        return pipe.transformer.config.in_channels // 4

    def pipeline_call_kwargs(self, guidance_scale, max_sequence_length=None):
        # Qwen-Image runs true CFG (a second, negative-prompt pass) only when a negative prompt is given; the
        # released inference uses a blank one.
        kw: dict[str, Any] = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        if guidance_scale is None:
            return kw
        if guidance_scale > 1:
            return {**kw, "true_cfg_scale": guidance_scale, "negative_prompt": self.negative_prompt}
        return {**kw, "true_cfg_scale": guidance_scale}

    def ffn_module_name(self, block, stream):
        """``img_mlp`` (image) / ``txt_mlp`` (text), each a gated residual branch after joint attention."""
        return {"image": "img_mlp", "text": "txt_mlp"}.get(stream)

    def text_stream_parts(self, block):
        """``txt_mod`` (SiLU + Linear(D, 6D)), ``txt_mlp``, ``attn.to_add_out``."""
        return {"modulation": "txt_mod", "ffn": "txt_mlp", "out": "attn.to_add_out"}

    def frozen_text_modulation(self, source, init=True):
        return FrozenTextQwenMod.from_source(source.txt_mod, init=init)

    def pruned_config(self, keep):
        cfg = dict(self.transformer.config)
        cfg["num_layers"] = len(keep.get("transformer_blocks", []))
        return cfg


# diffusers' pipeline loader type-checks a component passed as ``transformer=`` against the ModelMixin of the
# library named in model_index.json (this module, for width-pruned exports), so it must be importable from here.
from diffusers import ModelMixin  # noqa: E402,F401

#: Qwen-Image transformer with width operations (config field ``width_ops``); exported by ``ppcl export``.
PPCLQwenImageTransformer2DModel = width_transformer_class(
    QwenImageAdapter, "PPCLQwenImageTransformer2DModel", __name__
)
