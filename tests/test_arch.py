"""The adapter protocol on all three families: stepping block by block reproduces the stock forward exactly."""

import pytest
import torch

from ppcl.arch import adapter_for, count_parameters, get_adapter
from ppcl.calibration import noise_batch, sample_sigmas
from ppcl.errors import PPCLError
from ppcl.arch.tiny import FAMILIES, tiny_transformer


def _batch(adapter, b=2, h=8, w=8):
    g = torch.Generator().manual_seed(0)
    cfg = adapter.transformer.config
    c = cfg.in_channels // 4 if adapter.family != "sd3" else cfg.in_channels
    latents = torch.randn(b, c, h, w, generator=g)
    d = cfg.joint_attention_dim
    batch = {"latents": latents, "prompt_embeds": torch.randn(b, 7, d, generator=g)}
    if "pooled_projection_dim" in cfg:
        batch["pooled_prompt_embeds"] = torch.randn(b, cfg.pooled_projection_dim, generator=g)
    else:
        batch["prompt_embeds_mask"] = torch.ones(b, 7, dtype=torch.long)
    return batch


@pytest.fixture(params=FAMILIES)
def adapter(request):
    return get_adapter(tiny_transformer(request.param, seed=0))


def test_detects_family_and_counts_blocks_exactly(adapter):
    blocks = adapter.blocks()
    assert len(blocks) == adapter.num_blocks >= 8
    assert [b.index for b in blocks] == list(range(len(blocks)))
    block_total = sum(b.params for b in blocks)
    assert block_total == sum(count_parameters(adapter.block(i)) for i in range(len(blocks)))
    assert block_total < adapter.total_parameters()
    kinds = [b.kind for b in blocks]
    # kinds form contiguous groups in execution order (FLUX: dual then single)
    order = [kind for _, kind in adapter.block_lists]
    assert kinds == sorted(kinds, key=order.index)


def test_block_by_block_equals_stock_forward(adapter):
    batch = _batch(adapter)
    noised = noise_batch(adapter, {"shift": 1.0}, batch, sigma=torch.tensor([0.25, 0.8]),
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = adapter.forward(noised.model_inputs)
        call = adapter.prelude(noised.model_inputs)
        for i in range(adapter.num_blocks):
            out = adapter.run_block(i, call)
            if i + 1 < adapter.num_blocks:
                call = adapter.next_call(i, call, out)
        y = adapter.head(out, call, noised.model_inputs)
    assert y.shape == ref.shape == noised.target.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_hooks_observe_every_block_and_can_substitute(adapter):
    batch = _batch(adapter)
    noised = noise_batch(adapter, {"shift": 1.0}, batch, generator=torch.Generator().manual_seed(2))
    seen = []
    with torch.no_grad():
        ref = adapter.forward(noised.model_inputs)
        with adapter.hooks(on_output=lambda i, call, out: seen.append((i, tuple(sorted(out))))):
            again = adapter.forward(noised.model_inputs)
        torch.testing.assert_close(again, ref, rtol=0, atol=0)
        assert [i for i, _ in seen] == list(range(adapter.num_blocks))
        # replacing block 1 by the identity changes the output; a hook returning None changes nothing
        with adapter.hooks(on_output=lambda i, call, out: call.streams() if i == 1 else None):
            skipped = adapter.forward(noised.model_inputs)
    assert not torch.allclose(skipped, ref)


def test_sd3_last_block_has_no_text_stream_and_plugs_from_it():
    a = get_adapter(tiny_transformer("sd3", seed=0))
    last = a.blocks()[-1]
    assert last.streams == ("image",)
    assert a.plug_source(last.index - 3, last.index) == last.index
    assert a.plug_source(1, 4) == 2


def test_pruned_config_counts_layers():
    a = get_adapter(tiny_transformer("sd3", seed=0))
    dual = set(a.transformer.config.dual_attention_layers)
    cfg = a.pruned_config({"transformer_blocks": [0, 2, 3, a.num_blocks - 1]})
    assert cfg["num_layers"] == 4
    assert cfg["dual_attention_layers"] == tuple(j for j, s in enumerate([0, 2, 3, a.num_blocks - 1]) if s in dual)


def test_unknown_family_and_unsupported_model():
    with pytest.raises(PPCLError, match="unknown family 'dit'"):
        adapter_for("dit")
    with pytest.raises(PPCLError, match="unsupported transformer class Linear"):
        get_adapter(torch.nn.Linear(2, 2))


def test_sigmas():
    g = torch.Generator().manual_seed(0)
    for scheme in ("uniform", "logit_normal"):
        s = sample_sigmas(1000, scheme, g)
        assert s.min() > 0 and s.max() < 1 and abs(s.mean().item() - 0.5) < 0.05
    with pytest.raises(PPCLError, match="unknown timestep sampling"):
        sample_sigmas(3, "cosine")
