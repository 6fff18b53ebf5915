"""`ppcl encode` on a tiny FLUX pipeline: cache contents equal the teacher's own encoders' outputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ppcl.cli import main
from ppcl.data.cache import iter_cache_batches, read_cache_manifest
from ppcl.data.encode import load_image


def _imagefolder(root, n):
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            w, h = (48, 40) if i % 2 else (40, 56)  # non-square: exercises resize + centre crop
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": f"a red circle number {i}"}) + "\n")


@pytest.fixture(scope="module")
def encoded(tiny_pipe_dir, tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("encode")
    _imagefolder(tmp / "src", 10)
    assert main(["shard", "--no-progress", "--source", str(tmp / "src"), "--out", str(tmp / "data"), "--shards", "2"]) == 0
    code = main(["encode", "--no-progress", "--model", str(tiny_pipe_dir["flux"]), "--data", str(tmp / "data"),
                 "--out", str(tmp / "cache"), "--resolution", "32", "--batch-size", "3"])  # fmt: skip
    assert code == 0
    return tmp


def test_cache_matches_teacher_encoders(encoded, tiny_pipe_dir):
    from ppcl.arch import get_adapter, load_pipeline

    m = read_cache_manifest(str(encoded / "cache"))
    assert m.version == 1 and m.samples == 10 and m.resolution == 32 and m.family == "flux"
    assert m.tensors["latents"].dtype == "float16"
    assert {"latents", "prompt_embeds", "pooled_prompt_embeds"} <= set(m.tensors)
    # Same shard names and keys as the data shards.
    for s in m.shards:
        data_keys = pq.read_table(encoded / "data" / s.name, columns=["key"]).column("key").to_pylist()
        cache_keys = pq.read_table(encoded / "cache" / s.name, columns=["key"]).column("key").to_pylist()
        assert data_keys == cache_keys and s.samples == len(cache_keys)

    batch = next(iter_cache_batches(str(encoded / "cache"), 4))
    pipe = load_pipeline(tiny_pipe_dir["flux"], device="cpu")
    adapter = get_adapter(pipe)
    row = {r["key"]: r for r in pq.read_table(encoded / "data" / m.shards[0].name).to_pylist()}
    key = batch["key"][0]
    pixels = torch.from_numpy(load_image(row[key]["image"], 32))[None]
    with torch.inference_mode():
        latents = adapter.encode_images(pipe, pixels)[0].float()
        text = adapter.encode_prompts(pipe, [row[key]["caption"]])
    assert batch["latents"].shape[1:] == latents.shape == tuple(m.tensors["latents"].shape)
    torch.testing.assert_close(batch["latents"][0], latents, atol=2e-2, rtol=1e-2)  # float16 storage
    torch.testing.assert_close(batch["pooled_prompt_embeds"][0], text["pooled_prompt_embeds"][0].float(),
                               atol=2e-2, rtol=1e-2)  # fmt: skip


def test_load_image_resizes_shorter_side_and_centre_crops():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # a white centre band, exactly the centre crop after resizing 20 -> 10
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    x = load_image(buf.getvalue(), 10)
    assert x.shape == (3, 10, 10) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[:, :, 2:8].mean() > 0.95  # centre is the white band


def test_bad_resolution_is_one_line_error(encoded, tiny_pipe_dir, capsys):
    code = main(["encode", "--no-progress", "--model", str(tiny_pipe_dir["flux"]), "--data", str(encoded / "data"),
                 "--out", str(encoded / "bad"), "--resolution", "30"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resolution 30" in err
    assert not (encoded / "bad" / "manifest.json").exists()
