"""Read the latent / text-embedding cache written by ``ppcl encode`` (no VAE or text encoder needed).

Layout (a local folder or an s3:// prefix)::

    CACHE/manifest.json                 CacheManifest: model, resolution, tensor names/dtypes/shapes, shards
    CACHE/shard-00000-of-00004.parquet  same names and keys as the data shards; columns:
        key (str), and per tensor NAME: NAME (binary: the row's tensor, C-order, the manifest's dtype)
        and NAME.shape (list<int32>: its shape, batch dimension removed)
    CACHE/uncond.safetensors            the text tensors of the family's negative prompt (one sample, no batch
        dimension, stored dtypes): the unconditional branch of classifier-free guidance, which distillation
        trains on a share of its samples (``DistillSettings.uncond_ratio``); the manifest's ``uncond`` names
        the prompt, size and sha256. Caches written before it have none.

Tensors: ``latents`` (C, h, w) normalised as the transformer expects before packing, plus the family's text
tensors (e.g. FLUX ``prompt_embeds`` (T, D) and ``pooled_prompt_embeds`` (D,); Qwen-Image
``prompt_embeds`` (T, D) and ``prompt_embeds_mask`` (T,)). Floating tensors are stored as float16 and read
back as float32; integer/bool tensors (masks) keep their dtype. A dimension that differs between rows (e.g.
Qwen-Image's T, padded per encoding batch) is -1 in the manifest; :func:`collate` zero-pads it to the batch
maximum (masks padded with 0 = masked).

Splitting across DataLoader workers and processes (design choice): the unit of reading is one Parquet row
group of one shard. All units are put in one global order (optionally shuffled with ``seed`` and ``epoch``:
unit order permuted, rows within a unit permuted), giving every sample a global position ``p``. Process
``rank`` of ``world`` takes the samples with ``p % world == rank`` (balanced to within one sample), and
DataLoader worker ``w`` of ``W`` reads only the units ``u % W == w``. Every sample is therefore seen exactly
once per epoch across all workers of all processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel

from ppcl import storage
from ppcl.errors import PPCLError
from ppcl.integrity import read_manifest, verify_files

MANIFEST = "manifest.json"
CACHE_VERSION = 1
UNCOND = "uncond.safetensors"


class TensorSpec(BaseModel):
    dtype: str  # numpy dtype name as stored, e.g. "float16", "int64"
    shape: list[int]  # per sample (no batch dimension); -1 where rows differ


class CacheShardInfo(BaseModel):
    name: str
    samples: int
    bytes: int
    sha256: str


class UncondInfo(BaseModel):
    """The negative prompt's text tensors (``CACHE/uncond.safetensors``)."""

    prompt: str
    name: str = UNCOND
    bytes: int
    sha256: str


class CacheManifest(BaseModel):
    version: Literal[1] = 1
    kind: Literal["ppcl.latent_cache"] = "ppcl.latent_cache"
    model: str
    family: str
    resolution: int
    data: str
    tensors: dict[str, TensorSpec]
    samples: int
    shards: list[CacheShardInfo]
    #: the negative prompt's embeddings; None in caches written before ppcl stored them
    uncond: UncondInfo | None = None


def read_cache_manifest(path: str, *, verify: bool = True) -> CacheManifest:
    """Read and validate CACHE/manifest.json; with ``verify`` also check every listed shard's size and sha256
    (:func:`ppcl.integrity.verify_files`: PPCLError naming the first file that does not match)."""
    mpath = storage.join(path, MANIFEST)
    if not storage.exists(mpath):
        raise PPCLError(f"{mpath} not found: is {path} the output of `ppcl encode`?")
    manifest = read_manifest(CacheManifest, mpath, path, what="cache manifest", remedy="re-run `ppcl encode`",
                             verify=verify)
    if verify and manifest.uncond is not None:
        u = manifest.uncond
        verify_files(path, [(u.name, u.bytes, u.sha256)], what="cache manifest", remedy="re-run `ppcl encode`")
    return manifest


def read_uncond(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """``(prompt, tensors)``: the negative prompt a cache stores and its text tensors (one sample, no batch
    dimension; floating ones as float32), verified against the manifest. A cache without them is one line saying
    to re-encode it."""
    from safetensors.torch import load

    path = str(path)
    manifest = read_cache_manifest(path)
    if manifest.uncond is None:
        raise PPCLError(f"{path}: this cache holds no negative-prompt embeddings (written before ppcl stored them): "
                        f"re-run `ppcl encode` to train the unconditional branch (uncond_ratio > 0)")
    tensors = load(storage.read_bytes(storage.join(path, manifest.uncond.name)))
    return manifest.uncond.prompt, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def with_uncond(batch: dict, drop: torch.Tensor, uncond: dict[str, torch.Tensor]) -> dict:
    """``batch`` with the text tensors of the rows where ``drop`` (B,) is True replaced by ``uncond`` (one
    sample). A dimension that differs (Qwen-Image's padded text length) is zero-padded on both sides to the larger,
    as :func:`collate` pads (masks padded with 0 = masked)."""
    if not bool(drop.any()):
        return batch
    out = dict(batch)
    for name, u in uncond.items():
        t = batch[name]
        u = u.to(t.device, t.dtype)
        if u.ndim != t.ndim - 1:
            raise PPCLError(f"negative-prompt tensor {name} has {u.ndim} dims, the batch's rows {t.ndim - 1}")
        shape = [max(a, b) for a, b in zip(t.shape[1:], u.shape)]
        t, u = zero_pad(t, [t.shape[0], *shape]), zero_pad(u, shape)
        out[name] = torch.where(drop.to(t.device).view(-1, *([1] * u.ndim)), u.unsqueeze(0), t)
    return out


def _unreadable(path: str, e: Exception) -> PPCLError:
    first = (str(e).strip().splitlines() or [""])[0]
    return PPCLError(f"{path}: unreadable cache shard ({type(e).__name__}: {first})")


def decode_tensor(data: bytes, dtype: str, shape) -> torch.Tensor:
    """One stored tensor -> torch (floating types as float32)."""
    arr = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(tuple(shape))
    t = torch.from_numpy(arr.copy())
    return t.float() if t.is_floating_point() else t


class LatentCache:
    """A cache folder / prefix: its validated manifest and row-group level access to its shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.manifest = read_cache_manifest(self.path)
        self._units: list[tuple[int, int, int]] | None = None

    def __len__(self) -> int:
        return self.manifest.samples

    @property
    def tensor_names(self) -> list[str]:
        return list(self.manifest.tensors)

    def units(self) -> list[tuple[int, int, int]]:
        """(shard index, row group, rows) for every row group of every shard, in manifest order."""
        if self._units is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            units = []
            for i, s in enumerate(self.manifest.shards):
                shard_path = storage.join(self.path, s.name)
                with storage.open_read(shard_path) as fh:
                    try:
                        md = pq.ParquetFile(fh).metadata
                    except (pa.ArrowException, OSError) as e:
                        raise _unreadable(shard_path, e) from None
                    units.extend((i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups))
            if sum(u[2] for u in units) != self.manifest.samples:
                raise PPCLError(f"{self.path}: shards hold {sum(u[2] for u in units)} rows, the manifest says "
                                f"{self.manifest.samples}")  # fmt: skip
            self._units = units
        return self._units

    def read_unit(self, shard: int, row_group: int, tensors: list[str] | None = None) -> list[dict]:
        """Rows of one row group as dicts {"key": str, name: Tensor, ...}."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = tensors or self.tensor_names
        columns = ["key"] + [c for n in names for c in (n, f"{n}.shape")]
        shard_path = storage.join(self.path, self.manifest.shards[shard].name)
        with storage.open_read(shard_path) as fh:
            try:
                table = pq.ParquetFile(fh).read_row_group(row_group, columns=columns)
            except (pa.ArrowException, OSError) as e:
                raise _unreadable(shard_path, e) from None
        data = table.to_pydict()
        rows = []
        for j, key in enumerate(data["key"]):
            row = {"key": key}
            for n in names:
                row[n] = decode_tensor(data[n][j], self.manifest.tensors[n].dtype, data[f"{n}.shape"][j])
            rows.append(row)
        return rows


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world) from the arguments, else accelerate's initialised state, else env RANK/WORLD_SIZE."""
    if rank is not None and world_size is not None:
        return rank, world_size
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            state = PartialState()
            return state.process_index, state.num_processes
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class CacheDataset(torch.utils.data.IterableDataset):
    """Samples of a cache as dicts {"key": str, "latents": (C, h, w) float32, <text tensors>...}.

    Args:
        path: cache folder or s3:// prefix.
        rank, world_size: this process's place among data-parallel processes (default: accelerate's state,
            else env RANK / WORLD_SIZE, else 0 / 1).
        shuffle, seed: deterministic shuffling; call :meth:`set_epoch` each epoch for a new order.
        tensors: subset of tensor names to read (default: all).
    See the module docstring for how samples are split (no duplicate, no gap).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        tensors: list[str] | None = None,
    ):
        super().__init__()
        self.cache = LatentCache(path)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.tensors = tensors
        if tensors:
            unknown = sorted(set(tensors) - set(self.cache.tensor_names))
            if unknown:
                raise PPCLError(f"{path}: no tensor {unknown[0]!r} in the cache (has {self.cache.tensor_names})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[tuple[int, tuple[int, int, int], np.ndarray]]:
        """Global order: [(unit index, unit, row permutation)] identical in every process and worker."""
        units = self.cache.units()
        if not self.shuffle:
            return [(u, unit, np.arange(unit[2])) for u, unit in enumerate(units)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(units))
        return [
            (int(u), units[u], np.random.default_rng([self.seed, self.epoch, int(u)]).permutation(units[u][2]))
            for u in order
        ]

    def __iter__(self) -> Iterator[dict]:
        rank, world = _dist_info(self.rank, self.world_size)
        if not 0 <= rank < world:
            raise PPCLError(f"invalid rank {rank} for world size {world}")
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        base = 0
        for slot, (_, (shard, group, n), perm) in enumerate(self._order()):
            # Positions base..base+n-1 belong to this unit; keep this process's ones.
            mine = [j for j in range(n) if (base + j) % world == rank]
            base += n
            if slot % nworkers != wid or not mine:
                continue
            rows = self.cache.read_unit(shard, group, self.tensors)
            for j in mine:
                yield rows[int(perm[j])]

    def num_samples(self, rank: int | None = None, world_size: int | None = None) -> int:
        """Samples one process sees per epoch."""
        r, w = _dist_info(rank if rank is not None else self.rank, world_size or self.world_size)
        total = len(self.cache)
        return total // w + (1 if r < total % w else 0)


def collate(rows: list[dict]) -> dict:
    """Stack rows into a batch: {"key": [str], name: (B, ...)}; dims that differ are zero-padded to the max."""
    out: dict = {"key": [r["key"] for r in rows]}
    for name in rows[0]:
        if name == "key":
            continue
        ts = [r[name] for r in rows]
        shape = [max(t.shape[d] for t in ts) for d in range(ts[0].ndim)]
        out[name] = torch.stack([zero_pad(t, shape) for t in ts])
    return out


def zero_pad(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """``t`` zero-padded at the end of each dimension to ``shape`` (itself when it already has that shape)."""
    pad = []
    for d in reversed(range(t.ndim)):
        pad.extend([0, shape[d] - t.shape[d]])
    return torch.nn.functional.pad(t, pad) if any(pad) else t


def iter_cache_batches(
    path: str | os.PathLike, batch_size: int, *, limit: int | None = None, tensors: list[str] | None = None
) -> Iterator[dict]:
    """Single-process batches in cache order (no shuffle): collated dicts, at most ``limit`` samples in all."""
    if batch_size < 1:
        raise PPCLError(f"batch size must be >= 1 (got {batch_size})")
    dataset = CacheDataset(path, rank=0, world_size=1, tensors=tensors)
    batch, seen = [], 0
    for row in dataset:
        if limit is not None and seen >= limit:
            break
        batch.append(row)
        seen += 1
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)
