"""``ppcl encode``: data shards -> cache of VAE latents and prompt embeddings (the teacher's own encoders).

Images: decoded, converted to RGB, resized so the SHORTER side equals R (bicubic), centre-cropped to R x R,
scaled to [-1, 1] and passed to ``adapter.encode_images`` (normalised latents (B, C, R/f, R/f)). Captions go
to ``adapter.encode_prompts`` (a family-specific dict of batch-first tensors) at ``max_sequence_length`` text
tokens (None: the pipeline folder's ``ppcl.json`` default, see :func:`ppcl.arch.generation_defaults`, else the
pipeline's own default); the manifest's tensor shapes show the length used. See :mod:`ppcl.data.cache` for
the on-disk format and the reader. Cache shards keep the data shards' names and keys, in the same order.

Long captions: a caption longer than ``max_sequence_length`` tokens is truncated by the pipeline (as at
generation). The pipelines log one warning per such caption that repeats the cut text (a 10,000-character caption
printed ~200 KB); those warnings are silenced during encoding and the run reports once, on stderr, how many
captions were cut, counted by tokenising each caption ourselves (``adapter.prompt_token_counts``).

Design choices: floating tensors are stored in float16 (halves the cache; latents and final-layer-normed
text states are well inside its range); the cache shard's row groups hold ``ROW_GROUP_ROWS`` samples, which
is the reader's unit of shuffling and of work splitting.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

from ppcl import storage
from ppcl.data.cache import MANIFEST, UNCOND, CacheManifest, CacheShardInfo, TensorSpec, UncondInfo
from ppcl.errors import PPCLError

#: Samples per Parquet row group in a cache shard (unit of shuffling and of DataLoader work splitting).
ROW_GROUP_ROWS = 32


def load_image(data: bytes, resolution: int) -> np.ndarray:
    """Encoded image bytes -> (3, R, R) float32 in [-1, 1]: shorter side resized to R, centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32)
    return arr.transpose(2, 0, 1) / 127.5 - 1.0


def _stored(t) -> np.ndarray:
    """A torch tensor (one sample) -> numpy array in its stored dtype (float16 for floating types)."""
    import torch

    t = t.detach().cpu()
    if t.is_floating_point():
        return t.to(torch.float16).numpy()
    if t.dtype == torch.bool:
        return t.numpy()
    return t.numpy()


def encode_shards(
    model: str,
    data: str,
    out: str,
    *,
    resolution: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    max_sequence_length: int | None = None,
    progress: bool = True,
    negative_prompt: str | None = None,
) -> CacheManifest:
    """Encode every shard of ``data`` (output of ``ppcl shard``) with pipeline ``model`` into ``out``.

    ``resolution`` None: the folder's ``ppcl.json`` height, else the pipeline's default sample size.
    ``max_sequence_length`` None: the folder's ``ppcl.json`` default, else the pipeline's. ``negative_prompt``
    (None: the family's, :attr:`ppcl.arch.common.Adapter.negative_prompt`) is encoded once more, at the same text
    length, into ``uncond.safetensors``: the unconditional branch distillation can train (``uncond_ratio``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from ppcl.progress import progress as tqdm

    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.data.shard import read_shard_manifest

    if batch_size < 1:
        raise PPCLError(f"--batch-size must be >= 1 (got {batch_size})")
    if max_sequence_length is not None and max_sequence_length < 1:
        raise PPCLError(f"--max-sequence-length must be >= 1 (got {max_sequence_length})")
    shards = read_shard_manifest(data)  # validate the input before loading a (possibly huge) model
    storage.check_bucket(out)
    torch_dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in torch_dtype:
        raise PPCLError(f"--dtype must be one of float32, bfloat16, float16 (got {dtype})")
    pipe = load_pipeline(model, device=device, dtype=torch_dtype[dtype])
    adapter = get_adapter(pipe)
    from ppcl.arch import generation_defaults

    defaults = generation_defaults(model) if local_path(model) else {}
    if max_sequence_length is None:
        max_sequence_length = defaults.get("max_sequence_length")
    factor = int(getattr(pipe, "vae_scale_factor", 8)) * 2  # latents are packed in 2x2 patches
    if resolution is None:
        resolution = defaults.get("height") or int(getattr(pipe, "default_sample_size", 64)) * factor // 2
    if resolution < factor or resolution % factor:
        raise PPCLError(f"--resolution {resolution} must be a positive multiple of {factor} for this pipeline")

    specs: dict[str, TensorSpec] = {}
    infos: list[CacheShardInfo] = []
    local_out = None if storage.is_s3(out) else Path(out)
    if local_out is not None:
        if local_out.exists() and not local_out.is_dir():
            raise PPCLError(f"--out {out} exists and is not a folder")
        local_out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ppcl-encode-"))
    bar = tqdm(total=shards.accepted, desc="encode", unit="sample", disable=not progress)
    cut = _Truncation(adapter, pipe, max_sequence_length)
    try:
        for info in shards.shards:
            tmp = (local_out or work) / f".{info.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with _quiet_truncation(pipe):
                    rows = _encode_shard(
                        pipe, adapter, storage.join(data, info.name), tmp, resolution, batch_size, specs, bar, pa, pq,
                        max_sequence_length, cut,
                    )
                digest = storage.sha256_file(tmp)
                nbytes = tmp.stat().st_size
                if local_out is not None:
                    os.replace(tmp, local_out / info.name)
                else:
                    storage.upload_file(tmp, storage.join(out, info.name), sha256=digest)
            finally:
                tmp.unlink(missing_ok=True)
            infos.append(CacheShardInfo(name=info.name, samples=rows, bytes=nbytes, sha256=digest))
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    if cut.truncated:
        print(f"encode: {cut.message()}", file=sys.stderr)
    uncond = _write_uncond(pipe, adapter, out, local_out, specs,
                           adapter.negative_prompt if negative_prompt is None else negative_prompt, max_sequence_length)

    manifest = CacheManifest(
        model=str(model), family=str(getattr(adapter, "family", type(adapter).__name__)), resolution=resolution,
        data=str(data), tensors=specs, samples=sum(i.samples for i in infos), shards=infos, uncond=uncond,
    )  # fmt: skip
    storage.write_bytes(storage.join(out, MANIFEST), (manifest.model_dump_json(indent=2) + "\n").encode())
    return manifest


def _write_uncond(pipe, adapter, out: str, local_out: Path | None, specs: dict[str, TensorSpec], prompt: str,
                  max_sequence_length: int | None) -> UncondInfo:
    """Encode ``prompt`` like a caption (same text length, same stored dtypes) into ``out``/uncond.safetensors."""
    import torch
    from safetensors.torch import save_file

    with torch.inference_mode(), _quiet_truncation(pipe):
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        text = adapter.encode_prompts(pipe, [prompt], **kw)
    tensors = {}
    for name, t in text.items():
        if specs and name not in specs:
            raise PPCLError(f"the negative prompt's encoding has tensor {name!r}, the captions' do not")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(_stored(t[0])))
    folder = local_out if local_out is not None else Path(tempfile.mkdtemp(prefix="ppcl-uncond-"))
    tmp = folder / f".{UNCOND}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file(tensors, str(tmp), metadata={"prompt": prompt})
        digest, nbytes = storage.sha256_file(tmp), tmp.stat().st_size
        if local_out is not None:
            os.replace(tmp, local_out / UNCOND)
        else:
            storage.upload_file(tmp, storage.join(out, UNCOND), sha256=digest)
    finally:
        tmp.unlink(missing_ok=True)
        if local_out is None:
            shutil.rmtree(folder, ignore_errors=True)
    return UncondInfo(prompt=prompt, bytes=nbytes, sha256=digest)


def local_path(model: str) -> bool:
    return not storage.is_s3(str(model)) and Path(model).is_dir()


_TRUNCATION_WARNING = "The following part of your input was truncated because"


class _DropTruncationWarning(logging.Filter):
    """Drops the pipelines' per-caption truncation warning (and only that one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TRUNCATION_WARNING)


@contextlib.contextmanager
def _quiet_truncation(pipe):
    """Silence the truncation warning in the loggers of the pipeline's own modules for the block. A filter on a
    logger sees only that logger's records, so it goes on each module's logger in the pipeline's class tree."""
    loggers = [logging.getLogger(c.__module__) for c in type(pipe).__mro__ if c.__module__.startswith("diffusers.")]
    drop = _DropTruncationWarning()
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


class _Truncation:
    """Counts captions longer than the text limit in force: ``max_sequence_length`` or, when None, the default
    of the pipeline's ``encode_prompt``. Families without ``prompt_token_counts`` are not counted."""

    def __init__(self, adapter, pipe, max_sequence_length: int | None):
        self.count_fn = getattr(adapter, "prompt_token_counts", None)
        self.pipe, self.limit = pipe, max_sequence_length
        if self.limit is None:
            param = inspect.signature(pipe.encode_prompt).parameters.get("max_sequence_length")
            default = param.default if param is not None else None
            self.limit = default if isinstance(default, int) else None
        self.truncated = self.seen = 0

    def add(self, captions: list[str]) -> None:
        self.seen += len(captions)
        if self.count_fn is not None and self.limit is not None:
            self.truncated += sum(n > self.limit for n in self.count_fn(self.pipe, captions))

    def message(self) -> str:
        return (f"{self.truncated} of {self.seen} captions were longer than max_sequence_length ({self.limit} tokens) "
                "and were truncated")


def _encode_shard(pipe, adapter, src: str, dst: Path, resolution, batch_size, specs, bar, pa, pq,
                  max_sequence_length: int | None = None, cut: _Truncation | None = None) -> int:
    import torch

    writer = None
    pending: dict[str, list] = {"key": []}
    rows = 0

    def flush():
        nonlocal writer
        if not pending or not pending["key"]:
            return
        table = pa.table(pending)
        if writer is None:
            writer = pq.ParquetWriter(dst, table.schema, compression="zstd", write_statistics=["key"])
        writer.write_table(table, row_group_size=len(pending["key"]))
        for v in pending.values():
            v.clear()

    try:
        with storage.open_read(src) as fh:
            pf = pq.ParquetFile(fh)
            for batch in pf.iter_batches(batch_size=batch_size, columns=["key", "caption", "image"]):
                b = batch.to_pydict()
                pixels = []
                for key, image in zip(b["key"], b["image"], strict=True):
                    try:
                        pixels.append(load_image(image, resolution))
                    except Exception as e:  # noqa: BLE001 - the sharder validated it; say which one broke
                        raise PPCLError(f"{src}: cannot decode image of sample '{key}' ({e})") from e
                with torch.inference_mode():
                    latents = adapter.encode_images(pipe, torch.from_numpy(np.stack(pixels)))
                    kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
                    text = adapter.encode_prompts(pipe, list(b["caption"]), **kw)
                if cut is not None:
                    cut.add(list(b["caption"]))
                tensors = {"latents": latents, **text}
                for name, t in tensors.items():
                    if t.shape[0] != len(b["key"]):
                        raise PPCLError(f"encoder output {name!r} has batch {t.shape[0]}, expected {len(b['key'])}")
                    arrays = [_stored(t[j]) for j in range(t.shape[0])]
                    _update_spec(specs, name, arrays)
                    pending.setdefault(name, []).extend(a.tobytes() for a in arrays)
                    pending.setdefault(f"{name}.shape", []).extend(list(a.shape) for a in arrays)
                pending.setdefault("key", []).extend(b["key"])
                rows += len(b["key"])
                bar.update(len(b["key"]))
                if len(pending["key"]) >= ROW_GROUP_ROWS:
                    flush()
        flush()
        if writer is None:  # an empty data shard: still write a readable (empty) cache shard
            pq.write_table(pa.table({"key": pa.array([], pa.string())}), dst)
    finally:
        if writer is not None:
            writer.close()
    return rows


def _update_spec(specs: dict[str, TensorSpec], name: str, arrays: list[np.ndarray]) -> None:
    spec = specs.get(name)
    shape = list(arrays[0].shape)
    for a in arrays[1:]:
        shape = [s if s == d else -1 for s, d in zip(shape, a.shape, strict=True)]
    if spec is None:
        specs[name] = TensorSpec(dtype=str(arrays[0].dtype), shape=shape)
    else:
        spec.shape = [s if s == d else -1 for s, d in zip(spec.shape, shape, strict=True)]
