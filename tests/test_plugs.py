"""Plugs: the loss, least squares from streamed normal equations, width-modified blocks and their classes."""

from __future__ import annotations

import copy

import pytest
import torch

from ppcl.arch import get_adapter
from ppcl.arch.common import ResidualLinear, split_output
from ppcl.errors import PPCLError
from ppcl.plugs import NormalEquations, plug_loss
from ppcl.arch.tiny import tiny_transformer


def test_plug_loss_is_two_minus_two_cos_and_scale_free():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 8)
    assert plug_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert plug_loss(a, -a).item() == pytest.approx(4.0, abs=1e-5)
    assert plug_loss(3.0 * a, a).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(2, 5, 8)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert plug_loss(a, b).item() == pytest.approx((2 - 2 * cos).mean().item(), abs=1e-5)


def test_normal_equations_over_many_batches_recover_the_map():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(6, generator=g, dtype=torch.float64)
    eq = NormalEquations(6)
    for _ in range(10):  # each batch alone is under-determined (4 tokens < 7 unknowns per output)
        x = torch.randn(4, 6, generator=g, dtype=torch.float64)
        eq.update(x, x + x @ W.T + b)
    w_hat, b_hat = eq.solve(ridge=0.0)
    assert torch.allclose(w_hat, W, atol=1e-8) and torch.allclose(b_hat, b, atol=1e-8)
    with pytest.raises(PPCLError):
        NormalEquations(3).solve()


def test_residual_linear_starts_as_identity():
    lin = ResidualLinear(4)
    x = torch.randn(3, 4)
    assert torch.equal(lin(x), x)


@pytest.mark.parametrize("arch", ["flux", "sd3", "qwenimage"])
def test_ffn_linear_block_counts_and_post_attention_state(arch):
    torch.manual_seed(0)
    t = tiny_transformer(arch, seed=0)
    adapter = get_adapter(t)
    op = {"op": "ffn_linear", "block": 1, "stream": "image"}
    removed, added = adapter.width_op_params(op)
    block = copy.deepcopy(adapter.block(1))
    before = sum(p.numel() for p in block.parameters())
    adapter.apply_width_op(block, op)
    assert sum(p.numel() for p in block.parameters()) == before - removed + added
    # With W = 0 the modified block returns the teacher's post-attention image state: the teacher's output minus
    # its gated FFN branch, i.e. it differs from the teacher output, but its text stream is untouched.
    b, c, h, w = 1, t.config.in_channels // (4 if arch != "sd3" else 1), 8, 8
    latents = torch.randn(b, c, h, w)
    text = {"prompt_embeds": torch.randn(b, 6, t.config.joint_attention_dim)}
    if arch in ("flux", "sd3"):
        text["pooled_prompt_embeds"] = torch.randn(b, t.config.pooled_projection_dim)
    inputs = adapter.model_inputs(latents, text, torch.tensor([0.5]))
    with torch.no_grad():
        call0 = adapter.prelude(inputs)
        call1 = adapter.next_call(0, call0, adapter.run_block(0, call0))
        ref = adapter.run_block(1, call1)
        got = split_output(block(**call1.kwargs))
    assert torch.allclose(got["text"], ref["text"], atol=1e-6)
    assert not torch.allclose(got["image"], ref["image"], atol=1e-4)


def test_ffn_linear_refused_where_there_is_no_separate_ffn():
    t = tiny_transformer("flux", seed=0)
    adapter = get_adapter(t)
    single = adapter.num_blocks - 1  # a single-stream block: MLP fused with attention
    with pytest.raises(PPCLError, match="no separate image FFN"):
        adapter.width_op_params({"op": "ffn_linear", "block": single, "stream": "image"})
    sd3 = get_adapter(tiny_transformer("sd3", seed=0))
    with pytest.raises(PPCLError, match="no separate text FFN"):
        sd3.width_op_params({"op": "ffn_linear", "block": sd3.num_blocks - 1, "stream": "text"})


@pytest.mark.parametrize("arch", ["flux", "qwenimage"])
def test_width_transformer_class_round_trips(arch, tmp_path):
    import importlib

    from ppcl.arch.tiny import tiny_transformer_config

    adapter_cls = type(get_adapter(tiny_transformer(arch, seed=0)))
    module = importlib.import_module(adapter_cls.__module__)
    cls = getattr(module, f"PPCL{adapter_cls.transformer_class.__name__}")
    cfg = tiny_transformer_config(arch)
    torch.manual_seed(0)
    model = cls(**cfg, width_ops=[{"op": "ffn_linear", "block": 0, "stream": "text"}])
    model.save_pretrained(tmp_path / "t")
    back = cls.from_pretrained(tmp_path / "t")
    assert back.config.width_ops == [{"op": "ffn_linear", "block": 0, "stream": "text"}]
    assert get_adapter(back).family == arch
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert any(k.startswith("transformer_blocks.0.ppcl_proj.text.") for k in sd)


# ------------------------------------------------------------------------------------------------ text_freeze
def _block_inputs(arch, t, adapter):
    b, c = 1, t.config.in_channels // (4 if arch != "sd3" else 1)
    g = torch.Generator().manual_seed(1)
    text = {"prompt_embeds": torch.randn(b, 6, t.config.joint_attention_dim, generator=g)}
    if arch in ("flux", "sd3"):
        text["pooled_prompt_embeds"] = torch.randn(b, t.config.pooled_projection_dim, generator=g)
    return adapter.model_inputs(torch.randn(b, c, 8, 8, generator=g), text, torch.tensor([0.5]))


@pytest.mark.parametrize("arch", ["flux", "sd3", "qwenimage"])
def test_text_freeze_blocks_are_exact(arch):
    """Blocks a+1..b: counts match (removed, added); the text state passes through unchanged; the image stream is
    exactly the stock block's when its text modulation is block a's (the text joins attention through block a's
    modulated state); block b adds the residual projection."""
    t = tiny_transformer(arch, seed=0)
    adapter = get_adapter(t)
    op = {"op": "text_freeze", "interval": [1, 3]}
    removed, added = adapter.width_op_params(op)
    members = [copy.deepcopy(adapter.block(k)) for k in (2, 3)]
    before = sum(p.numel() for m in members for p in m.parameters())
    adapter.apply_text_freeze(adapter.block(1), members, op)
    assert sum(p.numel() for m in members for p in m.parameters()) == before - removed + added
    assert removed > added > 0
    with torch.no_grad():
        call = adapter.prelude(_block_inputs(arch, t, adapter))
        out = {}
        for k in range(3):
            out = adapter.run_block(k, call)
            if k == 1:
                tau = out["text"]
            if k < 2:
                call = adapter.next_call(k, call, out)
        frozen_call = call.with_streams({"text": tau})  # block 2's teacher call, text = tau
        got = split_output(members[0](**frozen_call.kwargs))
        ref_block = copy.deepcopy(adapter.block(2))
        mod = adapter.text_stream_parts(ref_block)["modulation"]
        ref_block.get_submodule(mod).load_state_dict(adapter.block(1).get_submodule(mod).state_dict())
        ref = split_output(ref_block(**frozen_call.kwargs))
        assert torch.equal(got["text"], tau)
        assert torch.equal(got["image"], ref["image"])
        lin = members[1].ppcl_proj["text"]
        lin.set_solution(torch.eye(tau.shape[-1]), torch.ones(tau.shape[-1]))
        last = split_output(members[1](**frozen_call.kwargs))
        assert torch.allclose(last["text"], 2 * tau + 1, atol=1e-6)


def test_text_freeze_bad_input_is_one_line_error():
    flux = get_adapter(tiny_transformer("flux", seed=0))  # 4 dual blocks then 6 single blocks
    cases = [([2, 5], "block 4 .*has no own text stream"), ([-1, 2], "out of range"), ([1, 10], "out of range"),
             ([2, 2], "needs start < end")]
    for iv, msg in cases:
        with pytest.raises(PPCLError, match=msg) as e:
            flux.width_op_params({"op": "text_freeze", "interval": iv})
        assert "\n" not in str(e.value)
    sd3 = get_adapter(tiny_transformer("sd3", seed=0))  # the last joint block has no text stream of its own
    with pytest.raises(PPCLError, match="no own text stream"):
        sd3.width_op_params({"op": "text_freeze", "interval": [7, sd3.num_blocks - 1]})
    with pytest.raises(PPCLError, match="spans several blocks"):
        flux.apply_width_op(flux.block(1), {"op": "text_freeze", "interval": [0, 2]})


@pytest.mark.parametrize("arch", ["sd3", "qwenimage"])
def test_text_freeze_transformer_class_round_trips(arch, tmp_path):
    import importlib

    from ppcl.arch.tiny import tiny_transformer_config

    adapter_cls = type(get_adapter(tiny_transformer(arch, seed=0)))
    cls = getattr(importlib.import_module(adapter_cls.__module__), f"PPCL{adapter_cls.transformer_class.__name__}")
    ops = [{"op": "text_freeze", "interval": [2, 5]}, {"op": "ffn_linear", "block": 5, "stream": "image"}]
    torch.manual_seed(0)
    model = cls(**tiny_transformer_config(arch), width_ops=ops)
    teacher = tiny_transformer(arch, seed=0)
    stock = get_adapter(teacher)
    removed = sum(stock.width_op_params(op)[0] - stock.width_op_params(op)[1] for op in ops)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in teacher.parameters()) - removed
    model.save_pretrained(tmp_path / "t")
    back = cls.from_pretrained(tmp_path / "t")
    assert back.config.width_ops == ops
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert "transformer_blocks.5.ppcl_proj.text.proj.weight" in sd and "transformer_blocks.3.ppcl_proj.text" not in str(
        list(sd))
