"""Lean teacher loading (issue 15, item 3): the transformer reaches its device in bf16 without a float32 copy on
the host, and a distillation from a latent cache never reads the text encoders or the VAE.

The memory test loads a teacher whose transformer is wide enough for its weights to dominate the process
(tests/rss_load.py, in a process of its own) and compares the peak resident set during the load with the bf16
bytes of the transformer: the lean path stays within 1.3x, the old path (float32 on the host, then a cast) is
about 2x and more."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppcl.arch import load_pipeline, pipeline_components
from ppcl.distill import load_teacher
from ppcl.errors import PPCLError

RSS_SCRIPT = Path(__file__).with_name("rss_load.py")


def wide_flux_teacher(tiny: Path, out: Path, *, heads: int, double: int, single: int) -> Path:
    """A copy of the tiny FLUX pipeline ``tiny`` whose transformer is ``heads`` x 128 wide, stored in bf16
    (random weights: only the bytes matter here)."""
    from diffusers import FluxTransformer2DModel

    shutil.copytree(tiny, out)
    cfg = dict(FluxTransformer2DModel.load_config(tiny / "transformer"))
    cfg.update(num_layers=double, num_single_layers=single, attention_head_dim=128, num_attention_heads=heads,
               axes_dims_rope=[16, 56, 56])
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    shutil.rmtree(out / "transformer")
    model.save_pretrained(out / "transformer")
    return out


def measure(pipe_dir: Path, warm: Path) -> dict[str, dict]:
    """``{"new": ..., "old": ...}`` from tests/rss_load.py (both in one process: one interpreter start)."""
    proc = subprocess.run([sys.executable, str(RSS_SCRIPT), str(pipe_dir), str(warm), "new,old"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        if "error" in r:
            pytest.skip(r["error"])
    return {r["mode"]: r for r in rows}


def test_latent_cache_teacher_loads_transformer_and_scheduler_only(tiny_pipe_dir):
    pipe, adapter = load_teacher(tiny_pipe_dir["qwenimage"], "cpu", torch.bfloat16, encoders=False)
    assert adapter.transformer.dtype == torch.bfloat16
    assert pipe.scheduler is not None and pipe.text_encoder is None and pipe.vae is None and pipe.tokenizer is None
    # the built-in synthetic set needs the encoders: all of them, same device and dtype
    full, _ = load_teacher(tiny_pipe_dir["qwenimage"], "cpu", torch.float32)
    assert full.text_encoder is not None and full.vae is not None and full.transformer.dtype == torch.float32


def test_float32_load_is_the_same_teacher_as_before(tiny_pipe_dir):
    """CPU runs (mixed_precision no) read the same float32 numbers as diffusers' own full load."""
    from diffusers import DiffusionPipeline

    ref = DiffusionPipeline.from_pretrained(tiny_pipe_dir["flux"]).transformer.state_dict()
    _, adapter = load_teacher(tiny_pipe_dir["flux"], "cpu", torch.float32, encoders=False)
    got = adapter.transformer.state_dict()
    assert got.keys() == ref.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]) for k in ref)


def test_transformer_is_read_onto_the_rank_device_in_its_dtype(tiny_pipe_dir, monkeypatch):
    """On a GPU rank the transformer is placed by diffusers' device_map as it is read (no GPU here: the call
    diffusers receives is what is checked)."""
    from diffusers import FluxTransformer2DModel

    from ppcl.arch import _load_transformer

    calls = []
    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained",
                        classmethod(lambda cls, folder, **kw: calls.append((Path(folder), kw)) or "model"))
    folder = tiny_pipe_dir["flux"] / "transformer"
    assert _load_transformer(folder, "diffusers", "FluxTransformer2DModel", device="cuda:3",
                             dtype=torch.bfloat16) == "model"
    _load_transformer(folder, "diffusers", "FluxTransformer2DModel", device="cpu", dtype=torch.float32)
    assert calls == [(folder, {"low_cpu_mem_usage": True, "dtype": torch.bfloat16, "device_map": "cuda:3"}),
                     (folder, {"low_cpu_mem_usage": True, "dtype": torch.float32})]


def test_unknown_component_is_one_line(tiny_pipe_dir):
    assert {"transformer", "scheduler", "vae"} <= set(pipeline_components(tiny_pipe_dir["flux"]))
    with pytest.raises(PPCLError, match=r"model_index.json: no component 'unet' \(components: "):
        load_pipeline(tiny_pipe_dir["flux"], components=("transformer", "unet"))


def test_no_float32_host_copy_of_a_bf16_teacher(tiny_pipe_dir, tmp_path):
    """Peak RSS growth of the load <= 1.3x the transformer's bf16 bytes; the old path, measured the same way,
    exceeds 1.8x (what the bound catches)."""
    teacher = wide_flux_teacher(tiny_pipe_dir["flux"], tmp_path / "wide", heads=8, double=1, single=2)
    m = measure(teacher, tiny_pipe_dir["flux"])
    new, old = m["new"], m["old"]
    size = new["transformer_bf16_bytes"]
    assert size > 100e6, size
    print(f"bf16 transformer {size / 2**20:.0f} MiB: peak RSS growth new {new['growth'] / 2**20:.0f} MiB, "
          f"old {old['growth'] / 2**20:.0f} MiB")
    assert new["growth"] <= 1.3 * size, (new, old)
    assert old["growth"] > 1.8 * size, (new, old)


@pytest.mark.slow
def test_rss_of_a_1gb_teacher_old_vs_new(tiny_pipe_dir, tmp_path):
    """The number of the report (issue 15): a ~1.1 GB bf16 transformer."""
    teacher = wide_flux_teacher(tiny_pipe_dir["flux"], tmp_path / "wide", heads=16, double=2, single=4)
    m = measure(teacher, tiny_pipe_dir["flux"])
    new, old = m["new"], m["old"]
    size = new["transformer_bf16_bytes"]
    print(f"\nbf16 transformer {size / 2**20:.0f} MiB: peak RSS growth of the load: new "
          f"{new['growth'] / 2**20:.0f} MiB ({new['growth'] / size:.2f}x), old {old['growth'] / 2**20:.0f} MiB "
          f"({old['growth'] / size:.2f}x)")
    assert new["growth"] <= 1.3 * size
