"""Tiny random pipelines: they build offline, reload with stock diffusers, draw 64x64 on CPU, and are reproducible."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ppcl.cli import main
from ppcl.errors import PPCLError
from ppcl.arch.tiny import (
    FAMILIES,
    build_tiny_pipeline,
    tiny_transformer,
    tiny_transformer_config,
)

PROMPT = "a red circle above a blue square"
MAX_BYTES = 20 * 1024 * 1024


def _load(path: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path)


def _generate(pipe, prompt: str = PROMPT, seed: int = 0, output_type: str = "pil"):
    return pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    ).images[0]


def _weight_hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*.safetensors"))
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _blocks(transformer) -> list:
    return list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))


def test_families_are_the_three_mmdits():
    assert FAMILIES == ("flux", "sd3", "qwenimage")


def test_pipeline_reloads_and_draws_64px(tiny_pipe_dir, family):
    expected = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "qwenimage": "QwenImagePipeline"}
    t0 = time.perf_counter()
    path = tiny_pipe_dir[family]
    pipe = _load(path)
    image = _generate(pipe)
    elapsed = time.perf_counter() - t0
    assert type(pipe).__name__ == expected[family]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert 0 < _size(path) < MAX_BYTES
    assert elapsed < 60, f"{family}: build + load + generate took {elapsed:.1f}s"

    # Same prompt and seed -> the same pixels; a different prompt changes them (the text reaches the image).
    again = _generate(pipe, output_type="np")
    assert np.isfinite(again).all()
    np.testing.assert_array_equal(np.asarray(image), (again * 255).round().astype(np.uint8))
    other = _generate(pipe, prompt="two green triangles", output_type="np")
    assert np.abs(other - again).max() > 1e-4


def test_tokenizers_give_distinct_ids_to_caption_words(tiny_pipe_dir, family):
    pipe = _load(tiny_pipe_dir[family])
    tokenizers = [getattr(pipe, n) for n in ("tokenizer", "tokenizer_2", "tokenizer_3") if getattr(pipe, n, None)]
    assert tokenizers
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "above", "left", "two"]
    for tok in tokenizers:
        word_ids = [tuple(tok(" " + w, add_special_tokens=False).input_ids) for w in words]
        # Every listed word is one token of its own, and no word falls back to the unknown token.
        assert all(len(ids) == 1 for ids in word_ids), (type(tok).__name__, word_ids)
        assert len(set(word_ids)) == len(words)
        ids = tok(PROMPT, add_special_tokens=False).input_ids
        assert len(ids) == len(PROMPT.split())
        assert tok.unk_token_id not in ids
        # A word outside the list is spelled from smaller pieces rather than mapped to one shared unk.
        zebra = tok(" zebra", add_special_tokens=False).input_ids
        assert len(zebra) > 1 and tok.unk_token_id not in zebra


def test_qwen_template_prefix_is_34_tokens_like_the_real_tokenizer(tiny_pipe_dir):
    pipe = _load(tiny_pipe_dir["qwenimage"])
    prefix = pipe.prompt_template_encode.split("{}")[0]
    ids = pipe.tokenizer(prefix).input_ids
    assert len(ids) == pipe.prompt_template_encode_start_idx == 34
    assert pipe.tokenizer.convert_ids_to_tokens(ids[-3:]) == ["<|im_start|>", "user", "Ċ"]


def test_same_seed_gives_identical_weights_other_seed_differs(tiny_pipe_dir, family, tmp_path):
    reference = _weight_hashes(tiny_pipe_dir[family])
    same = _weight_hashes(build_tiny_pipeline(family, tmp_path / "same", seed=0))
    other = _weight_hashes(build_tiny_pipeline(family, tmp_path / "other", seed=1))
    assert len(reference) >= 3  # transformer, vae, at least one text encoder
    assert same == reference
    assert other.keys() == reference.keys()
    assert all(other[k] != reference[k] for k in reference)


def test_build_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_transformer("flux", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_transformer_shapes(tiny_pipe_dir):
    from diffusers import DiffusionPipeline

    flux = DiffusionPipeline.from_pretrained(tiny_pipe_dir["flux"]).transformer
    assert len(flux.transformer_blocks) > 0 and len(flux.single_transformer_blocks) > 0
    assert len(_blocks(flux)) >= 8
    assert flux.config.guidance_embeds  # FLUX.1-dev-like: guidance-distilled

    sd3 = tiny_transformer("sd3")
    assert len(sd3.transformer_blocks) >= 8
    dual = [i for i, b in enumerate(sd3.transformer_blocks) if b.attn2 is not None]
    assert dual == [0, 1]  # SD3.5-like dual attention
    assert sd3.config.qk_norm == "rms_norm"
    assert sd3.transformer_blocks[-1].context_pre_only

    qwen = tiny_transformer("qwenimage")
    assert len(qwen.transformer_blocks) >= 8
    for t in (flux, qwen):  # RoPE axes must cover the head dim exactly
        assert sum(t.config.axes_dims_rope) == t.config.attention_head_dim
    assert not any(tiny_transformer(arch).training for arch in FAMILIES)


def test_transformer_overrides_apply_and_reach_the_saved_pipeline(tmp_path):
    assert tiny_transformer_config("qwenimage", num_layers=12)["num_layers"] == 12
    assert len(tiny_transformer("sd3", num_layers=3).transformer_blocks) == 3
    out = build_tiny_pipeline("flux", tmp_path / "deep", transformer_overrides={"num_single_layers": 9})
    pipe = _load(out)
    assert len(pipe.transformer.single_transformer_blocks) == 9
    assert _generate(pipe).size == (64, 64)


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path):
    with pytest.raises(PPCLError, match=r"^unknown family 'x': expected one of flux, sd3, qwenimage$"):
        tiny_transformer_config("x")
    with pytest.raises(PPCLError, match="unknown family 'SD3'"):
        tiny_transformer("SD3")
    with pytest.raises(PPCLError, match="unknown flux transformer setting"):
        build_tiny_pipeline("flux", tmp_path / "p", transformer_overrides={"num_layer": 2})
    assert not (tmp_path / "p").exists()
    # An existing folder that is not a pipeline is never wiped.
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(PPCLError, match="not a pipeline folder"):
        build_tiny_pipeline("sd3", keep)
    assert (keep / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no temporaries left behind


def test_cli_writes_a_loadable_pipeline(tmp_path, capsys):
    out = tmp_path / "tiny_qwen"
    assert main(["tiny", "--arch", "qwenimage", "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MB" in printed
    assert (out / "model_index.json").is_file()
    assert _weight_hashes(out) == _weight_hashes(build_tiny_pipeline("qwenimage", tmp_path / "api", seed=3))
    # Re-running onto an existing pipeline folder replaces it.
    assert main(["tiny", "--arch", "qwenimage", "--out", str(out), "--seed", "4"]) == 0
    assert _weight_hashes(out) != _weight_hashes(tmp_path / "api")


def test_cli_unknown_family_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["tiny", "--arch", "dalle", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    expected = "ppcl tiny: error: unknown family 'dalle': expected one of flux, sd3, qwenimage"
    assert err.strip().splitlines() == [expected]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
