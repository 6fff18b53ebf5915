"""Width-pruned transformer classes that need only torch and diffusers (ppcl export's custom code).

``ppcl export`` copies this file verbatim into a width-pruned export as ``transformer/modeling_ppcl_<family>.py``,
followed by a few generated lines that build the family's class (``PPCLFluxTransformer2DModel`` ...). diffusers'
custom-component loader (``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``) imports that file,
so the export loads where ppcl is not installed. Nothing in this file may import ppcl: the test suite loads it in a
process where ``import ppcl`` fails.

It rebuilds exactly the module structure (and so the state-dict keys and forward) of ppcl's own width classes
(:func:`ppcl.arch.common.width_transformer_class` and the width operations above it), without their validation:
the ops in an export's config were validated by ppcl when it was built. The two are kept equal by test
(tests/test_custom_code.py: same weights load without a missing or unexpected key, same images). Family specifics
arrive as a plain ``spec`` dict that each adapter in ``ppcl/arch/<family>.py`` declares (``width_code``):

- ``block_lists``: transformer attributes holding the block lists, in execution order;
- ``ffn``: stream -> name of the block's FFN (the gated residual branch ``ffn_linear`` replaces);
- ``text_stream``: role -> dotted path of the text-stream update that ``text_freeze`` drops (``modulation``,
  ``ffn``, ``out``);
- ``frozen_modulation``: how a frozen block's light text modulation is built from block ``a``'s: ``adaln_zero``
  (an ``AdaLayerNormZero``: FLUX dual, SD3 joint blocks) or ``silu_linear_6d`` (``SiLU -> Linear(D_temb, 6D)``:
  Qwen-Image's ``txt_mod``).

Removed weights. A width export also stores, for every weight of the stock model that width pruning removed, an
EMPTY tensor under the stock name (:data:`REMOVED_WEIGHTS_FILE`, listed in the safetensors index): loading the
folder with the stock class then fails with diffusers' size-mismatch error instead of silently leaving those
weights random. The width classes ignore exactly those names on load (:func:`removed_weight_patterns`).
"""

from __future__ import annotations

import copy
import inspect
import re
from typing import Any

import torch
from torch import nn

#: the file with the empty stand-ins of the removed stock weights, beside the model's weights and listed in the
#: safetensors index (diffusers accepts only plain file names there). Not weights of the model: a reader that takes
#: every ``transformer/*.safetensors`` as the model's weights must skip it.
REMOVED_WEIGHTS_FILE = "ppcl_removed.safetensors"


class ZeroBranch(nn.Module):
    """A removed residual branch: zeros shaped like its input, so ``x + gate * branch(...)`` is exactly ``x``."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(x)


class ResidualLinear(nn.Module):
    """``y = x + W x + b`` over the last axis (``W``, ``b`` are trained weights of the export)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


class FrozenTextAdaLNZero(nn.Module):
    """A text-frozen block's text modulation (``AdaLayerNormZero`` call and return shapes): ``m = norm(x) * (1 +
    scale) + shift`` with ``shift, scale = linear(silu(emb))`` (``(B, D)`` each); the four gates/FFN terms are
    zeros, so the block adds nothing to the text state. ``linear`` is ``Linear(D_temb, 2 D)``."""

    def __init__(self, dim: int, emb_dim: int, norm: nn.Module, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(emb_dim, 2 * dim, bias=bias)
        self.norm = norm  # parameter-free LayerNorm, as in the source block

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        shift, scale = self.linear(nn.functional.silu(emb)).chunk(2, dim=1)
        m = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        zero = torch.zeros_like(shift)
        return m, zero, zero, zero, zero


class FrozenTextModulation6D(nn.Module):
    """A text-frozen block's ``SiLU -> Linear(D_temb, 6D)`` modulation: returns ``(B, 6D)`` as
    ``[shift1, scale1, 0, 0, 0, 0]`` with ``shift1, scale1 = linear(silu(temb))``; both text gates are 0."""

    def __init__(self, dim: int, emb_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(emb_dim, 2 * dim, bias=bias)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        shift_scale = self.linear(nn.functional.silu(temb))
        rest = shift_scale.new_zeros(*shift_scale.shape[:-1], 2 * shift_scale.shape[-1])
        return torch.cat([shift_scale, rest], dim=-1)


class WidthBlockMixin:
    """Width-modified blocks: residual projections ``ppcl_proj[stream]`` applied to the block's outputs."""

    def project_outputs(self, output):
        text, image = output
        proj = self._modules.get("ppcl_proj")
        if proj is not None:
            if "image" in proj:
                image = proj["image"](image)
            if "text" in proj and text is not None:
                text = proj["text"](text)
        return text, image


_WIDTH_BLOCKS: dict[type, type] = {}


def width_block_class(base: type) -> type:
    """``PPCL<base>``: ``base`` whose forward (same signature) applies the output projections."""
    if issubclass(base, WidthBlockMixin):
        return base
    if base not in _WIDTH_BLOCKS:

        def forward(self, *args, **kwargs):
            return self.project_outputs(base.forward(self, *args, **kwargs))

        forward.__signature__ = inspect.signature(base.forward)
        cls = type(f"PPCL{base.__name__}", (WidthBlockMixin, base), {"forward": forward, "__module__": __name__})
        _WIDTH_BLOCKS[base] = cls
    return _WIDTH_BLOCKS[base]


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _first_linear(module: nn.Module) -> nn.Linear:
    return next(m for m in module.modules() if isinstance(m, nn.Linear))


def _frozen_modulation(kind: str, source: nn.Module) -> nn.Module:
    """The light text modulation of a frozen block, shaped after block ``a``'s modulation ``source``."""
    if kind == "adaln_zero":
        lin = source.linear
        mod = FrozenTextAdaLNZero(lin.out_features // 6, lin.in_features, copy.deepcopy(source.norm),
                                  bias=lin.bias is not None)
    elif kind == "silu_linear_6d":
        lin = source[1]
        mod = FrozenTextModulation6D(lin.out_features // 6, lin.in_features, bias=lin.bias is not None)
    else:
        raise ValueError(f"unknown frozen text modulation {kind!r} (this file is older than the export?)")
    return mod.to(device=lin.weight.device, dtype=lin.weight.dtype)


def _proj(block: nn.Module, stream: str, dim: int, like: nn.Linear) -> None:
    if "ppcl_proj" not in block._modules:
        block.ppcl_proj = nn.ModuleDict()
    block.ppcl_proj[stream] = ResidualLinear(dim).to(device=like.weight.device, dtype=like.weight.dtype)


def apply_width_ops(model: nn.Module, spec: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Convert ``model``'s blocks in place for ``ops`` (block indices of this model, execution order)."""
    blocks = [b for name in spec["block_lists"] for b in getattr(model, name)]
    for op in ops:
        kind = op.get("op")
        if kind == "ffn_linear":
            block = blocks[int(op["block"])]
            stream = op.get("stream", "image")
            name = spec["ffn"][stream]
            lin = _first_linear(getattr(block, name))
            block.__class__ = width_block_class(type(block))
            setattr(block, name, ZeroBranch())
            _proj(block, stream, lin.in_features, lin)
        elif kind == "text_freeze":
            a, b = (int(x) for x in op["interval"])
            parts = spec["text_stream"]
            source = blocks[a]
            source_mod = source.get_submodule(parts["modulation"])
            dim = source.get_submodule(parts["out"]).out_features
            for k in range(a + 1, b + 1):
                block = blocks[k]
                mod = _frozen_modulation(spec["frozen_modulation"], source_mod)
                block.__class__ = width_block_class(type(block))
                _set_submodule(block, parts["modulation"], mod)
                _set_submodule(block, parts["ffn"], ZeroBranch())
                _set_submodule(block, parts["out"], ZeroBranch())
                if k == b:
                    _proj(block, "text", dim, _first_linear(mod))
        else:
            raise ValueError(f"unknown width op {kind!r} in width_ops (this file is older than the export?)")


def removed_weight_patterns(spec: dict[str, Any]) -> list[str]:
    """Regexes of the stock weight names a width op can remove (the FFNs and the text-stream parts): the width
    class has no such weight where an op removed it, so a checkpoint entry under such a name is the empty stand-in
    of a removed weight, not a weight of this model."""
    names = sorted({*spec["ffn"].values(), *spec["text_stream"].values()})
    lists = "|".join(re.escape(n) for n in spec["block_lists"])
    return [rf"^(?:{lists})\.\d+\.(?:{'|'.join(re.escape(n) for n in names)})\."]


def width_transformer_class(base: type, name: str, spec: dict[str, Any]) -> type:
    """``name``: a config-registered subclass of the stock ``base`` with the extra config field ``width_ops``
    (a list of op dicts whose indices are positions in THIS model); the constructor builds the stock model, then
    converts those blocks, so ``from_pretrained`` rebuilds the structure from config.json."""
    base_sig = inspect.signature(base.__init__)
    params = [p for p in base_sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    params.append(inspect.Parameter("width_ops", inspect.Parameter.KEYWORD_ONLY, default=None))

    def __init__(self, *args, width_ops=None, **kwargs):
        base.__init__(self, *args, **kwargs)
        ops = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(op).items() if v is not None}
               for op in (width_ops or [])]
        self.register_to_config(width_ops=ops)
        apply_width_ops(self, spec, ops)

    __init__.__signature__ = base_sig.replace(parameters=params)
    return type(name, (base,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": name,
        "_keys_to_ignore_on_load_unexpected": removed_weight_patterns(spec),
    })
