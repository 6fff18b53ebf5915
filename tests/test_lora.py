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


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family or "reference" -> (teacher dir, pruned export dir), made on first use (2 distill steps: the plugs'
    quality does not matter here, only where every block comes from)."""
    root = tmp_path_factory.mktemp("lora_exports")
    cache = {}

    def get(family, teacher_dir, intervals, steps=2, data=None):
        if family not in cache:
            plan = save_plan(make_plan(get_adapter(load_pipeline(teacher_dir)), intervals), root / f"{family}.json")
            run = root / f"run-{family}"
            distill(str(teacher_dir), plan, run, data=data, steps=steps, lr=1e-3, warmup_steps=1, n_samples=max(2, steps // 4),
                    batch_size=2, resolution=32, progress=False, mixed_precision="no", use_8bit_adam=False,
                    checkpoint_every=10**6)
            out = root / f"pruned-{family}"
            export(teacher_dir, plan, run, out, all_intervals=True)
            cache[family] = (teacher_dir, out)
        return cache[family]

    return get


def make_lora(teacher_dir, family, path, seed=0, alpha_pattern=None):
    """A random LoRA (rank 4, alpha 8: scale 2; A and B both random) on the teacher, saved by the family's
    pipeline class with its adapter config, as a user's training script does."""
    pipe = load_pipeline(teacher_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False,
                     alpha_pattern=alpha_pattern or {})
    pipe.transformer.add_adapter(cfg)
    type(pipe).save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
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
    # per-module alphas (metadata alpha_pattern) must move with their module: a kept block that moved from teacher
    # index t to student index s gets alpha 16; teacher block s gets alpha 2, which must NOT reach student block s
    moved = next(b for b in read_lineage(pruned).blocks if b.kind == "kept" and b.teacher_index != b.student_index)
    pattern = {f"{moved.teacher_list}.{moved.teacher_index}.attn.to_q": 16,
               f"{moved.teacher_list}.{moved.student_index}.attn.to_q": 2}
    lora = make_lora(teacher_dir, family, tmp_path / "teacher-lora", alpha_pattern=pattern)
    # the CLI, as a user runs it (the report lists what was dropped)
    out = tmp_path / "student.safetensors"
    assert main(["lora", "remap", "--lora", str(lora), "--model", str(pruned), "--out", str(out),
                 "--json", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    report = remap(lora, pruned, tmp_path / "again.safetensors")
    assert load_file(str(out)).keys() == load_file(str(tmp_path / "again.safetensors")).keys()
    lin = check_landing(teacher_dir, pruned, lora, out, report)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.alpha_pattern"] == {f"{moved.student_list}.{moved.student_index}.attn.to_q": 16}
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


# ------------------------------------------------------------------ the reference teacher: a colour-shift LoRA
#: the LoRA's known effect: every object drawn in the next colour (the caption unchanged)
SHIFT = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "red"}
REFERENCE_INTERVALS = [[2, 3], [8, 13]]  # 6 dual + 10 single -> 5 dual + 5 single, one plug in each list


def _scenes(n, seed):
    from ppcl.data import synth

    return [synth.sample_attributes(np.random.default_rng([seed, i])) for i in range(n)]


@torch.no_grad()
def _batches(pipe, scenes, shifted, batch_size):
    """Cache-shaped batches: latents of the scenes drawn (colours shifted or not) + their captions' text states."""
    from ppcl.bench.teacher import MAX_SEQUENCE_LENGTH, RESOLUTION
    from ppcl.data import synth

    adapter, out = get_adapter(pipe), []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i:i + batch_size]
        drawn = []
        for a in chunk:
            b = copy.deepcopy(a)
            for o in b["objects"]:
                o["colour"] = SHIFT[o["colour"]] if shifted else o["colour"]
            drawn.append(np.asarray(synth.render(b, RESOLUTION)))
        pixels = torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2).float() / 127.5 - 1
        text = adapter.encode_prompts(pipe, [synth.caption(a) for a in chunk], max_sequence_length=MAX_SEQUENCE_LENGTH)
        out.append({"latents": adapter.encode_images(pipe, pixels).float(), **text})
    return out


def train_colour_lora(teacher_dir, path, steps, batch_size=16, lr=3e-3, seed=0):
    """A rank-8 LoRA on every block of the reference teacher, trained (rectified flow, as the teacher was) on
    synth scenes drawn with SHIFTED colours under their unchanged captions: "a red circle" -> a blue circle."""
    from diffusers import FluxPipeline

    from ppcl.calibration import noise_batch

    pipe = load_pipeline(teacher_dir)
    adapter = get_adapter(pipe)
    data = _batches(pipe, _scenes(8 * batch_size, seed + 7), shifted=True, batch_size=batch_size)
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=r".*blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|"
                     r"add_k_proj|add_v_proj|to_add_out)|proj_out|proj_mlp|ff\.net\.2|ff_context\.net\.2)")
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(cfg)
    params = [p for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        nb = noise_batch(adapter, dict(pipe.scheduler.config), data[step % len(data)], scheme="logit_normal",
                         generator=g)
        loss = (adapter.forward(nb.model_inputs).float() - nb.target.float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    return path / "pytorch_lora_weights.safetensors"


class ColourEval:
    """Single-object prompts (4 colours x 3 shapes, ``seeds`` seeds each) generated by the stock pipeline call;
    scored by the judge's colour head against the SHIFTED colour, and by latent PSNR against teacher+LoRA."""

    def __init__(self, teacher_dir, lora, seeds, steps):
        from ppcl.data import synth

        self.prompts = [f"a {c} {s}" for _ in range(seeds) for c in synth.COLOUR_NAMES for s in synth.SHAPES]
        self.shifted = []
        for p in self.prompts:
            a = synth.parse_caption(p)
            a["colours"] = [SHIFT[c] for c in a["colours"]]
            self.shifted.append(a)
        self.steps = steps
        teacher = load_pipeline(teacher_dir)
        teacher.load_lora_weights(str(lora))
        self.teacher_pipe = teacher
        self.reference = None
        self.reference, self.teacher = self(teacher)

    def __call__(self, pipe):
        from ppcl.bench.judge import judge_scores
        from ppcl.evaluate.fidelity import fidelity
        from ppcl.evaluate.generate import Sample, generate

        samples = [Sample(i, i, p, i) for i, p in enumerate(self.prompts)]
        latents, images = generate(pipe, get_adapter(pipe), samples, steps=self.steps, height=32, width=32,
                                   guidance=3.0, max_sequence_length=16)
        scores = {"shifted_colour_accuracy": judge_scores(images, self.shifted)["per_head"]["colour_a"]}
        if self.reference is not None:
            scores["latent_psnr_db"] = fidelity(self.reference, latents).latent_psnr_db
        return latents, scores

    def score(self, model, lora, heldout=None):
        pipe = load_pipeline(model)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        scores = self(pipe)[1]
        if heldout is not None:
            scores["output_mse"] = output_mse(self.teacher_pipe, pipe, heldout)
        return scores


@torch.no_grad()
def output_mse(teacher, student, batches):
    """Mean squared difference of the two models' outputs (velocities) on held-out batches noised with fixed
    seeds: the distance to teacher+LoRA that transfer minimises, measured on data it never saw."""
    from ppcl.calibration import noise_batch

    adapter, total = get_adapter(teacher), 0.0
    for j, b in enumerate(batches):
        inputs = noise_batch(adapter, dict(teacher.scheduler.config), b, scheme="uniform",
                             generator=torch.Generator().manual_seed(1000 + j)).model_inputs
        total += float((teacher.transformer(**inputs, return_dict=False)[0]
                        - student.transformer(**inputs, return_dict=False)[0]).pow(2).mean())
    return total / len(batches)


def remap_vs_transfer(exports, tmp_path, *, distill_steps, lora_steps, transfer_steps, seeds, gen_steps,
                      transfer_lr=1e-3):
    """Everything the comparison needs: pruned reference teacher, colour LoRA, remap, transfer, scores."""
    from ppcl.bench import REFERENCE_TEACHER
    from ppcl.lora import TransferSettings, transfer

    data = _batches(load_pipeline(REFERENCE_TEACHER), _scenes(64, 11), shifted=False, batch_size=8)
    teacher_dir, pruned = exports("reference", REFERENCE_TEACHER, REFERENCE_INTERVALS, distill_steps, data)
    lora = train_colour_lora(teacher_dir, tmp_path / "colour", lora_steps)
    remapped = tmp_path / "remap.safetensors"
    report = remap(lora, pruned, remapped)
    transferred = tmp_path / "transfer.safetensors"
    result = transfer(lora, pruned, transferred, teacher=teacher_dir, data=data,
                      settings=TransferSettings(steps=transfer_steps, lr=transfer_lr), progress=False)
    ev = ColourEval(teacher_dir, lora, seeds, gen_steps)
    heldout = _batches(ev.teacher_pipe, _scenes(32, 99), shifted=False, batch_size=16)
    rows = {"teacher+lora": ev.teacher, "pruned": ev.score(pruned, None, heldout),
            "pruned+remap": ev.score(pruned, remapped, heldout),
            "pruned+transfer": ev.score(pruned, transferred, heldout)}
    return teacher_dir, pruned, lora, remapped, report, result, rows


def test_remap_and_transfer_on_the_reference_teacher(exports, tmp_path):
    """Remap lands by weight identity on the reference teacher too; transfer gets closer to teacher+LoRA than
    remap on both measures: the judged colour shift and the latent PSNR (the margins asserted are what a short run
    reliably shows; the slow benchmark below reports the full numbers)."""
    teacher_dir, pruned, lora, remapped, report, result, rows = remap_vs_transfer(
        exports, tmp_path, distill_steps=2, lora_steps=60, transfer_steps=30, seeds=1, gen_steps=8)
    check_landing(teacher_dir, pruned, lora, remapped, report)
    assert 0.2 < report.dropped_share < 0.6  # 8 of 16 blocks removed
    print(json.dumps(rows, indent=1))
    t, r, x = rows["teacher+lora"], rows["pruned+remap"], rows["pruned+transfer"]
    # the short LoRA shifts some colours on the teacher; the pruned model without it shifts none
    assert t["shifted_colour_accuracy"] >= 0.25 and rows["pruned"]["shifted_colour_accuracy"] < 0.1
    assert result.final_loss < result.first_loss
    # the distance transfer minimises, on held-out inputs: well below the remap's
    assert x["output_mse"] < 0.8 * r["output_mse"] < 0.8 * rows["pruned"]["output_mse"]
    # generation (12 prompts, 8 steps: too few for a margin): no worse than the remap's
    assert x["shifted_colour_accuracy"] >= r["shifted_colour_accuracy"] - 1 / 12


@pytest.mark.slow
def test_benchmark_remap_vs_transfer(exports, tmp_path):
    """The measured comparison (numbers in the report / README): a better-trained pruned model and LoRA, 200
    transfer steps, 48 prompts at 20 steps."""
    *_, report, result, rows = remap_vs_transfer(exports, tmp_path, distill_steps=200, lora_steps=200,
                                                 transfer_steps=200, seeds=4, gen_steps=20)
    print(json.dumps({"dropped_share": report.dropped_share, "transfer_loss": [result.first_loss, result.final_loss],
                      **rows}, indent=1))
    assert rows["pruned+transfer"]["latent_psnr_db"] > rows["pruned+remap"]["latent_psnr_db"]
    assert rows["pruned+transfer"]["shifted_colour_accuracy"] >= rows["pruned+remap"]["shifted_colour_accuracy"]
