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


class _StopForward(Exception):
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
            raise _StopForward

        with self.hooks(on_input=grab, indices={0}):
            try:
                self.forward(model_inputs)
            except _StopForward:
                pass
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

    def pipeline_call_kwargs(self, guidance_scale: float | None) -> dict[str, Any]:
        """Family-specific keyword arguments for the stock pipeline ``__call__``."""
        return {} if guidance_scale is None else {"guidance_scale": guidance_scale}

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
# Added for width pruning (method.md section 3). Design: FFN -> residual linear is a module swap, not a forward
# rewrite. In every family here the FFN is a gated residual branch, ``out = x + gate * ffn(modulate(norm(x)))`` with
# ``x`` the post-attention state; replacing ``ffn`` by a branch that returns zeros makes the stock block return
# exactly ``x`` for that stream, and a residual linear map ``y = x + W x + b`` applied to the block's output for
# that stream is then precisely "a residual linear map from the post-attention state to the block output". The
# modified block is the stock block's class with a thin subclass (``PPCL<Block>``) whose forward keeps the stock
# signature (so calls bind the same way) and applies the projections to the outputs. Adapters only say which
# sub-module is the FFN of each stream (:meth:`Adapter.ffn_module_name`).

WIDTH_OPS: tuple[str, ...] = ("ffn_linear",)


class WidthBlockMixin:
    """Mixin of the width-modified block classes: residual projections applied to the block outputs per stream."""

    def project_outputs(self, output):
        text, image = output
        proj = self._modules.get("ppcl_proj")
        if proj is not None:
            if "image" in proj:
                image = proj["image"](image)
            if "text" in proj and text is not None:
                text = proj["text"](text)
        return text, image


_WIDTH_CLASSES: dict[type, type] = {}


def width_block_class(base: type) -> type:
    """``PPCL<base>``: ``base`` whose forward (same signature) applies :class:`WidthBlockMixin` projections."""
    if issubclass(base, WidthBlockMixin):
        return base
    if base not in _WIDTH_CLASSES:

        def forward(self, *args, **kwargs):
            return self.project_outputs(base.forward(self, *args, **kwargs))

        # Keep the stock signature: BlockCall binding and gradient checkpointing call it like the stock block.
        forward.__signature__ = inspect.signature(base.forward)
        cls = type(f"PPCL{base.__name__}", (WidthBlockMixin, base), {"forward": forward})
        cls.__module__ = __name__
        _WIDTH_CLASSES[base] = cls
    return _WIDTH_CLASSES[base]


def _op_field(op: Any, name: str, default: Any = None) -> Any:
    if isinstance(op, dict):
        return op.get(name, default)
    return getattr(op, name, default)


def op_dict(op: Any) -> dict[str, Any]:
    """A width op (pydantic model or dict) as a plain JSON-able dict."""
    if hasattr(op, "model_dump"):
        return {k: v for k, v in op.model_dump(mode="json").items() if v is not None}
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


def _width_op_params(self: "Adapter", op: Any) -> tuple[int, int]:
    """``(removed, added)`` parameters of one width op on the teacher (exact, from the modules)."""
    kind = _op_field(op, "op")
    if kind != "ffn_linear":
        raise PPCLError(f"width op '{kind}' is not supported: expected one of {', '.join(WIDTH_OPS)}")
    index = int(_op_field(op, "block"))
    stream = _op_field(op, "stream", "image")
    block = self.block(index)
    name = _adapter_ffn_check(self, block, stream, f"width op ffn_linear on block {index}")
    ffn = getattr(block, name)
    dim = _first_linear(ffn).in_features
    return count_parameters(ffn), dim * dim + dim


def _apply_width_op(self: "Adapter", block: nn.Module, op: Any) -> nn.Module:
    """Turn ``block`` IN PLACE into its width-modified form for ``op`` (works on the meta device too)."""
    kind = _op_field(op, "op")
    if kind != "ffn_linear":
        raise PPCLError(f"width op '{kind}' is not supported: expected one of {', '.join(WIDTH_OPS)}")
    stream = _op_field(op, "stream", "image")
    name = _adapter_ffn_check(self, block, stream, f"width op ffn_linear on block {_op_field(op, 'block')}")
    from ppcl.plugs import ResidualLinear, ZeroBranch

    ffn = getattr(block, name)
    if isinstance(ffn, ZeroBranch):
        raise PPCLError(f"width op ffn_linear on block {_op_field(op, 'block')} {stream}: applied twice")
    lin = _first_linear(ffn)
    dim = lin.in_features
    device, dtype = lin.weight.device, lin.weight.dtype
    block.__class__ = width_block_class(type(block))
    setattr(block, name, ZeroBranch())
    if "ppcl_proj" not in block._modules:
        block.ppcl_proj = nn.ModuleDict()
    block.ppcl_proj[stream] = ResidualLinear(dim).to(device=device, dtype=dtype)
    return block


def _ffn_module_name(self: "Adapter", block: nn.Module, stream: str) -> str | None:
    """Name of the sub-module that is ``stream``'s FFN in ``block`` (None: no separate FFN). Families override."""
    return None


Adapter.width_op_params = _width_op_params
Adapter.apply_width_op = _apply_width_op
Adapter.ffn_module_name = _ffn_module_name


def width_transformer_class(base: type, name: str, module: str) -> type:
    """A config-registered subclass of the stock transformer ``base`` with an extra config field ``width_ops``.

    ``width_ops`` is a list of op dicts whose ``block`` is an execution index IN THIS (pruned) model; the
    constructor builds the stock model, then converts those blocks, so ``from_pretrained`` round-trips and
    ``get_adapter`` still detects the family (it is a subclass).
    """
    base_sig = inspect.signature(base.__init__)
    params = [p for p in base_sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    params.append(inspect.Parameter("width_ops", inspect.Parameter.KEYWORD_ONLY, default=None))

    def __init__(self, *args, width_ops=None, **kwargs):
        base.__init__(self, *args, **kwargs)
        ops = [op_dict(op) for op in (width_ops or [])]
        self.register_to_config(width_ops=ops)
        from ppcl.arch import get_adapter

        adapter = get_adapter(self)
        for op in ops:
            adapter.apply_width_op(adapter.block(int(op["block"])), op)

    __init__.__signature__ = base_sig.replace(parameters=params)
    cls = type(name, (base,), {"__init__": __init__, "__module__": module, "__qualname__": name})
    # Modified blocks are not the stock class: let diffusers treat them as ordinary modules for device maps.
    return cls
