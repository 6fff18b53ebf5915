"""Width-pruned exports in diffusers' custom-component layout (issue 17, item 3).

A width-pruned transformer is not a stock diffusers class. Two ways of loading it must therefore behave:

- ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` works without ppcl installed. The export
  carries the model code in diffusers' custom-component layout: model_index.json names
  ``["modeling_ppcl_<family>", "PPCL<StockClass>"]`` and ``transformer/modeling_ppcl_<family>.py`` defines that
  class (diffusers imports it with ``get_class_from_dynamic_module``). The file is :mod:`ppcl.width_runtime`
  verbatim plus a few generated lines; it imports only torch and diffusers. It is the same for every export of a
  family (per ppcl version): diffusers copies every local custom module to one shared cache path, so files that
  differed per export could overwrite each other under concurrent loads.
- The stock class (``FluxTransformer2DModel.from_pretrained(folder / "transformer")``) fails with an error, in
  both of diffusers' loading modes, instead of leaving the removed FFNs random behind warnings. diffusers only
  raises for a weight whose stored shape differs from the model's (unknown config fields and missing or unexpected
  weights are warnings), so the export stores, for every stock weight that width pruning removed, an empty tensor
  under the stock name (:data:`~ppcl.width_runtime.REMOVED_WEIGHTS_FILE`, listed in the safetensors index). The
  width classes, ppcl's and the exported one, ignore those names on load.

ppcl itself never runs the folder's code: :func:`ppcl_width_class` recognises a ppcl width export and
:func:`ppcl.arch.load_pipeline` loads it with ppcl's own class.
"""

from __future__ import annotations

import json
import pprint
from pathlib import Path

import torch
from torch import nn

from ppcl import __version__
from ppcl.errors import PPCLError

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def module_name(family: str) -> str:
    """The custom-code module of a family's width exports (the file is ``transformer/<name>.py``)."""
    return f"modeling_ppcl_{family}"


def width_class_name(adapter_cls: type) -> str:
    """``PPCL<StockClass>``: the name of a family's width class, here and in ``ppcl.arch.<family>``."""
    return f"PPCL{adapter_cls.transformer_class.__name__}"


def module_source(adapter_cls: type) -> str:
    """The full text of ``modeling_ppcl_<family>.py``: :mod:`ppcl.width_runtime` and the family's class."""
    import diffusers

    from ppcl import width_runtime

    base = adapter_cls.transformer_class
    if getattr(diffusers, base.__name__, None) is not base:  # the file imports it from the top level
        raise AssertionError(f"{base.__name__} is not importable as diffusers.{base.__name__}")
    name = width_class_name(adapter_cls)
    tail = "\n".join([
        "",
        "",
        f"# {'-' * 100}",
        f"# Written by ppcl {__version__} for {adapter_cls.family} exports: the family's width structure.",
        f"from diffusers import {base.__name__}  # noqa: E402",
        "",
        f"SPEC = {pprint.pformat(adapter_cls.width_code, width=100, sort_dicts=True)}",
        "",
        f"{name} = width_transformer_class({base.__name__}, {name!r}, SPEC)",
        "",
    ])
    return Path(width_runtime.__file__).read_text() + tail


def removed_weights(base: type, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Stock weight name -> stock shape, for every weight the stock class ``base`` has and ``model`` (a width-pruned
    model of the same config) lacks. Built on the meta device: no memory, any model size."""
    from accelerate import init_empty_weights

    cfg = {k: v for k, v in model.config.items() if not k.startswith("_") and k != "width_ops"}
    with init_empty_weights():
        stock = base.from_config(cfg)
    have = set(model.state_dict())
    return {k: tuple(v.shape) for k, v in stock.state_dict().items() if k not in have}


def _write_removed(folder: Path, removed: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    """The empty stand-ins and their entries in the safetensors index (created from the single weights file where
    the model was saved unsharded; diffusers then loads through the index)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ppcl.width_runtime import REMOVED_WEIGHTS_FILE

    index_path = folder / WEIGHTS_INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    elif (folder / WEIGHTS).is_file():
        with safe_open(folder / WEIGHTS, "pt") as f:
            keys = list(f.keys())
        index = {"metadata": {"total_size": (folder / WEIGHTS).stat().st_size},
                 "weight_map": {k: WEIGHTS for k in keys}}
    else:
        raise PPCLError(f"{folder}: no {WEIGHTS} or {WEIGHTS_INDEX} to add the removed-weight stand-ins to")
    clash = sorted(set(removed) & set(index["weight_map"]))
    if clash:  # a bug: the model has that weight, it was not removed
        raise AssertionError(f"removed weight {clash[0]} is also a weight of the model")
    note = ("empty stand-ins of stock weights that width pruning removed: the stock class refuses this folder; "
            "load it with trust_remote_code=True")
    save_file({k: torch.empty(0, dtype=dtype) for k in removed}, folder / REMOVED_WEIGHTS_FILE,
              metadata={"format": "pt", "ppcl": note})
    index["weight_map"].update({k: REMOVED_WEIGHTS_FILE for k in sorted(removed)})
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_custom_code(adapter_cls: type, model: nn.Module, folder: str | Path) -> list[str]:
    """Make the transformer folder ``folder`` (already written by ``model.save_pretrained``) a custom component.

    Writes ``modeling_ppcl_<family>.py`` and the removed-weight stand-ins (module doc). Returns the model_index.json
    entry ``[module, class]``.
    """
    import re

    from ppcl.width_runtime import removed_weight_patterns

    folder = Path(folder)
    removed = removed_weights(adapter_cls.transformer_class, model)
    if not removed:  # every width op removes an FFN or a text-stream update
        raise AssertionError("a width-pruned model that lacks no stock weight")
    patterns = [re.compile(p) for p in removed_weight_patterns(adapter_cls.width_code)]
    stray = [k for k in removed if not any(p.search(k) for p in patterns)]
    if stray:  # the width class would warn about it on every load: width_code disagrees with the adapter
        raise AssertionError(f"{adapter_cls.family}: removed weight {stray[0]} is not covered by width_code")
    _write_removed(folder, removed, next(model.parameters()).dtype)
    name = module_name(adapter_cls.family)
    (folder / f"{name}.py").write_text(module_source(adapter_cls))
    return [name, width_class_name(adapter_cls)]


def ppcl_width_class(path: str | Path, entry, adapters) -> type | None:
    """ppcl's own class for the transformer of a ppcl width export in custom-code layout (``entry``: its
    model_index.json ``transformer`` entry; ``adapters``: the family adapter classes); None for anything else.
    Only the names are read, no code of the folder is run."""
    import importlib

    if not isinstance(entry, (list, tuple)) or len(entry) < 2:
        return None
    for cls in adapters:
        if list(entry[:2]) == [module_name(cls.family), width_class_name(cls)]:
            if not (Path(path) / "transformer" / f"{entry[0]}.py").is_file():
                return None
            return getattr(importlib.import_module(cls.__module__), width_class_name(cls))
    return None
