"""The streaming similarity probe: CKA properties, exact streaming, identity/linear blocks, probe.json, CLI errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ppcl.arch import get_adapter
from ppcl.cli import main
from ppcl.probe import (
    ProbeAccumulator,
    cka_from_moments,
    linear_cka,
    load_probe,
    probe_transformer,
    residual_probe,
)
from ppcl.arch.tiny import tiny_transformer, tiny_transformer_config

SCHED = {"shift": 3.0}


def random_batches(arch: str, n: int = 4, b: int = 2, hw: int = 8, text_len: int = 6, seed: int = 0):
    """Cache-shaped batches for the tiny transformer of ``arch`` (random latents and text states)."""
    cfg = tiny_transformer_config(arch)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(0, n, b):
        batch = {"latents": torch.randn(b, 16, hw, hw, generator=g),
                 "prompt_embeds": torch.randn(b, text_len, cfg["joint_attention_dim"], generator=g)}
        if "pooled_projection_dim" in cfg:
            batch["pooled_prompt_embeds"] = torch.randn(b, cfg["pooled_projection_dim"], generator=g)
        else:
            batch["prompt_embeds_mask"] = torch.ones(b, text_len, dtype=torch.long)
        out.append(batch)
    return out


def _moments(x, y):
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return x.T @ x, y.T @ y, y.T @ x


# ------------------------------------------------------------------------------------------- CKA itself
def test_cka_of_itself_is_one_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=g, dtype=torch.float64) + 3.0
    y = x @ torch.randn(24, 24, generator=g, dtype=torch.float64) + torch.randn(500, 24, generator=g,
                                                                                dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_from_moments(*_moments(x, x)) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    assert 0.05 < base < 0.999
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, y @ q) == pytest.approx(base, abs=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert cka_from_moments(*_moments(x @ q * 3, y)) == pytest.approx(base, abs=1e-10)


def test_residual_probe_of_exactly_linear_map_has_r2_one():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 16, generator=g, dtype=torch.float64)
    y = x @ torch.randn(16, 16, generator=g, dtype=torch.float64) + 2.0
    r2, pcka = residual_probe(*_moments(x, y), ridge=1e-9)
    assert r2 == pytest.approx(1.0, abs=1e-7)
    assert pcka == pytest.approx(1.0, abs=1e-7)
    noise = torch.randn(400, 16, generator=g, dtype=torch.float64)
    r2_noisy, _ = residual_probe(*_moments(x, noise), ridge=1e-9)
    assert r2_noisy < 0.2


# -------------------------------------------------------------------------------- streamed == all at once
def _capture_states(adapter, inputs_list):
    """All states h_0..h_L per stream, rows concatenated over forwards (the all-at-once reference)."""
    states: dict[str, dict[int, list[torch.Tensor]]] = {}

    def on_output(i, call, out):
        if i == 0:
            for s, h in call.streams().items():
                states.setdefault(s, {}).setdefault(0, []).append(h.reshape(-1, h.shape[-1]).detach())
        for s, h in out.items():
            states.setdefault(s, {}).setdefault(i + 1, []).append(h.reshape(-1, h.shape[-1]).detach())

    with torch.no_grad(), adapter.hooks(on_output=on_output):
        for inputs in inputs_list:
            adapter.forward(inputs)
    return {s: {t: torch.cat(v) for t, v in d.items()} for s, d in states.items()}


def _inputs(adapter, arch, n, b, seed=0, merge=False):
    """Noised model inputs; ``merge`` concatenates the same samples (and noise) into one forward."""
    from ppcl.calibration import noise_batch

    g = torch.Generator().manual_seed(seed)
    out = []
    batches = random_batches(arch, n=n, b=b, seed=seed)
    if merge:
        batches = [{k: torch.cat([x[k] for x in batches]) for k in batches[0]}]
    for batch in batches:
        sigma = torch.full((batch["latents"].shape[0],), 0.6)
        out.append(noise_batch(adapter, SCHED, batch, sigma=sigma, generator=g).model_inputs)
    return out


@pytest.mark.parametrize("arch", ["qwenimage", "sd3"])
def test_streamed_statistics_equal_all_at_once(arch):
    torch.manual_seed(0)
    adapter = get_adapter(tiny_transformer(arch))
    inputs = _inputs(adapter, arch, n=6, b=2)
    acc = ProbeAccumulator(adapter, probe_dim=0, ridge=1e-4, max_interval=4)
    for inp in inputs:
        acc.observe(inp)
    res = acc.result(family=arch, model="tiny", calibration=dict(source="synthetic", samples=6, batch_size=2,
                                                                   timesteps=1, sigmas=[0.6], seed=0))
    ref = _capture_states(adapter, inputs)
    L = len(res.blocks)
    for block in res.blocks:
        for stream, stats in block.per_stream.items():
            x, y = ref[stream][block.index], ref[stream][block.index + 1]
            assert stats.cka == pytest.approx(linear_cka(x, y), abs=1e-5)
            r2, pcka = residual_probe(*_moments(x, y), ridge=1e-4)
            assert stats.r2 == pytest.approx(r2, abs=1e-5)
            assert stats.probe_cka == pytest.approx(pcka, abs=1e-5)
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=1).mean()
            assert stats.cosine == pytest.approx(float(cos), abs=1e-5)
    # SD3's last block returns no text stream: its statistics are image-only.
    if arch == "sd3":
        assert res.blocks[-1].streams == ["image"]
    # interval probe [1, 3] predicts h_4 from h_1
    iv = res.interval(1, 3)
    for stream, stats in iv.per_stream.items():
        r2, _ = residual_probe(*_moments(ref[stream][1], ref[stream][4]), ridge=1e-4)
        assert stats["r2"] == pytest.approx(r2, abs=1e-5)
    # angular matrix entry (1, 5) = mean arccos(cos)/pi; pairs further apart than max_interval (4) are not
    # kept (their states are released during the forward): None
    c = torch.nn.functional.cosine_similarity(ref["image"][1].double(), ref["image"][5].double(), dim=1)
    assert res.angular["image"][1][5] == pytest.approx(float(torch.arccos(c.clamp(-1, 1)).mean() / math.pi),
                                                       abs=1e-5)
    assert res.angular["image"][5][1] == res.angular["image"][1][5]
    assert res.angular["image"][0][5] is None and res.cosine_matrix["image"][0][5] is None
    # the CKA matrix is L x L with a unit diagonal
    m = res.cka_matrix.matrices["image"]
    assert len(m) == L and all(m[i][i] == pytest.approx(1.0) for i in range(L))
    # batching does not change the streamed result
    acc1 = ProbeAccumulator(adapter, probe_dim=0, ridge=1e-4, max_interval=4)
    for inp in _inputs(adapter, arch, n=6, b=2, merge=True):
        acc1.observe(inp)
    res1 = acc1.result(family=arch, model="tiny", calibration=dict(source="synthetic", samples=6, batch_size=6,
                                                                     timesteps=1, sigmas=[0.6], seed=0))
    for b0, b1 in zip(res.blocks, res1.blocks):
        assert b0.cka == pytest.approx(b1.cka, abs=1e-5)
        assert b0.r2 == pytest.approx(b1.r2, abs=1e-5)


# --------------------------------------------------------------------------------- identity / linear blocks
class IdentityBlock(nn.Module):
    """Returns its inputs: a block that does nothing."""

    def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):
        return encoder_hidden_states, hidden_states


class LinearBlock(nn.Module):
    """An exactly linear (affine) block, one map per stream."""

    def __init__(self, dim):
        super().__init__()
        self.img = nn.Linear(dim, dim)
        self.txt = nn.Linear(dim, dim)

    def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):
        return self.txt(encoder_hidden_states), self.img(hidden_states)


def test_identity_blocks_give_cka_one_and_flat_trend_and_linear_block_gives_r2_one():
    torch.manual_seed(0)
    t = tiny_transformer("qwenimage")
    t.transformer_blocks[3] = IdentityBlock()
    t.transformer_blocks[4] = IdentityBlock()
    t.transformer_blocks[7] = LinearBlock(32)
    adapter = get_adapter(t)
    acc, _ = probe_transformer(adapter, SCHED, random_batches("qwenimage", n=4, b=2), timesteps=2, probe_dim=0,
                               ridge=1e-9)
    res = acc.result(family="qwenimage", model="tiny", calibration=dict(
        source="synthetic", samples=4, batch_size=2, timesteps=2, sigmas=[0.3, 0.7], seed=0))
    for i in (3, 4):
        for stats in res.blocks[i].per_stream.values():
            assert stats.cka == pytest.approx(1.0, abs=1e-9)
            assert stats.cosine == pytest.approx(1.0, abs=1e-6)
            assert stats.r2 == pytest.approx(1.0, abs=1e-9)
    assert res.blocks[3].trend == pytest.approx(0.0, abs=1e-9)  # d_3 = c_4 - c_3, both identity
    for stats in res.blocks[7].per_stream.values():
        assert stats.r2 == pytest.approx(1.0, abs=1e-6)
        assert stats.probe_cka == pytest.approx(1.0, abs=1e-6)
    assert min(s.r2 for s in res.blocks[1].per_stream.values()) < 1 - 1e-6  # a real block is not linear


def test_projection_option_reports_projected_width():
    adapter = get_adapter(tiny_transformer("flux"))
    acc, _ = probe_transformer(adapter, SCHED, random_batches("flux", n=2, b=2), timesteps=1, probe_dim=8)
    res = acc.result(family="flux", model="tiny", calibration=dict(
        source="synthetic", samples=2, batch_size=2, timesteps=1, sigmas=[0.5], seed=0))
    assert res.projection.exact is False and res.projection.dim == 8 and res.projection.model_dim == 32
    assert all(0 <= b.cka <= 1 + 1e-9 for b in res.blocks)
    # FLUX: intervals never cross the dual/single boundary (4 dual then 6 single blocks)
    assert all(res.blocks[iv.start].kind == res.blocks[iv.end].kind for iv in res.intervals)
    assert not any(iv.start <= 3 < iv.end for iv in res.intervals)


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_probe_writes_probe_json_and_plots(tiny_pipe_dir, tmp_path):
    out = tmp_path / "probe"
    rc = main(["probe", "--model", str(tiny_pipe_dir["sd3"]), "--out", str(out), "--samples", "4",
               "--timesteps", "2", "--batch-size", "2", "--resolution", "64"])
    assert rc == 0
    assert (out / "cka_heatmap.png").stat().st_size > 1000 and (out / "trend.png").stat().st_size > 1000
    data = json.loads((out / "probe.json").read_text())
    assert data["version"] == 1 and data["family"] == "sd3" and len(data["blocks"]) == 10
    assert data["cka_matrix"]["estimator"] == "minibatch_unbiased_hsic_linear"
    assert data["calibration"]["forwards"] == 4 and len(data["calibration"]["sigmas"]) == 2
    # SD3's last block is initialised from itself whatever the mode: recorded for model-free selection
    assert [0, 9, "middle", 9] in data["plug_source_exceptions"]
    res = load_probe(out / "probe.json")
    assert res.blocks[-1].kind == "dual" and res.blocks[0].params > 0


def test_cli_probe_bad_input(tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model path not found" in err
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "family": "flux"}))
    with pytest.raises(Exception, match="invalid probe file"):
        load_probe(bad)


# ------------------------------------------------------------------------------ width rule, bf16 teacher
def test_auto_probe_dim_is_largest_multiple_of_64_that_fits_qwen_image():
    from ppcl.probe import DEFAULT_MAX_MOMENT_BYTES, choose_probe_dim, moment_bytes

    kinds, budget = ["dual"] * 60, DEFAULT_MAX_MOMENT_BYTES  # Qwen-Image: 60 blocks of width 3072, 4 GiB
    k = choose_probe_dim(3072, 60, kinds, 12, "auto", budget)
    assert k == 576 and k % 64 == 0
    assert moment_bytes(60, kinds, k, 12) <= budget < moment_bytes(60, kinds, k + 64, 12)
    assert choose_probe_dim(3072, 60, kinds, 12, "auto", 2**60) == 3072  # exact when it fits
    assert choose_probe_dim(3072, 60, kinds, 12, "auto", 1) == 64  # the floor


def test_bf16_teacher_statistics_accumulate_in_float64_and_match_fp32():
    torch.manual_seed(0)
    t = tiny_transformer("qwenimage")
    batches = random_batches("qwenimage", n=4, b=2)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        adapter = get_adapter(t.to(dtype))
        acc, _ = probe_transformer(adapter, SCHED, batches, timesteps=2, probe_dim=0, max_interval=4)
        assert all(g.dtype == torch.float64 for g in acc.banks["image"].gram)
        results[dtype] = acc.result(family="qwenimage", model="tiny", calibration=dict(
            source="synthetic", samples=4, batch_size=2, timesteps=2, sigmas=[0.3, 0.7], seed=0))
    for b32, b16 in zip(results[torch.float32].blocks, results[torch.bfloat16].blocks):
        assert b16.cka == pytest.approx(b32.cka, abs=0.02)
        assert b16.cosine == pytest.approx(b32.cosine, abs=0.02)


def test_probe_device_auto_is_cpu_float32_without_gpu_and_cuda_refused():
    from ppcl.errors import PPCLError
    from ppcl.probe import probe_device

    if torch.cuda.is_available():
        assert probe_device() == ("cuda", torch.bfloat16)
    else:
        assert probe_device() == ("cpu", torch.float32)
        with pytest.raises(PPCLError, match="'device' is cuda but no CUDA GPU"):
            probe_device("cuda")
    assert probe_device("cpu", "bfloat16") == ("cpu", torch.bfloat16)
