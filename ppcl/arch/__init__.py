"""Model-family adapters. The only package that knows a family by name.

``get_adapter(transformer_or_pipeline)`` detects the family from the loaded transformer's class (our
width-pruned classes subclass the stock ones, so they are detected too); ``adapter_for(name)`` maps a family
name to its adapter class; ``load_pipeline(path)`` loads a diffusers pipeline directory, including pipelines
whose transformer is one of ppcl's own config-registered classes.

Generation defaults (:func:`generation_defaults`): a pipeline folder may carry ``ppcl.json`` beside
``model_index.json``, ``{"version": 1, "generation": {"height", "width", "steps", "max_sequence_length",
"guidance"}}``
(every key optional). It records how the MODEL must be driven, not how a run is configured: a text encoder
trained at 16 tokens reads 500 unseen padding tokens at FLUX's default 512, which no run setting should have to
know. ``ppcl export`` copies it with the other non-transformer files, so a pruned pipeline inherits it. Readers:
the encode stage (``max_sequence_length``, ``height`` as the default resolution), the built-in calibration set
(``max_sequence_length``) and evaluation (all five); an explicit setting in the
config / on the command line always wins. A folder without the file behaves as before (diffusers' defaults).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ppcl.errors import PPCLError

# The protocol module imports torch; it is loaded on first use so that `ppcl.arch.FAMILIES` is cheap to import
# (the config schema and the CLI use it before any model is touched).
_COMMON = ("Adapter", "BlockCall", "BlockInfo", "count_parameters", "shift_sigmas")


def __getattr__(name: str):
    if name in _COMMON:
        from ppcl.arch import common

        return getattr(common, name)
    raise AttributeError(f"module 'ppcl.arch' has no attribute {name!r}")

#: The per-pipeline generation defaults file (see the module doc).
PIPELINE_DEFAULTS_FILE = "ppcl.json"
GENERATION_KEYS = ("height", "width", "steps", "max_sequence_length", "guidance")


def generation_defaults(model: Any) -> dict[str, Any]:
    """``generation`` of ``<pipeline folder>/ppcl.json`` (see the module doc); ``{}`` when absent.

    ``model``: a pipeline folder path, or a loaded diffusers pipeline (its ``name_or_path`` folder is read).
    Raises PPCLError for a malformed file (not JSON, unknown key, a non-positive size).
    """
    folder = getattr(model, "name_or_path", None) if not isinstance(model, (str, Path)) else model
    if not folder:
        return {}
    path = Path(folder) / PIPELINE_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PPCLError(f"unreadable {path}: {e}") from None
    gen = data.get("generation", {}) if isinstance(data, dict) else None
    if not isinstance(gen, dict):
        raise PPCLError(f"{path}: field 'generation' must be a mapping")
    for k, v in gen.items():
        if k not in GENERATION_KEYS:
            raise PPCLError(f"{path}: field 'generation.{k}' is not a known setting ({', '.join(GENERATION_KEYS)})")
        if k == "guidance":
            if v is not None and not isinstance(v, (int, float)):
                raise PPCLError(f"{path}: field 'generation.guidance' must be a number")
        elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PPCLError(f"{path}: field 'generation.{k}' must be a positive integer")
    return dict(gen)


#: family name -> "module:Class" of its adapter (imported lazily: diffusers is heavy).
FAMILIES: dict[str, str] = {
    "flux": "ppcl.arch.flux:FluxAdapter",
    "sd3": "ppcl.arch.sd3:SD3Adapter",
    "qwenimage": "ppcl.arch.qwenimage:QwenImageAdapter",
}

__all__ = [
    "Adapter", "BlockCall", "BlockInfo", "FAMILIES", "adapter_for", "count_parameters", "get_adapter",
    "load_pipeline", "pipeline_components", "shift_sigmas",
]


def adapter_for(family: str) -> "type[Adapter]":
    """The adapter class of a family name (``flux``, ``sd3``, ``qwenimage``)."""
    if family not in FAMILIES:
        raise PPCLError(f"unknown family '{family}': expected one of {', '.join(FAMILIES)}")
    module, cls = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), cls)


def get_adapter(model: Any) -> "Adapter":
    """The adapter for a loaded transformer, or for a pipeline (its ``.transformer``)."""
    transformer = getattr(model, "transformer", model)
    for family in FAMILIES:
        cls = adapter_for(family)
        if isinstance(transformer, cls.transformer_class):
            return cls(transformer)
    raise PPCLError(
        f"unsupported transformer class {type(transformer).__name__}: ppcl supports "
        f"{', '.join(FAMILIES)} (FluxTransformer2DModel, SD3Transformer2DModel, QwenImageTransformer2DModel)"
    )


def _resolve_class(library: str, name: str):
    try:
        return getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError) as e:
        raise PPCLError(f"cannot import transformer class {library}.{name}: {e}") from None


def pipeline_components(path: str | Path) -> list[str]:
    """The component names of the pipeline folder ``path`` (``model_index.json`` entries with a class)."""
    spec = _read_index(Path(path))
    return [k for k, v in spec.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]


def _read_index(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise PPCLError(f"model path not found: {path}")
    index = path / "model_index.json"
    if not index.is_file():
        raise PPCLError(f"not a diffusers pipeline directory (no model_index.json): {path}")
    try:
        spec = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise PPCLError(f"unreadable {index}: {e}") from None
    if not isinstance(spec, dict):
        raise PPCLError(f"unreadable {index}: expected a JSON object")
    return spec


def load_pipeline(path: str | Path, *, device: str | None = None, dtype=None,
                  components: Iterable[str] | None = None):
    """Load a diffusers pipeline directory (stock or ppcl-exported), its models on ``device`` in ``dtype``.

    Lean loading (issue 15): the transformer (the 20B of a Qwen-Image teacher) is read by its own class,
    safetensors tensor by tensor through diffusers' ``low_cpu_mem_usage`` path, cast to ``dtype`` as each tensor
    is read and, for an accelerator ``device`` (``"cuda:3"``: the rank's own GPU), placed there by
    ``device_map`` as it is read. It therefore never exists in float32 on the host nor on the device (the old
    path built the whole pipeline in float32 on the host, moved it, then cast: ~99 GB of host RAM and a 76 GiB
    device spike for Qwen-Image). The host holds at most one safetensors shard, memory-mapped (page cache
    shared by every rank of a node). ``dtype`` None keeps diffusers' default (float32), exactly as before, so CPU
    runs compute the same numbers.

    ``components``: the names to load (e.g. ``("transformer", "scheduler")`` for distillation from a latent
    cache, which holds the text embeddings and latents already); every other component is not read at all and
    is None on the returned pipeline. None loads every component. A name the folder does not have is an error.

    A width-pruned export carries its model code in diffusers' custom-code layout (``["modeling_ppcl_<family>",
    "<Class>"]`` in model_index.json, :mod:`ppcl.custom_code`); ppcl never runs that file: it loads the folder with
    its own width class (:func:`ppcl.custom_code.ppcl_width_class`) and the stock pipeline class runs it.
    """
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    # Loading bars for every sub-model drown the stage's own progress; errors still surface.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    spec = _read_index(path)
    from ppcl.integrity import check_pipeline_weights

    check_pipeline_weights(path)  # a truncated weight file: one line naming it, not a SafetensorError
    names = [k for k, v in spec.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]
    wanted = set(names) if components is None else set(components)
    unknown = sorted(wanted - set(names))
    if unknown:
        raise PPCLError(f"{path / 'model_index.json'}: no component {unknown[0]!r} (components: {', '.join(names)})")
    # A component passed as None is not read from disk (diffusers' own rule for optional components).
    kwargs: dict[str, Any] = {name: None for name in names if name not in wanted}
    if dtype is not None:
        kwargs["dtype"] = dtype
    own = None
    if "transformer" in wanted:
        from ppcl.custom_code import ppcl_width_class

        library, cls_name = spec["transformer"][:2]
        # a width export in custom-code layout: ppcl's own class, the folder's code is not run; registered after
        # the pipeline loads (diffusers would import the library model_index.json names to type-check a
        # component passed in)
        own = ppcl_width_class(path, spec.get("transformer"), [adapter_for(f) for f in FAMILIES])
        transformer = _load_transformer(path / "transformer", library, cls_name, device=device, dtype=dtype,
                                        cls=own)
        kwargs["transformer"] = None if own is not None else transformer
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
        if own is not None:
            pipe.register_modules(transformer=transformer)
    except (OSError, ValueError) as e:
        raise PPCLError(f"cannot load pipeline {path}: {str(e).splitlines()[0]}") from None
    if device is not None:
        pipe.to(device)  # the other components (small beside the transformer, which is there already)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_transformer(folder: Path, library: str, cls_name: str, *, device: str | None, dtype, cls=None):
    """The transformer of a pipeline folder in ``dtype``, read straight onto ``device`` (see
    :func:`load_pipeline`). On the CPU (or with no device) diffusers' plain ``low_cpu_mem_usage`` load. ``cls``:
    the class to load with (ppcl's own for a custom-code width export), else the one model_index.json names."""
    import torch

    if cls is None:
        cls = _resolve_class(library if library.startswith("ppcl") else "diffusers", cls_name)
    kw: dict[str, Any] = {"low_cpu_mem_usage": True}
    if dtype is not None:
        kw["dtype"] = dtype
    if device is not None and torch.device(device).type not in ("cpu", "meta"):
        kw["device_map"] = str(torch.device(device))
    try:
        return cls.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise PPCLError(f"cannot load transformer {folder}: {str(e).splitlines()[0]}") from None
