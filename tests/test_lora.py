"""``ppcl lora remap`` / ``ppcl lora transfer`` (issue 17): a teacher LoRA on a pruned model.

Remap is checked by WEIGHT IDENTITY through the stock loader: the teacher LoRA loaded on the teacher and the
remapped LoRA loaded on the pruned export (both with diffusers' ``load_lora_weights``) put adapters on exactly the
same teacher weights, with the same delta, and on nothing else (no adapter on a plug or on a block that took a
removed block's index). Transfer is checked on the shipped reference teacher against teacher+LoRA.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ppcl.arch import get_adapter, load_pipeline
from ppcl.cli import main
from ppcl.distill import distill
from ppcl.export import export
from ppcl.lineage import read_lineage
from ppcl.lora import delta_norm2, remap
from ppcl.plan import make_plan, save_plan

torch.set_num_threads(1)

#: depth intervals per family (tiny models: 10 blocks; FLUX 4 dual + 6 single): kept blocks move, plugs appear
INTERVALS = {"flux": [[1, 2], [5, 8]], "sd3": [[1, 2], [5, 7]], "qwenimage": [[2, 4], [6, 7]]}
#: every linear a LoRA usually adapts, in the blocks of each family, plus the top-level proj_out (outside the
#: blocks: it must pass through, and it must not spread to the single blocks' own proj_out)
TARGETS = {
    "flux": r"(.*blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|to_add_out)|proj_out|proj_mlp|ff\.net\.2"
            r"|norm1\.linear)|proj_out)",
    "sd3": r"(.*blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_k_proj)|ff\.net\.2|norm1\.linear)|proj_out)",
    "qwenimage": r"(.*blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_v_proj)|img_mlp\.net\.2|txt_mod\.1)"
                 r"|proj_out)",
}


def _pipeline_class(pipe):
    return type(pipe)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family or "reference" -> (teacher dir, pruned export dir), made on first use (2 distill steps: the plugs'
    quality does not matter here, only where every block comes from)."""
    root = tmp_path_factory.mktemp("lora_exports")
    cache = {}

    def get(family, teacher_dir, intervals):
        if family not in cache:
            plan = save_plan(make_plan(get_adapter(load_pipeline(teacher_dir)), intervals), root / f"{family}.json")
            run = root / f"run-{family}"
            distill(str(teacher_dir), plan, run, steps=2, lr=1e-3, warmup_steps=1, n_samples=2, batch_size=2,
                    resolution=32, progress=False, mixed_precision="no", use_8bit_adam=False)
            out = root / f"pruned-{family}"
            export(teacher_dir, plan, run, out, all_intervals=True)
            cache[family] = (teacher_dir, out)
        return cache[family]

    return get


def make_lora(teacher_dir, family, path, seed=0):
    """A random LoRA (rank 4, alpha 8: scale 2; A and B both random) on the teacher, saved by the family's
    pipeline class with its adapter config, as a user's training script does."""
    pipe = load_pipeline(teacher_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False)
    pipe.transformer.add_adapter(cfg)
    _pipeline_class(pipe).save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                            transformer_lora_adapter_metadata=cfg.to_dict())
    return path / "pytorch_lora_weights.safetensors"


def lora_layers(pipe, lora, name="x"):
    """module path -> peft layer of ``pipe``'s transformer after the stock ``load_lora_weights(lora)``."""
    pipe.load_lora_weights(lora if isinstance(lora, dict) else str(lora), adapter_name=name)
    return {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, BaseTunerLayer)}


def check_landing(teacher_dir, pruned, teacher_lora, student_lora, report=None):
    """Every adapter the remapped LoRA puts on the student sits on the weights of the teacher block whose LoRA it
    is, with the same delta; none lands anywhere else; what was dropped is exactly the removed blocks' share."""
    lin = read_lineage(pruned)
    t = lora_layers(load_pipeline(teacher_dir), teacher_lora)
    s = lora_layers(load_pipeline(pruned), student_lora)
    to_student = {f"{b.teacher_list}.{b.teacher_index}.": f"{b.student_list}.{b.student_index}."
                  for b in lin.blocks if b.kind == "kept"}
    lists = {bl.name for bl in lin.teacher.lists}
    expected, removed = {}, []
    for name in t:
        head = ".".join(name.split(".")[:2]) + "."
        if name.split(".")[0] not in lists:
            expected[name] = name  # outside the blocks: unchanged
        elif head in to_student:
            expected[to_student[head] + name[len(head):]] = name
        else:
            removed.append(name)
    assert removed and len(expected) > len(removed) // 2
    assert set(s) == set(expected)  # nothing on a plug, nothing on a block that took a removed block's index
    for sname, tname in expected.items():
        assert torch.equal(s[sname].base_layer.weight, t[tname].base_layer.weight), (sname, tname)
        torch.testing.assert_close(s[sname].get_delta_weight("x"), t[tname].get_delta_weight("x"),
                                   rtol=0, atol=1e-7, msg=f"{sname} <- {tname}")
    if report is not None:
        norm = {n: float(t[n].get_delta_weight("x").detach().double().pow(2).sum()) for n in t}
        assert report.dropped_share == pytest.approx(sum(norm[n] for n in removed) / sum(norm.values()), rel=1e-4)
        assert {d.module.removeprefix("transformer.") for d in report.dropped} == set(removed)
    return lin


def test_remap_lands_on_the_same_teacher_weights(family, tiny_pipe_dir, exports, tmp_path, capsys):
    teacher_dir, pruned = exports(family, tiny_pipe_dir[family], INTERVALS[family])
    lora = make_lora(teacher_dir, family, tmp_path / "teacher-lora")
    # the CLI, as a user runs it (the report lists what was dropped)
    out = tmp_path / "student.safetensors"
    assert main(["lora", "remap", "--lora", str(lora), "--model", str(pruned), "--out", str(out),
                 "--json", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    report = remap(lora, pruned, tmp_path / "again.safetensors")
    assert load_file(str(out)).keys() == load_file(str(tmp_path / "again.safetensors")).keys()
    lin = check_landing(teacher_dir, pruned, lora, out, report)
    for b in lin.blocks:
        if b.kind == "plug":
            assert f"no LoRA on {b.student_list}.{b.student_index} (plug of teacher blocks" in printed
    assert f"{report.dropped_share:.1%} of the LoRA" in printed and 0 < report.dropped_share < 1
    assert json.loads((tmp_path / "report.json").read_text())["dropped_share_of_norm"] == report.dropped_share
    # the same file again: its own output is replaced; another file is refused without --overwrite
    assert main(["lora", "remap", "--lora", str(lora), "--model", str(pruned), "--out", str(out)]) == 0
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    assert main(["lora", "remap", "--lora", str(lora), "--model", str(pruned), "--out", str(other)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def _kohya(shapes, family, rank=2, seed=0):
    """A kohya-style LoRA with alphas, on modules whose diffusers conversion works at any width (FLUX: the fused
    qkv of dual blocks, the single blocks' linear2 and modulation; Qwen-Image: the attention projections)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, out_f, in_f):
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(float(rank * 3))

    if family == "flux":
        for i in range(4):
            o, n = shapes[f"transformer_blocks.{i}.attn.to_q.weight"]
            add(f"lora_unet_double_blocks_{i}_img_attn_qkv", 3 * o, n)
            add(f"lora_unet_double_blocks_{i}_img_attn_proj", *shapes[f"transformer_blocks.{i}.attn.to_out.0.weight"])
        for i in range(6):
            add(f"lora_unet_single_blocks_{i}_linear2", *shapes[f"single_transformer_blocks.{i}.proj_out.weight"])
            add(f"lora_unet_single_blocks_{i}_modulation_lin",
                *shapes[f"single_transformer_blocks.{i}.norm.linear.weight"])
    else:
        for i in range(10):
            for m in ("to_q", "to_k", "add_v_proj"):
                add(f"lora_unet_transformer_blocks_{i}_attn_{m}", *shapes[f"transformer_blocks.{i}.attn.{m}.weight"])
    return sd


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_remap_kohya_keys(family, tiny_pipe_dir, exports, tmp_path):
    """kohya-style keys keep their format; loaded through diffusers' own kohya conversion they land as above."""
    teacher_dir, pruned = exports(family, tiny_pipe_dir[family], INTERVALS[family])
    shapes = {k: tuple(v.shape) for k, v in load_pipeline(teacher_dir).transformer.state_dict().items()}
    lora = tmp_path / "kohya.safetensors"
    save_file(_kohya(shapes, family), str(lora))
    out = tmp_path / "student.safetensors"
    report = remap(lora, pruned, out)
    assert report.formats == ["kohya"]
    assert all(k.startswith("lora_unet_") for k in load_file(str(out)))
    check_landing(teacher_dir, pruned, lora, out)
    # the share is computed with each module's alpha / rank (3 here), as kohya's loader scales it
    sd = load_file(str(lora))
    dropped = sum(delta_norm2(sd[f"{d.module}.lora_down.weight"], sd[f"{d.module}.lora_up.weight"], 3.0)
                  for d in report.dropped)
    assert report.dropped_norm2 == pytest.approx(dropped, rel=1e-9)


def test_remap_refuses_another_family_and_block_count(tiny_pipe_dir, exports, tmp_path, capsys):
    teacher_dir, pruned = exports("qwenimage", tiny_pipe_dir["qwenimage"], INTERVALS["qwenimage"])
    flux_lora = make_lora(tiny_pipe_dir["flux"], "flux", tmp_path / "flux-lora")
    out = tmp_path / "x.safetensors"
    cases = [
        (flux_lora, "a LoRA of another model family"),
    ]
    mine = load_file(str(make_lora(teacher_dir, "qwenimage", tmp_path / "qwen-lora")))
    extra = {k.replace("transformer_blocks.9.", "transformer_blocks.12."): v.clone() for k, v in mine.items()
             if "transformer_blocks.9." in k}
    save_file({**mine, **extra}, str(tmp_path / "deeper.safetensors"))
    cases.append((tmp_path / "deeper.safetensors", "the export's teacher has 10 transformer_blocks"))
    wide = {k: torch.cat([v, v], 1) if ".lora_A." in k else v for k, v in mine.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    cases.append((tmp_path / "wide.safetensors", "input features"))
    cases.append((tmp_path / "missing.safetensors", "not found"))
    for lora, message in cases:
        assert main(["lora", "remap", "--lora", str(lora), "--model", str(pruned), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ppcl lora: error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()
    # a teacher (no block map) is not a pruned model
    assert main(["lora", "remap", "--lora", str(flux_lora), "--model", str(tiny_pipe_dir["flux"]),
                 "--out", str(out)]) == 2
    assert "no block map" in capsys.readouterr().err
