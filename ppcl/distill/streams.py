"""Batch streams of a distillation run: deterministic, resumable, one share per process; and each step's inputs.

Batches are visited in epochs; the order of an epoch is a permutation seeded by ``(seed, epoch)`` for the
in-memory synthetic set; a latent cache is read through ``ppcl.data.cache.CacheDataset`` (shuffled by
``(seed, epoch)`` too). The data position ``(epoch, index)`` is checkpointed; resuming re-opens the epoch and skips
``index`` batches. Several processes (``torchrun`` / ``accelerate launch``): each takes every ``world``-th batch,
so one step's global batch is the ``world`` consecutive batches of the epoch's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ppcl.arch.common import Adapter
from ppcl.distill.settings import DistillSettings
from ppcl.errors import PPCLError


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BatchStream:
    """Deterministic, resumable stream of batches: position ``(epoch, index)`` within this process's share."""

    def __init__(self, epoch_iter: Callable[[int], Iterator[dict[str, Any]]]):
        self._epoch_iter = epoch_iter
        self.epoch = 0
        self.index = 0
        self._it: Iterator[dict[str, Any]] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._it = self._epoch_iter(self.epoch)
        for _ in range(self.index):
            if next(self._it, None) is None:
                raise PPCLError(f"checkpoint data position {state} is past the end of the data")

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._epoch_iter(self.epoch)
        for _ in range(2):
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            self.epoch, self.index = self.epoch + 1, 0
            self._it = self._epoch_iter(self.epoch)
        raise PPCLError("the training data is empty (no batch in an epoch)")


def memory_stream(batches: list[dict[str, Any]], seed: int) -> BatchStream:
    """Batches held in memory, re-ordered each epoch by a permutation seeded by ``(seed, epoch)``."""
    if not batches:
        raise PPCLError("the training data is empty")
    rank, world = _rank_world()

    def epoch_iter(epoch: int) -> Iterator[dict[str, Any]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(batches), generator=g).tolist()
        return iter([batches[i] for j, i in enumerate(order) if j % world == rank or len(batches) < world])

    return BatchStream(epoch_iter)


def cache_stream(path: str | Path, batch_size: int, seed: int) -> BatchStream:
    """Batches of a latent cache (``ppcl.data.cache.CacheDataset``: this process's share, shuffled by
    ``(seed, epoch)``), collated to ``batch_size`` (the last short batch of an epoch is kept)."""
    from ppcl.data.cache import CacheDataset, collate

    rank, world = _rank_world()  # the process group's, never a stale launcher state
    dataset = CacheDataset(path, rank=rank, world_size=world, shuffle=True, seed=seed)

    def epoch_iter(epoch: int) -> Iterator[dict[str, Any]]:
        dataset.set_epoch(epoch)
        rows: list[dict[str, Any]] = []
        for row in dataset:
            rows.append(row)
            if len(rows) == batch_size:
                yield collate(rows)
                rows = []
        if rows:
            yield collate(rows)

    return BatchStream(epoch_iter)


def synthetic_data(pipe: Any, settings: DistillSettings) -> list[dict[str, Any]]:
    """The built-in data (``ppcl.calibration.synthetic_batches``), computed once per run and held in memory."""
    from ppcl.calibration import synthetic_batches

    return list(
        synthetic_batches(pipe, n_samples=settings.n_samples, batch_size=settings.batch_size,
                          resolution=settings.resolution, seed=settings.seed)
    )


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def take(stream: BatchStream, n: int) -> list[dict[str, Any]]:
    """The next ``n`` batches of ``stream``."""
    return [next(stream) for _ in range(n)]


def training_stream(
    pipe: Any, data: str | Path | list[dict[str, Any]] | None, settings: DistillSettings
) -> tuple[list[dict[str, Any]] | None, BatchStream]:
    """The run's batches: ``(batches, stream)``; ``batches`` is the in-memory list (the built-in synthetic set or
    ``data`` itself), None for a latent cache folder (read through the stream only)."""
    if data is None:
        batches = synthetic_data(pipe, settings)
        stream = memory_stream(batches, settings.seed)
    elif isinstance(data, list):
        batches = data
        stream = memory_stream(batches, settings.seed)
    else:
        if not Path(data).exists():
            raise PPCLError(f"data path not found: {data}")
        batches = None
        stream = cache_stream(data, settings.batch_size, settings.seed)
    return batches, stream


def training_uncond(pipe: Any, adapter: Adapter, data: str | Path | list[dict[str, Any]] | None,
                    settings: DistillSettings) -> dict[str, torch.Tensor] | None:
    """The negative prompt's text tensors ``uncond_ratio`` swaps in (None when it is 0): a latent cache's
    ``uncond.safetensors``, or, for the built-in synthetic set, the family's negative prompt through the
    pipeline's own text encoders (the set's text length). A list of batches carries none: refused."""
    if settings.uncond_ratio <= 0:
        return None
    if data is None:  # encoded as synthetic_batches encodes its prompts (same text length)
        from ppcl.arch import generation_defaults

        length = generation_defaults(pipe).get("max_sequence_length")
        with torch.inference_mode():
            text = adapter.encode_prompts(pipe, [adapter.negative_prompt],
                                          **({} if length is None else {"max_sequence_length": length}))
        # cloned outside inference mode: ordinary tensors, usable in the training graph's inputs
        return {k: (v[0].float() if v.is_floating_point() else v[0]).cpu().clone() for k, v in text.items()}
    if isinstance(data, list):
        raise PPCLError("uncond_ratio > 0 needs the negative prompt's embeddings: train on a latent cache "
                        "(`ppcl encode` stores them) or on the built-in set, not on a list of batches")
    from ppcl.data.cache import read_uncond

    return read_uncond(data)[1]


def step_inputs(
    pipe: Any, adapter: Adapter, settings: DistillSettings, device: torch.device, dtype: torch.dtype, rank: int,
    world: int = 1, uncond: dict[str, torch.Tensor] | None = None,
) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """``noised(batch, step)``: the model inputs of one step, the batch on ``device`` noised at sampled timesteps.

    The sigmas and noise of step ``t`` are drawn for the GLOBAL batch (``world`` x this rank's batch, in rank order)
    from a generator seeded with ``(seed, t)``, and rank ``r`` takes rows ``r*B .. (r+1)*B``: a run of N processes
    with batch B draws exactly what one process with batch N*B draws, a resumed run what the uninterrupted one drew
    (no generator state to restore); negative ``t``: the least-squares fit. One process draws as it always did.

    ``uncond`` (:func:`training_uncond`) with ``uncond_ratio`` > 0: each row's text is replaced by the negative
    prompt's with that probability, drawn from the same generator after the noise (so a run with the ratio at 0
    draws exactly what it drew before the setting existed)."""
    from ppcl.arch import shift_sigmas
    from ppcl.calibration import noise_batch, sample_sigmas

    scheduler_config = dict(pipe.scheduler.config) if hasattr(pipe, "scheduler") else {}
    swap = None  # the negative prompt's tensors, moved to the device once
    if uncond is not None and settings.uncond_ratio > 0:
        from ppcl.data.cache import with_uncond

        swap = to_device(uncond, device, dtype)

    def noised(batch: dict[str, Any], step: int):
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 7_919)
        b = to_device(batch, device, dtype)
        x0 = b["latents"]
        n = x0.shape[0]
        rows = slice(rank * n, (rank + 1) * n)
        sigma = sample_sigmas(n * world, settings.timesteps, g)
        sigma = shift_sigmas(sigma, scheduler_config, adapter.image_seq_len(x0))[rows]
        noise = torch.randn((n * world, *x0.shape[1:]), generator=g, dtype=torch.float32)[rows]
        if swap is not None:
            drop = torch.rand(n * world, generator=g)[rows] < settings.uncond_ratio
            b = with_uncond(b, drop, swap)
        return noise_batch(adapter, scheduler_config, b, sigma=sigma, shift=False, noise=noise,
                           guidance=settings.guidance).model_inputs

    return noised
