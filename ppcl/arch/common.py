"""The adapter protocol: what the rest of ppcl may know about a model family.

Design (method.md section 6): we never rewrite a family's forward. The teacher runs through its stock diffusers
``forward``; we observe and substitute blocks with forward hooks. A block's call is normalised to keyword
arguments (:class:`BlockCall`) by binding the positional arguments to the block's ``forward`` signature, so the
same code works whether diffusers called it with keywords (normal) or positionally (gradient checkpointing).

Streams. Every MMDiT block in diffusers 0.42 takes ``hidden_states`` (image tokens, ``(B, N_img, D)``) and
``encoder_hidden_states`` (text tokens, ``(B, N_txt, D)``) and returns ``(encoder_hidden_states, hidden_states)``;
SD3's last block returns ``None`` for the text stream. We name the streams ``"image"`` and ``"text"``.

Model inputs. Cached latents are stored as ``(B, C, h, w)`` (normalised as the pipeline feeds them, before any
packing) and text conditions as a family-specific dict of tensors. :meth:`Adapter.model_inputs` turns a noisy
latent, the text dict and ``sigma`` in [0, 1] into the keyword arguments of the transformer's ``forward``, with the
family's own timestep convention (FLUX and Qwen-Image take ``sigma`` and multiply by 1000 inside; SD3 takes
``sigma * 1000``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ppcl.errors import PPCLError
# the width-modified block classes are the custom-code runtime's own (it imports nothing of ppcl): one definition,
# so a width model built here and an export loaded without ppcl run the same forward
from ppcl.width_runtime import WidthBlockMixin, width_block_class  # noqa: F401

STREAMS: tuple[str, ...] = ("image", "text")


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block of the teacher, in execution order.

    Attributes:
        index: position in the single execution sequence over all block lists (0-based).
        list_name: attribute of the transformer holding the block's ``nn.ModuleList``.
        local_index: position inside that list.
        kind: ``"dual"`` (two streams with their own weights: FLUX dual, SD3 joint, Qwen-Image), or ``"single"``
            (FLUX single-stream). Intervals never cross kinds.
        params: exact parameter count of the block module.
        streams: streams the block returns (SD3's last block returns only ``("image",)``).
    """

    index: int
    list_name: str
    local_index: int
    kind: str
    params: int
    streams: tuple[str, ...]


@dataclass
class BlockCall:
    """The keyword arguments one block was called with (positional ones bound to their names)."""

    kwargs: dict[str, Any] = field(default_factory=dict)

    def with_streams(self, states: dict[str, torch.Tensor]) -> "BlockCall":
        """A copy whose stream tensors are replaced by ``states`` (missing streams are kept)."""
        kw = dict(self.kwargs)
        if "image" in states:
            kw["hidden_states"] = states["image"]
        if "text" in states:
            kw["encoder_hidden_states"] = states["text"]
        return BlockCall(kw)

    def streams(self) -> dict[str, torch.Tensor]:
        """The stream tensors entering the block: ``{"image": (B, N, D), "text": (B, T, D)}``."""
        out = {"image": self.kwargs["hidden_states"]}
        if self.kwargs.get("encoder_hidden_states") is not None:
            out["text"] = self.kwargs["encoder_hidden_states"]
        return out


def bind_call(block: nn.Module, args: tuple, kwargs: dict) -> BlockCall:
    """Normalise a block call to keywords, whatever mix of positional/keyword diffusers used."""
    sig = inspect.signature(block.forward)
    bound = sig.bind_partial(*args, **kwargs)
    return BlockCall(dict(bound.arguments))


def split_output(output: Any) -> dict[str, torch.Tensor]:
    """A block's return value as streams. diffusers blocks return ``(encoder_hidden_states, hidden_states)``."""
    text, image = output
    out = {"image": image}
    if text is not None:
        out["text"] = text
    return out


def join_output(states: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Inverse of :func:`split_output`."""
    return states.get("text"), states["image"]


def count_parameters(module: nn.Module) -> int:
    """Exact number of parameters of ``module`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


class StopForward(Exception):
    """Raised inside a hook to end a forward early once what we need is captured."""


class Adapter(ABC):
    """Everything ppcl knows about one model family. Subclasses live in ``ppcl/arch/<family>.py``.

    An adapter wraps one loaded transformer. Algorithms (probe, distill, export, evaluate) are written once
    against this interface.
    """

    family: ClassVar[str]
    #: ``nn.ModuleList`` attributes of the transformer, in execution order, with the kind of their blocks.
    block_lists: ClassVar[tuple[tuple[str, str], ...]]
    #: the stock diffusers transformer class this adapter handles (subclasses are ours: width-pruned models).
    transformer_class: ClassVar[type]
    #: kohya-style LoRA key prefixes that diffusers' LoRA loader of this family accepts, each naming a block list:
    #: ``<prefix><i>_<module>...`` is a LoRA on block ``i`` of that list (``ppcl lora remap`` renames ``i``).
    lora_kohya_blocks: ClassVar[dict[str, str]] = {}
    #: the negative prompt this family's classifier-free guidance pairs with a prompt (the unconditional branch);
    #: ``ppcl encode`` stores its embeddings in the cache so distillation can train that branch (``uncond_ratio``)
    negative_prompt: ClassVar[str] = ""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer

    # ---------------------------------------------------------------- blocks
    def blocks(self) -> list[BlockInfo]:
        """All blocks in execution order, with kind and exact parameter count."""
        out: list[BlockInfo] = []
        for list_name, kind in self.block_lists:
            for j, block in enumerate(getattr(self.transformer, list_name)):
                out.append(
                    BlockInfo(
                        index=len(out),
                        list_name=list_name,
                        local_index=j,
                        kind=kind,
                        params=count_parameters(block),
                        streams=self.block_streams(block),
                    )
                )
        return out

    def block_streams(self, block: nn.Module) -> tuple[str, ...]:
        """Streams a block returns; families override where a block drops one."""
        return STREAMS

    def block(self, index: int) -> nn.Module:
        """The block module at execution index ``index``."""
        for list_name, _ in self.block_lists:
            blocks = getattr(self.transformer, list_name)
            if index < len(blocks):
                return blocks[index]
            index -= len(blocks)
        raise PPCLError(f"block index out of range: the model has {self.num_blocks} blocks")

    @property
    def num_blocks(self) -> int:
        return sum(len(getattr(self.transformer, name)) for name, _ in self.block_lists)

    def locate(self, index: int) -> tuple[str, int]:
        """``(list_name, local_index)`` of execution index ``index``."""
        for list_name, _ in self.block_lists:
            n = len(getattr(self.transformer, list_name))
            if index < n:
                return list_name, index
            index -= n
        raise PPCLError(f"block index out of range: the model has {self.num_blocks} blocks")

    def total_parameters(self) -> int:
        return count_parameters(self.transformer)

    # ------------------------------------------------------ running the teacher
    @contextmanager
    def hooks(
        self,
        on_input: Callable[[int, BlockCall], BlockCall | None] | None = None,
        on_output: Callable[[int, BlockCall, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None,
        indices: set[int] | None = None,
    ) -> Iterator[None]:
        """Observe or substitute blocks during the stock forward.

        ``on_input(i, call)`` sees the call of block ``i`` and may return a replacement call.
        ``on_output(i, call, streams)`` sees its returned streams and may return replacements.
        """
        handles = []
        pending: dict[int, BlockCall] = {}
        for info in self.blocks():
            if indices is not None and info.index not in indices:
                continue
            block = self.block(info.index)
            i = info.index

            def pre(module, args, kwargs, i=i):
                call = bind_call(module, args, kwargs)
                if on_input is not None:
                    new = on_input(i, call)
                    if new is not None:
                        call = new
                pending[i] = call
                return (), call.kwargs

            def post(module, args, kwargs, output, i=i):
                call = pending.pop(i, None) or bind_call(module, args, kwargs)
                if on_output is None:
                    return None
                new = on_output(i, call, split_output(output))
                return None if new is None else join_output(new)

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward(self, model_inputs: dict[str, Any]) -> torch.Tensor:
        """The stock transformer forward; returns the model output (velocity prediction) tensor."""
        return self.transformer(**model_inputs, return_dict=False)[0]

    def prelude(self, model_inputs: dict[str, Any]) -> BlockCall:
        """Run only the embedding prelude: the exact call block 0 receives (no block is run)."""
        captured: dict[str, BlockCall] = {}

        def grab(i, call):
            captured["call"] = call
            raise StopForward

        with self.hooks(on_input=grab, indices={0}):
            with contextlib.suppress(StopForward):  # raised by ``grab`` once block 0's call is captured
                self.forward(model_inputs)
        return captured["call"]

    def run_block(self, index: int, call: BlockCall) -> dict[str, torch.Tensor]:
        """Run block ``index`` alone on ``call``; returns its output streams."""
        block = self.block(index)
        return split_output(block(**call.kwargs))

    def next_call(self, index: int, call: BlockCall, output: dict[str, torch.Tensor]) -> BlockCall:
        """The call of block ``index + 1`` given block ``index``'s call and output (the shared arguments such as
        ``temb`` and rotary embeddings are the same for every block of one forward)."""
        return call.with_streams(output)

    @abstractmethod
    def head(self, output: dict[str, torch.Tensor], call: BlockCall, model_inputs: dict[str, Any]) -> torch.Tensor:
        """The output head after the last block: final norm, projection (and unpatchify where the family does),
        given the last block's output streams and its call (which carries ``temb``)."""

    # --------------------------------------------------------- data conventions
    @abstractmethod
    def model_inputs(
        self, latents: torch.Tensor, text: dict[str, torch.Tensor], sigma: torch.Tensor, guidance: float | None = None
    ) -> dict[str, Any]:
        """Transformer ``forward`` kwargs for noisy latents ``(B, C, h, w)``, a text dict and ``sigma`` ``(B,)``."""

    @abstractmethod
    def to_output_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` latents (e.g. the velocity target ``noise - x0``) in the layout of the model output."""

    @abstractmethod
    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own text encoders on ``prompts``: a dict of batch-first tensors (family-specific keys)."""

    @abstractmethod
    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The pipeline's VAE on ``pixels`` ``(B, 3, H, W)`` in [-1, 1]: normalised latents ``(B, C, h, w)``."""

    @abstractmethod
    def decode_latents(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """What the pipeline returns with ``output_type="latent"`` -> images ``(B, 3, H, W)`` in [0, 1]."""

    def pipeline_call_kwargs(self, guidance_scale: float | None, max_sequence_length: int | None = None
                             ) -> dict[str, Any]:
        """Family-specific keyword arguments for the stock pipeline ``__call__``: guidance, and the text length
        (``max_sequence_length``, a ``__call__`` argument of every family here; None: the pipeline's default)."""
        kw: dict[str, Any] = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        return kw if max_sequence_length is None else {**kw, "max_sequence_length": max_sequence_length}

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the normalised latents for an image of ``height x width`` pixels."""
        f = pipe.vae_scale_factor
        return (self.latent_channels(pipe), height // f, width // f)

    @abstractmethod
    def latent_channels(self, pipe: Any) -> int:
        """Channels of the normalised ``(B, C, h, w)`` latents."""

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens the transformer sees for ``(B, C, h, w)`` latents (2x2 patches for every family here)."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def plug_source(self, start: int, end: int, mode: str = "middle") -> int:
        """The teacher block a plug for interval ``[start, end]`` is copied from (its structure and initial weights).

        ``middle`` is ``floor((start + end) / 2)`` (the released code's choice); ``first``/``last`` are options.
        Families override where only one block of the interval has the right structure (SD3's last block).
        """
        if mode == "middle":
            return (start + end) // 2
        if mode == "first":
            return start
        if mode == "last":
            return end
        raise PPCLError(f"unknown plug init '{mode}': expected middle, first or last")

    # ----------------------------------------------------------------- export
    @abstractmethod
    def pruned_config(self, keep: dict[str, list[int]]) -> dict[str, Any]:
        """The transformer config with only the blocks ``keep[list_name]`` (local indices, in order) kept."""

    # ------------------------------------------------------- width operations
    # method.md section 3; the design is in the "width operations" section at the bottom of this module.
    def ffn_module_name(self, block: nn.Module, stream: str) -> str | None:
        """Name of the sub-module that is ``stream``'s FFN in ``block`` (None: no separate FFN). Families override."""
        return None

    def text_stream_parts(self, block: nn.Module) -> dict[str, str] | None:
        """The sub-modules of ``block``'s own text-stream update, by role (dotted paths inside the block):

        - ``modulation``: the text adaLN that yields the modulated text state (input of joint attention) and the
          text gates;
        - ``ffn``: the gated text FFN branch;
        - ``out``: the text output projection of joint attention.

        None: the block has no text stream of its own (FLUX single blocks, SD3's ``context_pre_only`` last block).
        Families override."""
        return None

    def frozen_text_modulation(self, source: nn.Module, init: bool = True) -> nn.Module:
        """The light module that stands for a text-frozen block's text modulation, built after the modulation of
        block ``source`` (block ``a`` of the op) and, with ``init``, holding a copy of its attention shift/scale
        weights. Families override (FLUX and SD3: :class:`FrozenTextAdaLNZero`)."""
        raise PPCLError(f"{self.family}: text_freeze is not supported for block {type(source).__name__}")

    def text_freeze_interval(self, op: Any) -> tuple[int, int]:
        """``(a, b)`` of a ``text_freeze`` op, validated against this model (one-line PPCLError otherwise)."""
        iv = _op_field(op, "interval")
        if (not isinstance(iv, (list, tuple)) or len(iv) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in iv)):
            raise PPCLError(f"width op text_freeze: interval {iv!r} is not a [start, end] pair of integers")
        a, b = int(iv[0]), int(iv[1])
        where = f"width op text_freeze [{a}, {b}]"
        if a < 0 or b >= self.num_blocks:
            raise PPCLError(f"{where}: out of range (the model has blocks 0..{self.num_blocks - 1})")
        if not a < b:
            raise PPCLError(f"{where}: needs start < end (blocks start+1..end are frozen)")
        for k in range(a, b + 1):
            if self.text_stream_parts(self.block(k)) is None:
                raise PPCLError(f"{where}: block {k} ({type(self.block(k)).__name__}) has no own text stream")
        return a, b

    def width_op_params(self, op: Any) -> tuple[int, int]:
        """``(removed, added)`` parameters of one width op on the teacher (exact, from the modules)."""
        kind = _op_field(op, "op")
        if kind == "ffn_linear":
            index = int(_op_field(op, "block"))
            stream = _op_field(op, "stream", "image")
            block = self.block(index)
            name = _adapter_ffn_check(self, block, stream, f"width op ffn_linear on block {index}")
            ffn = getattr(block, name)
            dim = _first_linear(ffn).in_features
            return count_parameters(ffn), dim * dim + dim
        if kind == "text_freeze":
            a, b = self.text_freeze_interval(op)
            source = self.block(a)
            removed = added = 0
            for k in range(a + 1, b + 1):
                block = self.block(k)
                for path in self.text_stream_parts(block).values():
                    removed += count_parameters(block.get_submodule(path))
                with torch.device("meta"):  # shapes only: no memory, no copy
                    added += count_parameters(self.frozen_text_modulation(source, init=False))
            dim = _text_dim(self, self.block(b))
            return removed, added + dim * dim + dim
        raise PPCLError(f"width op '{kind}' is not supported: expected one of {', '.join(WIDTH_OPS)}")

    def apply_width_op(self, block: nn.Module, op: Any) -> nn.Module:
        """Turn ``block`` IN PLACE into its width-modified form for a one-block op (``ffn_linear``; works on the
        meta device too). ``text_freeze`` spans blocks: :meth:`apply_text_freeze`."""
        kind = _op_field(op, "op")
        if kind == "text_freeze":
            raise PPCLError("width op text_freeze spans several blocks: apply it with apply_text_freeze")
        if kind != "ffn_linear":
            raise PPCLError(f"width op '{kind}' is not supported: expected one of {', '.join(WIDTH_OPS)}")
        stream = _op_field(op, "stream", "image")
        name = _adapter_ffn_check(self, block, stream, f"width op ffn_linear on block {_op_field(op, 'block')}")
        ffn = getattr(block, name)
        if isinstance(ffn, ZeroBranch):
            raise PPCLError(f"width op ffn_linear on block {_op_field(op, 'block')} {stream}: the {stream} FFN is "
                            "already removed (applied twice, or the block's text stream is frozen)")
        lin = _first_linear(ffn)
        dim = lin.in_features
        device, dtype = lin.weight.device, lin.weight.dtype
        block.__class__ = width_block_class(type(block))
        setattr(block, name, ZeroBranch())
        if "ppcl_proj" not in block._modules:
            block.ppcl_proj = nn.ModuleDict()
        block.ppcl_proj[stream] = ResidualLinear(dim).to(device=device, dtype=dtype)
        return block

    def apply_text_freeze(self, source: nn.Module, members: list[nn.Module], op: Any) -> list[nn.Module]:
        """Turn ``members`` (blocks ``a+1..b``, in order) IN PLACE into text-frozen blocks of ``op``; ``source`` is
        block ``a`` (read only: its text modulation weights are copied). Works on the meta device too.

        Each member's text modulation becomes :meth:`frozen_text_modulation` (a copy of block ``a``'s attention
        shift/scale, gates 0), its text FFN and text attention output projection become :class:`ZeroBranch`, so
        the stock forward returns the text state it was given, exactly; the last member also gets the residual
        projection ``ppcl_proj["text"]`` applied to its text output."""
        where = f"width op text_freeze {list(_op_field(op, 'interval') or [])}"
        if not members:
            raise PPCLError(f"{where}: no block to freeze (needs start < end)")
        for j, block in enumerate(members):
            parts = self.text_stream_parts(block)
            if parts is None:
                raise PPCLError(f"{where}: block {type(block).__name__} has no own text stream")
            if any(isinstance(block.get_submodule(p), ZeroBranch) for p in parts.values()):
                raise PPCLError(f"{where}: a block's text stream is already frozen or its text FFN removed")
            mod = self.frozen_text_modulation(source, init=True)
            block.__class__ = width_block_class(type(block))
            _set_submodule(block, parts["modulation"], mod)
            _set_submodule(block, parts["ffn"], ZeroBranch())
            _set_submodule(block, parts["out"], ZeroBranch())
            if j == len(members) - 1:
                w = _first_linear(mod)
                if "ppcl_proj" not in block._modules:
                    block.ppcl_proj = nn.ModuleDict()
                dim = _text_dim(self, source)
                block.ppcl_proj["text"] = ResidualLinear(dim).to(device=w.weight.device, dtype=w.weight.dtype)
        return members

    def apply_width_ops(self, ops: list[dict[str, Any]]) -> None:
        """Apply width ops (block indices of THIS model) to the transformer's own blocks, in place."""
        for op in ops:
            if _op_field(op, "op") == "text_freeze":
                a, b = self.text_freeze_interval(op)
                self.apply_text_freeze(self.block(a), [self.block(k) for k in range(a + 1, b + 1)], op)
            else:
                self.apply_width_op(self.block(int(_op_field(op, "block"))), op)


def kl_vae_encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKL`` (FLUX, SD3): pixels ``(B, 3, H, W)`` in [-1, 1] -> shifted, scaled latents (the
    distribution's mode, so the cache is deterministic)."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def kl_vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`kl_vae_encode` through the decoder: images ``(B, 3, H, W)`` in [0, 1]."""
    x = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(x.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def shift_sigmas(sigma: torch.Tensor, scheduler_config: dict[str, Any], image_seq_len: int) -> torch.Tensor:
    """Apply the teacher scheduler's flow shift to uniform/logit-normal ``sigma`` in [0, 1].

    With ``use_dynamic_shifting`` (FLUX, Qwen-Image) the shift depends on the image token count exactly as the
    pipelines compute ``mu``; otherwise (SD3) the static ``shift`` is used.
    """
    cfg = dict(scheduler_config)
    if cfg.get("use_dynamic_shifting"):
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        mu = image_seq_len * m + (base_shift - m * base_len)
        if cfg.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / sigma - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
    shift = float(cfg.get("shift", 1.0))
    return shift * sigma / (1 + (shift - 1) * sigma)




# ------------------------------------------------------------------------------------------ width operations
# Width pruning (method.md section 3) is a module swap, not a forward rewrite: the modified block is the stock block's
# class with a thin subclass (``PPCL<Block>``) whose forward keeps the stock signature (so calls bind the same way) and
# applies residual projections ``y = x + W x + b`` (``ppcl_proj[stream]``) to the block's outputs.
#
# ffn_linear (block, stream). In every family here the FFN is a gated residual branch,
# ``out = x + gate * ffn(modulate(norm(x)))`` with ``x`` the post-attention state; replacing ``ffn`` by a branch that
# returns zeros makes the stock block return exactly ``x`` for that stream, and the projection applied to that output
# is then precisely "a residual linear map from the post-attention state to the block output". Adapters say which
# sub-module is the FFN of each stream (:meth:`Adapter.ffn_module_name`).
#
# text_freeze [a, b] (dual-stream blocks; a < b). Our precise design:
# - block a runs unchanged. Let tau be the text state leaving block a (entering a+1).
# - blocks a+1..b keep their image stream whole (image modulation, attention projections, FFN, gates). Their own text
#   update is dropped: text modulation (6 chunks of adaLN), text attention output projection (``to_add_out``), text
#   FFN, text gates. What remains of the text side is the input of joint attention: the text tokens join attention
#   through each block's own ``add_q/add_k/add_v`` projections of m = LN(tau) * (1 + scale_a) + shift_a, block a's
#   attention modulation (its shift/scale chunks only, as functions of temb) applied to the frozen state.
# - the text state passes through a+1..b-1 unchanged (exactly: the gates are 0 and the dropped branches return zeros)
#   and block b returns text tau + W tau + c (``ppcl_proj["text"]``), W, c least-squares initialised on
#   (teacher text leaving b) - tau, then distilled with loss D.
# - carrying m from block a to the later blocks: each frozen block RECOMPUTES m from the text state it receives
#   (which is tau, unchanged) with its own light copy of block a's shift/scale rows
#   (:class:`FrozenTextAdaLNZero` / the family's equivalent), instead of a holder object that block a fills during the
#   forward. Recomputing keeps every block self-contained: a block is a pure function of its stock call (non-sequential
#   distillation feeds each frozen block a captured teacher call; gradient checkpointing recomputes a block alone;
#   concurrent forwards share no state), export is a plain module-list edit, and ``from_pretrained`` rebuilds the
#   structure from the config. Cost: 2 D x D_temb (+2 D) parameters per frozen block (the removed adaLN had 6x that),
#   counted exactly by :meth:`Adapter.width_op_params`. At init m is exactly block a's modulation of tau; the copies are
#   trained per block afterwards (they may drift apart: a per-block light modulation initialised from block a).

WIDTH_OPS: tuple[str, ...] = ("ffn_linear", "text_freeze")


def copy_attention_modulation(dst: nn.Linear, src: nn.Linear, dim: int) -> None:
    """Copy the attention shift/scale rows (the first ``2 * dim`` outputs) of an adaLN-Zero modulation linear
    ``src`` (6 x dim outputs) into ``dst`` (2 x dim outputs)."""
    with torch.no_grad():
        dst.weight.copy_(src.weight[: 2 * dim])
        if src.bias is not None:
            dst.bias.copy_(src.bias[: 2 * dim])


class ResidualLinear(nn.Module):
    """``y = x + W x + b`` over the last axis; ``W`` starts at zero (identity map) until fitted
    (:class:`ppcl.plugs.NormalEquations` gives the least-squares ``W``, ``b``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=True)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)

    @torch.no_grad()
    def set_solution(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.proj.weight.copy_(weight.to(self.proj.weight.dtype))
        self.proj.bias.copy_(bias.to(self.proj.bias.dtype))


class ZeroBranch(nn.Module):
    """Stands for a removed residual branch (an FFN, an output projection): returns zeros shaped like its input,
    so ``x + gate * branch(...)`` is exactly ``x``. Holds no parameters."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(x)


class FrozenTextAdaLNZero(nn.Module):
    """Stands for a text-frozen block's ``AdaLayerNormZero`` text modulation (FLUX dual, SD3 joint blocks).

    Same call as ``AdaLayerNormZero`` (``(x, emb=temb)``); returns ``(m, gate_msa, shift_mlp, scale_mlp, gate_mlp)``
    with ``m = norm(x) * (1 + scale) + shift`` (``(B, T, D)``), ``shift, scale = linear(silu(emb))`` (``(B, D)`` each),
    and the four others zeros ``(B, D)``: the stock block then adds nothing to the text state.
    ``linear`` is ``Linear(D_temb, 2 D)``, a copy of rows ``0:2D`` (shift_msa, scale_msa) of the source's linear.
    """

    def __init__(self, dim: int, emb_dim: int, norm: nn.Module, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(emb_dim, 2 * dim, bias=bias)
        self.norm = norm  # parameter-free LayerNorm (copied from the source)

    @classmethod
    def from_source(cls, source: nn.Module, init: bool = True) -> "FrozenTextAdaLNZero":
        """Built after ``source`` (an ``AdaLayerNormZero`` without class embeddings)."""
        import copy

        if getattr(source, "emb", None) is not None or not hasattr(source, "linear"):
            raise PPCLError(f"text_freeze: unsupported text modulation {type(source).__name__}")
        lin = source.linear
        dim = lin.out_features // 6
        mod = cls(dim, lin.in_features, copy.deepcopy(source.norm), bias=lin.bias is not None)
        if init:  # without init: shapes only (parameter counting under ``torch.device("meta")``)
            mod.to(device=lin.weight.device, dtype=lin.weight.dtype)
            copy_attention_modulation(mod.linear, lin, dim)
        return mod

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        shift, scale = self.linear(nn.functional.silu(emb)).chunk(2, dim=1)
        m = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        zero = torch.zeros_like(shift)
        return m, zero, zero, zero, zero


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _text_dim(adapter: "Adapter", block: nn.Module) -> int:
    """Width of a block's text state: the output width of its text attention projection (``to_add_out``)."""
    out = block.get_submodule(adapter.text_stream_parts(block)["out"])
    if not isinstance(out, nn.Linear):
        raise PPCLError(f"text_freeze: block {type(block).__name__} has no text output projection (already frozen?)")
    return out.out_features


def _op_field(op: Any, name: str, default: Any = None) -> Any:
    if isinstance(op, dict):
        return op.get(name, default)
    return getattr(op, name, default)


def op_dict(op: Any) -> dict[str, Any]:
    """A width op (pydantic model or dict) as a plain JSON-able dict."""
    if hasattr(op, "model_dump"):
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in op.model_dump(mode="json").items() if v is not None}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(op).items() if v is not None}


def _first_linear(module: nn.Module) -> nn.Linear:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m
    raise PPCLError(f"no linear layer in {type(module).__name__}")


def _adapter_ffn_check(adapter: "Adapter", block: nn.Module, stream: str, where: str) -> str:
    if stream not in STREAMS:
        raise PPCLError(f"{where}: unknown stream '{stream}' (expected image or text)")
    name = adapter.ffn_module_name(block, stream)
    if name is None:
        raise PPCLError(f"{where}: block {type(block).__name__} has no separate {stream} FFN to replace")
    return name


def width_transformer_class(adapter: type[Adapter], name: str, module: str) -> type:
    """A config-registered subclass of the family's stock transformer (``adapter.transformer_class``) with an
    extra config field ``width_ops``.

    ``width_ops`` is a list of op dicts whose ``block`` / ``interval`` are execution indices IN THIS (pruned) model;
    the constructor builds the stock model, then converts those blocks (``adapter(self).apply_width_ops``), so
    ``from_pretrained`` round-trips and ``get_adapter`` still detects the family (it is a subclass).
    """
    base = adapter.transformer_class
    base_sig = inspect.signature(base.__init__)
    params = [p for p in base_sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    params.append(inspect.Parameter("width_ops", inspect.Parameter.KEYWORD_ONLY, default=None))

    def __init__(self, *args, width_ops=None, **kwargs):
        base.__init__(self, *args, **kwargs)
        ops = [op_dict(op) for op in (width_ops or [])]
        self.register_to_config(width_ops=ops)
        adapter(self).apply_width_ops(ops)

    __init__.__signature__ = base_sig.replace(parameters=params)
    from ppcl.width_runtime import removed_weight_patterns

    # an export also stores empty stand-ins of the stock weights width ops removed (ppcl.custom_code): not ours
    ignore = removed_weight_patterns(adapter.width_code)
    cls = type(name, (base,), {"__init__": __init__, "__module__": module, "__qualname__": name,
                               "_keys_to_ignore_on_load_unexpected": ignore})
    return cls
