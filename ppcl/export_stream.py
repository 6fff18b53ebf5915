"""Streaming export: the pruned transformer's weights written tensor by tensor, never materialised (issue 16).

:func:`ppcl.export.export` plans the student on the meta device (shapes, config, exact counts; no memory) and this
module moves the bytes: every student tensor is read from the teacher's ``transformer/*.safetensors`` or the
distill run's ``plugs.safetensors`` with ``safetensors.safe_open`` (memory-mapped: only the bytes of the tensor being
copied are touched) and written straight into the student's safetensors files.

Decisions:

- One source of truth for the mapping: the block map (:func:`ppcl.lineage.block_map`, what the export records in
  ``ppcl_lineage.json``). A student key ``<list>.<i>.<rest>`` is ``<weights.prefix>.<rest>`` of the file its entry
  names (``teacher``: a kept block ``<list>.<j>``; ``plugs``: ``interval_<k>``, ``width_<b>`` or
  ``text_freeze_<a>_<b>.<m>``); every other key is the teacher key of the same name. Every copy is checked by name and
  shape against the pruned model's skeleton, and every source block is used whole (a leftover source tensor is an
  error), so nothing is copied by luck -- the same checks the in-memory ``build_pruned_transformer`` makes.
- Files are written by a small safetensors writer of our own (header first, from the planned dtypes and shapes, then
  the bytes of one tensor at a time) instead of ``safetensors.torch.save_file``, which holds a whole shard in memory
  twice (the tensors and their serialised bytes: 20 GB at diffusers' default 10 GB shard). The format is the
  published one (u64 little-endian header size, JSON header with ``__metadata__ = {"format": "pt"}`` padded with
  spaces to 8 bytes, then the raw little-endian data); the files read back with ``safe_open`` and load in diffusers.
- Memory: each source tensor is mapped, written and unmapped on its own (``safe_open`` per tensor: a header parse,
  microseconds), so the pages of the mapped files that were read -- counted in the process's RSS until unmapped --
  never add up. Peak growth is about the largest tensor's source bytes plus its cast copy (Qwen-Image: a 3072 x 12288
  FFN matrix, 151 MB in fp32 + 75 MB in bf16), independent of the block and the shard size.
- Shards: the split is huggingface_hub's ``split_state_dict_into_shards_factory`` (what diffusers' ``save_pretrained``
  calls) over the planned byte sizes in the model's state-dict order: the same file names
  (``diffusion_pytorch_model-00001-of-0000N.safetensors``), the same tensor-to-file assignment and the same
  ``diffusion_pytorch_model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``; ``indent=2``, sorted
  keys) as ``save_pretrained(max_shard_size=...)``; a single ``diffusion_pytorch_model.safetensors`` and no index when
  everything fits in one shard. The default shard size is diffusers' (``"10GB"``).
- dtype: by default a teacher tensor keeps the dtype it is stored in and a plug tensor (fp32 master weights) is cast
  to the teacher's dtype (the floating dtype most of the teacher's bytes are stored in): a bf16 teacher gives a bf16
  export. ``dtype`` casts every floating-point tensor. Casts are ``Tensor.to`` (round to nearest even), so a streamed
  bf16 export equals the fp32 in-memory export cast with ``.to(torch.bfloat16)``, bit for bit.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppcl.errors import PPCLError

#: diffusers' file names (``diffusers.utils.constants``), spelled here so that the names are part of this contract
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
#: ``ModelMixin.save_pretrained``'s default ``max_shard_size``
DEFAULT_MAX_SHARD_SIZE = "10GB"
#: the values of ``--dtype`` (None: the teacher's)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_ST_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_DTYPES = {v: k for k, v in _ST_NAMES.items()}


@dataclass(frozen=True)
class TensorRef:
    """One stored tensor: the file, its key there, and its dtype and shape as stored (read from the header)."""

    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Copy:
    """One tensor of the student: its key, where it comes from, the dtype it is written in."""

    name: str
    source: TensorRef
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.source.shape) * self.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------------------ reading headers
def read_tensor_refs(path: Path, what: str) -> dict[str, TensorRef]:
    """Key -> :class:`TensorRef` of every tensor of one safetensors file (its header only; no data is read)."""
    from safetensors import safe_open

    refs = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                dtype = _ST_DTYPES.get(s.get_dtype())
                if dtype is None:
                    raise PPCLError(f"{what} {path}: tensor {key} has dtype {s.get_dtype()}, which ppcl cannot export")
                refs[key] = TensorRef(path, key, dtype, tuple(int(d) for d in s.get_shape()))
    except PPCLError:
        raise
    except Exception as e:  # noqa: BLE001 -- SafetensorError and OSError: the file is not a readable safetensors
        raise PPCLError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return refs


def teacher_tensors(model: Path) -> dict[str, TensorRef]:
    """Every tensor of the teacher's transformer: ``transformer/diffusion_pytorch_model.safetensors.index.json``'s
    ``weight_map`` when the folder is sharded, else ``transformer/diffusion_pytorch_model.safetensors`` (the files
    diffusers itself loads; variants such as ``*.fp16.safetensors`` are not read)."""
    folder = model / "transformer"
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise PPCLError(f"unreadable {index}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        refs: dict[str, TensorRef] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise PPCLError(f"{path}: listed in {index.name} but missing")
            for key, ref in read_tensor_refs(path, "teacher weights").items():
                if weight_map.get(key) == name:
                    refs[key] = ref
        missing = sorted(set(weight_map) - set(refs))
        if missing:
            raise PPCLError(f"{index}: {missing[0]} is listed in {weight_map[missing[0]]} but not stored there")
        return refs
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        raise PPCLError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} (the export reads the teacher's safetensors)")
    return read_tensor_refs(single, "teacher weights")


def check_plug_tensors(units, path: Path) -> dict[str, TensorRef]:
    """The run's ``plugs.safetensors`` must hold exactly the units' tensors (``<unit>.<param>``) with their shapes, as
    :func:`ppcl.distill.load_unit_weights` requires -- checked from the header, without loading a plug."""
    from ppcl.distill.units import unit_table

    refs = read_tensor_refs(path, "plugs")
    expected = {k: tuple(v.shape) for k, v in unit_table(units).state_dict().items()}
    missing = sorted(set(expected) - set(refs))
    extra = sorted(set(refs) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise PPCLError(f"plugs {path} do not match the plan/model: {what}")
    for k, shape in expected.items():
        if refs[k].shape != shape:
            raise PPCLError(f"plugs {path} do not match the model: {k} has shape {refs[k].shape}, expected {shape}")
    return refs


def main_dtype(refs: dict[str, TensorRef]) -> torch.dtype:
    """The floating dtype most of these tensors' bytes are stored in (fp32 when there is none)."""
    size: Counter[torch.dtype] = Counter()
    for r in refs.values():
        if r.dtype.is_floating_point:
            size[r.dtype] += _numel(r.shape) * r.dtype.itemsize
    return max(size, key=lambda d: (size[d], str(d))) if size else torch.float32


# ------------------------------------------------------------------------------------------------------ mapping
def plan_copies(adapter, units, skeleton: dict[str, Any], teacher: dict[str, TensorRef],
                plugs: dict[str, TensorRef], dtype: torch.dtype | None = None) -> list[Copy]:
    """Every tensor of the pruned model, in ``skeleton``'s order (its state dict on the meta device: key -> tensor
    with the expected shape), with its source (module doc) and output dtype; PPCLError naming the first key that
    cannot be filled, a shape that differs, or a source tensor that would be left over."""
    from ppcl.lineage import block_map

    lists = {name for name, _ in adapter.block_lists}
    where = {(b["student_list"], b["student_index"]): (b["weights"]["source"], b["weights"]["prefix"])
             for b in block_map(adapter, units)}
    tables = {"teacher": teacher, "plugs": plugs}
    teacher_dtype = main_dtype(teacher)
    copies: list[Copy] = []
    used: dict[str, set[str]] = {"teacher": set(), "plugs": set()}
    prefixes: set[tuple[str, str]] = set()
    for key, ref in skeleton.items():
        head = key.split(".", 2)
        if head[0] in lists and len(head) == 3 and head[1].isdigit():
            if (head[0], int(head[1])) not in where:
                raise PPCLError(f"pruned model expects {key} but the block map has no block {head[0]}.{head[1]}")
            source, prefix = where[(head[0], int(head[1]))]
            src_key = f"{prefix}.{head[2]}"
            prefixes.add((source, prefix))
        else:
            source, src_key = "teacher", key
        src = tables[source].get(src_key)
        if src is None:
            raise PPCLError(f"cannot fill {key}: the {source} weights have no {src_key}")
        if src.shape != tuple(ref.shape):
            raise PPCLError(f"shape mismatch for {key}: source {src_key} {src.shape}, pruned model {tuple(ref.shape)}")
        if not src.dtype.is_floating_point:
            out = src.dtype
        elif dtype is not None:
            out = dtype
        else:
            out = src.dtype if source == "teacher" else teacher_dtype
        used[source].add(src_key)
        copies.append(Copy(key, src, out))
    # Every source block is used whole; so is the teacher outside its block lists (same class, same modules).
    for source, prefix in sorted(prefixes):
        extra = sorted(k for k in tables[source] if k.startswith(prefix + ".") and k not in used[source])
        if extra:
            raise PPCLError(f"the module placed from {source} {prefix} has weights the pruned model lacks: {extra[0]}")
    outside = sorted(k for k in teacher if k.split(".", 1)[0] not in lists and k not in used["teacher"])
    if outside:
        raise PPCLError(f"teacher weight {outside[0]} has no place in the pruned model")
    return copies


# ------------------------------------------------------------------------------------------------------ writing
def read_tensor(ref: TensorRef, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One stored tensor (cast to ``dtype``); the file is mapped only for this tensor, so its pages leave the
    process's memory when the returned tensor is dropped (module doc)."""
    from safetensors import safe_open

    with safe_open(str(ref.path), framework="pt") as f:
        t = f.get_tensor(ref.key)
    if t.dtype != ref.dtype or tuple(t.shape) != ref.shape:  # the file changed since its header was read
        raise PPCLError(f"{ref.path}: {ref.key} is {t.dtype} {tuple(t.shape)}, its header said {ref.dtype} "
                        f"{ref.shape} (changed during the export)")
    return t.to(dtype or t.dtype).contiguous()


def write_safetensors(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor]) -> None:
    """A safetensors file of ``layout`` (name, dtype, shape; in this order), its data pulled one tensor at a time
    from ``tensors`` (module doc: header first, then tensor by tensor; ``__metadata__`` ``{"format": "pt"}``)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in layout:
        n = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        it = iter(tensors)  # not zip(): its reused result tuple would keep the previous tensor alive
        for name, dtype, shape in layout:
            t = next(it, None)
            if t is None or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise AssertionError(f"{path}: {name} is {got}, the header says {dtype} {tuple(shape)}")
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t  # the only reference: the source pages and the cast copy go now


def write_transformer_weights(copies: list[Copy], folder: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
                              ) -> list[str]:
    """Write ``copies`` into ``folder`` in diffusers' layout (module doc). Returns the weight file names."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        {c.name: c for c in copies}, get_storage_size=lambda c: c.nbytes,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=parse_shard_size(max_shard_size))
    by_name = {c.name: c for c in copies}
    for filename, names in split.filename_to_tensors.items():
        shard = [by_name[n] for n in names]
        write_safetensors(folder / filename, [(c.name, c.dtype, c.source.shape) for c in shard],
                          (read_tensor(c.source, c.dtype) for c in shard))
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def parse_shard_size(size: int | str) -> int:
    """``--max-shard-size``: bytes, or a number with a unit as diffusers takes it (``"10GB"``, ``"500MB"``; decimal
    units, KB..TB)."""
    from ppcl.settings import parse_size

    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        text = str(size).strip()
        try:
            n = parse_size(text)
        except ValueError:
            raise PPCLError(f"--max-shard-size {size!r}: expected bytes or a size such as 10GB or 500MB") from None
    if n < 1:
        raise PPCLError(f"--max-shard-size {size!r}: must be at least 1 byte")
    return n
