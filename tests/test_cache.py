"""The latent cache reader: splitting across workers x processes, shuffling, collate, manifest validation."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ppcl.data.cache import CacheDataset, LatentCache, collate, iter_cache_batches
from ppcl.errors import PPCLError


def make_cache(root: Path, shard_sizes: list[int], *, row_group: int = 3, variable_t: bool = False) -> list[str]:
    """A cache in the documented on-disk format; latents of sample k are filled with k."""
    root.mkdir(parents=True)
    keys, shards, k = [], [], 0
    for s, n in enumerate(shard_sizes):
        name = f"shard-{s:05d}-of-{len(shard_sizes):05d}.parquet"
        cols = {"key": [], "latents": [], "latents.shape": [], "prompt_embeds": [], "prompt_embeds.shape": [],
                "mask": [], "mask.shape": []}  # fmt: skip
        for _ in range(n):
            t = 2 + k % 3 if variable_t else 4
            cols["key"].append(f"sample-{k:04d}")
            cols["latents"].append(np.full((2, 4, 4), k, np.float16).tobytes())
            cols["latents.shape"].append([2, 4, 4])
            cols["prompt_embeds"].append(np.full((t, 3), k, np.float16).tobytes())
            cols["prompt_embeds.shape"].append([t, 3])
            cols["mask"].append(np.ones(t, np.int64).tobytes())
            cols["mask.shape"].append([t])
            keys.append(f"sample-{k:04d}")
            k += 1
        pq.write_table(pa.table(cols), root / name, row_group_size=row_group)
        shards.append({"name": name, "samples": n, "bytes": (root / name).stat().st_size, "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()})
    manifest = {
        "version": 1, "kind": "ppcl.latent_cache", "model": "tiny", "family": "flux", "resolution": 32,
        "data": "shards", "samples": k, "shards": shards,
        "tensors": {"latents": {"dtype": "float16", "shape": [2, 4, 4]},
                    "prompt_embeds": {"dtype": "float16", "shape": [-1 if variable_t else 4, 3]},
                    "mask": {"dtype": "int64", "shape": [-1 if variable_t else 4]}},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return keys


def _collect(path, world: int, workers: int, **kw) -> list[list[str]]:
    per_rank = []
    for rank in range(world):
        ds = CacheDataset(path, rank=rank, world_size=world, **kw)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate)
        per_rank.append([k for batch in loader for k in batch["key"]])
    return per_rank


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_workers_two_processes_see_every_sample_once(tmp_path, shuffle):
    keys = make_cache(tmp_path / "c", [7, 5, 6])
    per_rank = _collect(tmp_path / "c", world=2, workers=2, shuffle=shuffle, seed=3)
    counts = Counter(k for r in per_rank for k in r)
    assert set(counts) == set(keys) and set(counts.values()) == {1}
    assert sorted(len(r) for r in per_rank) == [9, 9]  # balanced across processes


def test_rank_from_environment(tmp_path, monkeypatch):
    from accelerate.state import PartialState

    # An accelerate state left by an earlier in-process distillation (world 1) would take precedence over env.
    monkeypatch.setattr(PartialState, "_shared_state", {})
    keys = make_cache(tmp_path / "c", [5, 4])
    seen = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        seen += [row["key"] for row in CacheDataset(tmp_path / "c")]
    assert sorted(seen) == keys


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    keys = make_cache(tmp_path / "c", [8, 8], row_group=4)
    order = lambda **kw: [r["key"] for r in CacheDataset(tmp_path / "c", rank=0, world_size=1, **kw)]  # noqa: E731
    assert order() == keys
    e0 = order(shuffle=True, seed=1, epoch=0)
    assert e0 == order(shuffle=True, seed=1, epoch=0) and sorted(e0) == keys
    assert e0 != keys and e0 != order(shuffle=True, seed=1, epoch=1)


def test_values_and_collate_padding(tmp_path):
    make_cache(tmp_path / "c", [6], variable_t=True)
    batches = list(iter_cache_batches(tmp_path / "c", 4, limit=5))
    assert [len(b["key"]) for b in batches] == [4, 1]
    b = batches[0]
    assert b["latents"].dtype == torch.float32 and b["latents"].shape == (4, 2, 4, 4)
    assert torch.equal(b["latents"][:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert b["prompt_embeds"].shape == (4, 4, 3)  # T = 2, 3, 4, 2 padded to 4
    assert b["mask"].dtype == torch.int64 and b["mask"].sum(1).tolist() == [2, 3, 4, 2]
    assert b["prompt_embeds"][0, 2:].abs().sum() == 0


def test_bad_manifest_is_rejected(tmp_path):
    make_cache(tmp_path / "c", [2])
    m = json.loads((tmp_path / "c/manifest.json").read_text())
    m["version"] = 99
    (tmp_path / "c/manifest.json").write_text(json.dumps(m))
    with pytest.raises(PPCLError, match="manifest.json: invalid cache manifest, field 'version'"):
        LatentCache(tmp_path / "c")
    with pytest.raises(PPCLError, match="not found"):
        LatentCache(tmp_path / "nothing")


def test_cache_on_s3(tmp_path, s3_server, monkeypatch):
    from ppcl import storage

    monkeypatch.delenv("PPCL_S3_ENDPOINT", raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    keys = make_cache(tmp_path / "c", [4, 3])
    bucket = s3_server.make_bucket("cache")
    storage.upload_dir(tmp_path / "c", f"{bucket}/run/cache")
    seen = _collect(f"{bucket}/run/cache", world=2, workers=0)
    assert sorted(seen[0] + seen[1]) == keys


def test_damaged_or_truncated_shard_is_named_before_use(tmp_path):
    make_cache(tmp_path / "c", [4, 5])
    shard = sorted((tmp_path / "c").glob("shard-*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PPCLError, match=r"shard-00001-of-00002\.parquet: sha256 differs from the cache manifest"):
        LatentCache(tmp_path / "c")
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(PPCLError, match=r"shard-00001-of-00002\.parquet: 100 bytes, the cache manifest records"):
        LatentCache(tmp_path / "c")
