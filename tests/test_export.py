"""Export: real smaller models from one distill run; exact counts; stock loading; closer to the teacher than
simply dropping the blocks; bad input fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ppcl.arch import get_adapter, load_pipeline
from ppcl.cli import main
from ppcl.distill import distill
from ppcl.export import export
from ppcl.plan import load_plan, make_plan, predict_params, save_plan
from ppcl.plugs import StudentView

torch.set_num_threads(1)

INTERVALS = {"flux": [[1, 2], [5, 8]], "sd3": [[1, 2], [6, 8]], "qwenimage": [[1, 2], [4, 5], [6, 8]]}
WIDTH = {"flux": [{"op": "ffn_linear", "block": 3, "stream": "text"}],
         "sd3": [{"op": "ffn_linear", "block": 4, "stream": "image"}],
         "qwenimage": [{"op": "ffn_linear", "block": 3, "stream": "image"}]}


@pytest.fixture(scope="module")
def runs(tiny_pipe_dir, tmp_path_factory):
    """family -> (pipe_dir, depth plan, depth run, width plan, width run), trained lazily."""
    root = tmp_path_factory.mktemp("export_runs")
    cache = {}

    def get(family, width=False):
        key = (family, width)
        if key not in cache:
            pipe_dir = tiny_pipe_dir[family]
            adapter = get_adapter(load_pipeline(pipe_dir))
            plan = make_plan(adapter, INTERVALS[family], width=WIDTH[family] if width else [])
            path = save_plan(plan, root / f"{family}-{width}.json")
            run = root / f"run-{family}-{width}"
            distill(str(pipe_dir), path, run, steps=15, lr=2e-3, warmup_steps=2, n_samples=8, progress=False)
            cache[key] = (pipe_dir, path, run)
        return cache[key]

    return get


def _latents(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red circle above a blue square", num_inference_steps=3, height=64, width=64, generator=g,
                output_type="latent").images


def _in_memory_export(pipe_dir, plan_path, run, chosen):
    """The oracle: today's in-memory export (the fp32 teacher and every plug loaded as modules, the pruned model
    assembled from the modules placed by ``student_layout``, :func:`ppcl.export.build_pruned_transformer`)."""
    from ppcl.distill import build_units, load_unit_weights, student_layout
    from ppcl.export import build_pruned_transformer, student_width_ops

    adapter = get_adapter(load_pipeline(pipe_dir, dtype=torch.float32))
    init = json.loads((run / "run.json").read_text()).get("settings", {}).get("init")
    units = build_units(adapter, load_plan(plan_path), init)
    load_unit_weights(units, run / "plugs.safetensors")
    selected = [u for u in units if u.kind != "interval" or u.index in chosen]
    lists, keep, position = student_layout(adapter, selected)
    return build_pruned_transformer(adapter, selected, student_width_ops(selected, position), lists, keep)


def _stored(folder):
    """Every tensor of a transformer folder's weight files, as stored (not the empty stand-ins of removed stock
    weights that a width export carries, ppcl.custom_code)."""
    from safetensors import safe_open

    from ppcl.width_runtime import REMOVED_WEIGHTS_FILE

    out = {}
    for f in sorted(p for p in folder.glob("*.safetensors") if p.name != REMOVED_WEIGHTS_FILE):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_same_as_in_memory(pipe_dir, plan_path, run, out, chosen, dtype=None):
    """The streamed export ``out`` holds the in-memory export's tensors bit for bit (cast with ``.to(dtype)``: what
    the streamed export does to the fp32 plugs), and the config.json ``save_pretrained`` would write."""
    ref = _in_memory_export(pipe_dir, plan_path, run, chosen)
    got = _stored(out / "transformer")
    want = ref.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        v = v if dtype is None else v.to(dtype)
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    ref.save_config(out / "ref_config")
    assert (out / "transformer" / "config.json").read_text() == (out / "ref_config" / "config.json").read_text()
    return ref


def test_export_all_matches_plan_and_beats_dropping_blocks(family, runs, tmp_path):
    pipe_dir, plan_path, run = runs(family)
    res = export(pipe_dir, plan_path, run, tmp_path / "pruned", all_intervals=True)
    plan = load_plan(plan_path)
    assert_same_as_in_memory(pipe_dir, plan_path, run, tmp_path / "pruned", res.intervals)
    teacher = load_pipeline(pipe_dir)
    assert res.parameters == plan.params.student == predict_params(plan, get_adapter(teacher))["student"]
    pruned = load_pipeline(tmp_path / "pruned")
    assert sum(p.numel() for p in pruned.transformer.parameters()) == res.parameters
    n_removed = sum(e - s for s, e in plan.intervals)
    assert get_adapter(pruned).num_blocks == get_adapter(teacher).num_blocks - n_removed
    ref = _latents(teacher)
    ours = _latents(pruned)
    # Baseline: the same intervals simply removed (no plug), a module-list edit of the teacher.
    adapter = get_adapter(teacher)
    dropped = {name: [] for name, _ in adapter.block_lists}
    gone = {l for s, e in plan.intervals for l in range(s, e + 1)}
    for l in range(adapter.num_blocks):
        if l not in gone:
            dropped[adapter.locate(l)[0]].append(adapter.block(l))
    with StudentView(adapter, dropped):
        base = _latents(teacher)
    assert (ours - ref).pow(2).mean() < (base - ref).pow(2).mean()
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert f"{res.parameters:,}" in card and str(list(plan.intervals[0])) in card


def test_depth_only_export_loads_with_stock_diffusers(runs, tmp_path):
    outs = []
    for family in ("flux", "sd3", "qwenimage"):
        pipe_dir, plan_path, run = runs(family)
        out = tmp_path / family
        export(pipe_dir, plan_path, run, out, intervals=[0, 1])
        assert json.loads((out / "model_index.json").read_text())["transformer"][0] == "diffusers"
        outs.append(str(out))
    code = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline, FluxTransformer2DModel\n"
        "for d in sys.argv[1:]:\n"
        "    p = DiffusionPipeline.from_pretrained(d)\n"
        "    img = p('a cat', num_inference_steps=2, height=64, width=64, output_type='np').images\n"
        "    assert img.shape == (1, 64, 64, 3), img.shape\n"
        "FluxTransformer2DModel.from_pretrained(sys.argv[1] + '/transformer')\n"
        "assert not any(m == 'ppcl' or m.startswith('ppcl.') for m in sys.modules), 'ppcl imported'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *outs], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_subsets_from_one_run_are_monotone_and_generate(runs, tmp_path):
    pipe_dir, plan_path, run = runs("qwenimage", width=True)
    counts = []
    for name, kw in [("a", dict(intervals=[0])), ("b", dict(intervals=[0, 1])), ("c", dict(all_intervals=True))]:
        res = export(pipe_dir, plan_path, run, tmp_path / name, **kw)
        assert res.transformer_class == "PPCLQwenImageTransformer2DModel"
        assert_same_as_in_memory(pipe_dir, plan_path, run, tmp_path / name, res.intervals)
        pipe = load_pipeline(tmp_path / name)
        assert torch.isfinite(_latents(pipe)).all()
        counts.append(res.parameters)
    assert counts[0] > counts[1] > counts[2]
    plan = load_plan(plan_path)
    assert counts[2] == plan.params.student
    # --keep-params picks the subset with the most parameters not above the budget
    teacher = plan.params.teacher
    res = export(pipe_dir, plan_path, run, tmp_path / "k", keep_params=(counts[1] + 1) / teacher)
    assert res.parameters == counts[1]
    idx = json.loads((tmp_path / "k" / "model_index.json").read_text())["transformer"]
    assert idx == ["modeling_ppcl_qwenimage", "PPCLQwenImageTransformer2DModel"]  # custom-code layout


def test_bad_export_inputs_fail_cleanly(runs, tiny_pipe_dir, tmp_path, capsys):
    pipe_dir, plan_path, run = runs("flux")
    out = tmp_path / "out"
    # plugs trained for another plan
    other = make_plan(get_adapter(load_pipeline(pipe_dir)), [[1, 2]])
    other_path = save_plan(other, tmp_path / "other.json")
    cases = [
        ["--model", str(pipe_dir), "--plan", str(other_path), "--plugs", str(run), "--all"],
        # a plan (and plugs) of another model
        ["--model", str(tiny_pipe_dir["sd3"]), "--plan", str(plan_path), "--plugs", str(run), "--all"],
        ["--model", str(pipe_dir), "--plan", str(plan_path), "--plugs", str(run), "--keep-params", "0.01"],
        ["--model", str(pipe_dir), "--plan", str(plan_path), "--plugs", str(run), "--intervals", "7"],
    ]
    for args in cases:
        assert main(["export", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("ppcl export: error:") and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # damaged plugs
    bad_run = tmp_path / "badrun"
    bad_run.mkdir()
    (bad_run / "run.json").write_text((run / "run.json").read_text())
    (bad_run / "plugs.safetensors").write_bytes((run / "plugs.safetensors").read_bytes()[:64])
    assert main(["export", "--model", str(pipe_dir), "--plan", str(plan_path), "--plugs", str(bad_run), "--all",
                 "--out", str(out)]) == 2
    assert "cannot read plugs" in capsys.readouterr().err and not out.exists()


#: per family: depth intervals outside the frozen text interval, the text_freeze, and an ffn_linear on a frozen block
TEXT_FREEZE_PLANS = {
    "flux": ([[5, 8]], [{"op": "text_freeze", "interval": [0, 3]}, {"op": "ffn_linear", "block": 3, "stream": "image"}]),
    "sd3": ([[6, 8]], [{"op": "text_freeze", "interval": [1, 4]}, {"op": "ffn_linear", "block": 4, "stream": "image"}]),
    "qwenimage": ([[1, 2]], [{"op": "text_freeze", "interval": [4, 7]},
                             {"op": "ffn_linear", "block": 5, "stream": "image"}]),
}


def test_text_freeze_export_counts_round_trips_and_generates(family, tiny_pipe_dir, tmp_path):
    pipe_dir = tiny_pipe_dir[family]
    teacher = load_pipeline(pipe_dir)
    adapter = get_adapter(teacher)
    intervals, width = TEXT_FREEZE_PLANS[family]
    plan = make_plan(adapter, intervals, width=width)
    plan_path = save_plan(plan, tmp_path / "plan.json")
    distill(str(pipe_dir), plan_path, tmp_path / "run", steps=4, lr=1e-3, warmup_steps=1, n_samples=4,
            progress=False)
    res = export(pipe_dir, plan_path, tmp_path / "run", tmp_path / "pruned", all_intervals=True)
    # exact accounting: the frozen blocks save more than the depth intervals' plugs alone
    assert res.parameters == plan.params.student == predict_params(plan, adapter)["student"]
    depth_only = predict_params(make_plan(adapter, intervals), adapter)["student"]
    assert res.parameters < depth_only
    pruned = load_pipeline(tmp_path / "pruned")  # PPCL<Class>.from_pretrained, then the stock pipeline class
    assert type(pruned).__name__ == type(teacher).__name__
    assert sum(p.numel() for p in pruned.transformer.parameters()) == res.parameters
    (a, b), shift = width[0]["interval"], sum(e - s for s, e in intervals if e < width[0]["interval"][0])
    assert pruned.transformer.config.width_ops[0] == {"op": "text_freeze", "interval": [a - shift, b - shift]}
    # the exported frozen blocks are the trained ones
    from safetensors.torch import load_file

    plugs = load_file(str(tmp_path / "run" / "plugs.safetensors"))
    key = f"text_freeze_{a}_{b}.{b - a - 1}.ppcl_proj.text.proj.weight"
    got = pruned.transformer.transformer_blocks[b - shift].ppcl_proj["text"].proj.weight
    assert torch.equal(got.float(), plugs[key])
    assert torch.isfinite(_latents(pruned)).all()


# ------------------------------------------------------------------------------ text_freeze x depth intervals
def _student_matches_export(pipe_dir, plan_path, run, pruned_dir, seed=5):
    """The exported transformer computes what the in-memory student (every trained unit in place) computes."""
    from ppcl.calibration import noise_batch, synthetic_batches
    from ppcl.distill import build_units, load_unit_weights, student_layout

    teacher = load_pipeline(pipe_dir)
    adapter = get_adapter(teacher)
    plan = load_plan(plan_path)
    units = build_units(adapter, plan)
    load_unit_weights(units, run / "plugs.safetensors")
    batch = next(iter(synthetic_batches(teacher, n_samples=1, batch_size=1, resolution=32, seed=seed)))
    inputs = noise_batch(adapter, dict(teacher.scheduler.config), batch,
                         generator=torch.Generator().manual_seed(seed)).model_inputs
    lists, _, _ = student_layout(adapter, units)
    with torch.no_grad():
        with StudentView(adapter, lists) as student:
            ref = student.forward(inputs)
        got = get_adapter(load_pipeline(pruned_dir).transformer).forward(inputs)
    return (got - ref).abs().max().item(), ref.abs().max().item()


#: per family: a frozen text interval with depth plugs in every role (last, source, member) and an ffn_linear on a
#: kept frozen block
COMPOSED = {
    # FLUX: 4 dual blocks then 6 single; [2, 3] ends at b = 3 (its plug carries the text projection)
    "flux": ([[2, 3], [5, 8]], [{"op": "text_freeze", "interval": [0, 3]},
                                {"op": "ffn_linear", "block": 1, "stream": "image"}]),
    # SD3: [1, 3] contains a = 2 (a plain plug whose text is distilled to tau), [4, 5] is a frozen plug
    "sd3": ([[1, 3], [4, 5]], [{"op": "text_freeze", "interval": [2, 6]},
                               {"op": "ffn_linear", "block": 6, "stream": "image"}]),
}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_depth_plugs_inside_frozen_text_export_exactly(family, tiny_pipe_dir, tmp_path):
    pipe_dir = tiny_pipe_dir[family]
    adapter = get_adapter(load_pipeline(pipe_dir))
    intervals, width = COMPOSED[family]
    plan = make_plan(adapter, intervals, width=width)
    plan_path = save_plan(plan, tmp_path / "plan.json")
    distill(str(pipe_dir), plan_path, tmp_path / "run", steps=3, lr=1e-3, warmup_steps=1, n_samples=2,
            batch_size=1, resolution=32, lsq_batches=1, progress=False)
    # every subset of plugs (one run serves them all) is exact: the plan's own count for that subset
    counts = {}
    for chosen in ([0, 1], [0], [1], []):
        res = export(pipe_dir, plan_path, tmp_path / "run", tmp_path / f"p{len(counts)}", intervals=chosen)
        assert_same_as_in_memory(pipe_dir, plan_path, tmp_path / "run", tmp_path / f"p{len(counts)}", chosen)
        sub = make_plan(adapter, [intervals[k] for k in chosen], width=width)
        assert res.parameters == sub.params.student == predict_params(sub, adapter)["student"], chosen
        counts[tuple(chosen)] = res.parameters
    assert counts[(0, 1)] == plan.params.student < counts[(0,)] < counts[()] < plan.params.teacher
    diff, scale = _student_matches_export(pipe_dir, plan_path, tmp_path / "run", tmp_path / "p0")
    assert diff <= 1e-5 * max(scale, 1.0), diff
    full = load_pipeline(tmp_path / "p0")
    assert sum(p.numel() for p in full.transformer.parameters()) == plan.params.student
    assert torch.isfinite(_latents(full)).all()
    # the text_freeze lands on the pruned positions of the blocks holding a and b (a plug may hold them)
    frozen = [op for op in full.transformer.config.width_ops if op["op"] == "text_freeze"]
    # FLUX: 0, 1, plug [2, 3] -> [0, 2];  SD3: 0, plug [1, 3], plug [4, 5], 6 -> [1, 3]
    assert frozen == [{"op": "text_freeze", "interval": [0, 2] if family == "flux" else [1, 3]}]


@pytest.fixture(scope="module")
def qwen60_dir(tmp_path_factory):
    from ppcl.arch.tiny import build_tiny_pipeline

    return build_tiny_pipeline("qwenimage", tmp_path_factory.mktemp("qwen60") / "pipe",
                               transformer_overrides={"num_layers": 60})


def test_full_released_qwen_plan_distills_exports_and_generates(qwen60_dir, tmp_path):
    """The authors' released 10B plan, depth and every width op, on a 60-block tiny Qwen-Image."""
    from safetensors.torch import load_file

    from ppcl.distill import build_units

    from ppcl.plan import QWEN_IMAGE_RELEASED_INTERVALS, QWEN_IMAGE_RELEASED_WIDTH

    adapter = get_adapter(load_pipeline(qwen60_dir))
    plan = make_plan(adapter, QWEN_IMAGE_RELEASED_INTERVALS, width=QWEN_IMAGE_RELEASED_WIDTH)
    plan_path = save_plan(plan, tmp_path / "plan.json")
    run = tmp_path / "run"
    distill(str(qwen60_dir), plan_path, run, steps=2, lr=1e-3, warmup_steps=1, n_samples=1, batch_size=1,
            resolution=32, lsq_batches=1, progress=False)
    # one teacher pass trained every unit: each has losses and weights that moved away from their initial copies
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    units = build_units(adapter, plan)
    names = {k.split("/")[0] for k in lines[-1]["losses"]}
    assert names == {u.name for u in units} and len(units) == 13 + 1 + 3
    assert "interval_10/text" not in lines[-1]["losses"]  # [52, 53] inside [50, 59]: its text is tau exactly
    trained = load_file(str(run / "plugs.safetensors"))
    for u in units:
        init = u.module.state_dict()
        assert any(not torch.equal(trained[f"{u.name}.{k}"], v.float()) for k, v in init.items()), u.name
    res = export(qwen60_dir, plan_path, run, tmp_path / "pruned", all_intervals=True)
    assert res.parameters == plan.params.student == predict_params(plan, adapter)["student"]
    assert_same_as_in_memory(qwen60_dir, plan_path, run, tmp_path / "pruned", res.intervals)
    pruned = load_pipeline(tmp_path / "pruned")
    assert sum(p.numel() for p in pruned.transformer.parameters()) == res.parameters
    assert pruned.transformer.config.num_layers == 35
    assert {"op": "text_freeze", "interval": [28, 34]} in pruned.transformer.config.width_ops
    diff, scale = _student_matches_export(qwen60_dir, plan_path, run, tmp_path / "pruned")
    assert diff <= 1e-5 * max(scale, 1.0), diff
    g = torch.Generator().manual_seed(0)
    out = pruned("a red circle", num_inference_steps=2, height=32, width=32, generator=g, output_type="latent")
    assert torch.isfinite(out.images).all()


# ------------------------------------------------------------------------------------------- dtype and shards
def _teacher_copy(pipe_dir, run, where, change, shard_size=None):
    """A copy of the pipeline whose transformer weights are ``change(state dict)`` (in diffusers' shards of
    ``shard_size`` bytes with their index, if given), and a copy of ``run`` whose run.json records it as the teacher
    (the fingerprint recomputed; the plugs are the same file, so plugs_sha256 still holds)."""
    import shutil

    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file, save_file

    from ppcl.integrity import teacher_fingerprint

    teacher = where / "teacher"
    shutil.copytree(pipe_dir, teacher)
    f = teacher / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = change(load_file(str(f)))
    if shard_size is None:
        save_file(sd, str(f), metadata={"format": "pt"})
    else:
        f.unlink()
        save_torch_state_dict(sd, f.parent, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                              max_shard_size=shard_size)
        assert len(list(f.parent.glob("*.safetensors"))) > 2
    new_run = where / "run"
    new_run.mkdir()
    shutil.copy2(run / "plugs.safetensors", new_run / "plugs.safetensors")
    meta = json.loads((run / "run.json").read_text())
    meta["teacher"]["fingerprint"] = teacher_fingerprint(teacher)
    (new_run / "run.json").write_text(json.dumps(meta))
    return teacher, new_run


def _bf16_teacher(pipe_dir, run, tmp_path):
    """Stored in bf16 and sharded, as a real teacher is."""
    (tmp_path / "t16").mkdir()
    return _teacher_copy(pipe_dir, run, tmp_path / "t16", lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()},
                         shard_size=20_000)


def test_bf16_teacher_exports_bf16_in_diffusers_shards(runs, tmp_path, capsys):
    from ppcl.arch.qwenimage import PPCLQwenImageTransformer2DModel
    from ppcl.export_stream import INDEX_NAME, WEIGHTS_NAME
    from ppcl.width_runtime import REMOVED_WEIGHTS_FILE

    pipe_dir, plan_path, run = runs("qwenimage", width=True)
    teacher, run16 = _bf16_teacher(pipe_dir, run, tmp_path)  # read through its index
    # default: the teacher's dtype (the fp32 plugs cast to it), everything in one file like save_pretrained
    res = export(teacher, plan_path, run16, tmp_path / "bf16", intervals=[0, 2])
    ref = assert_same_as_in_memory(teacher, plan_path, run16, tmp_path / "bf16", res.intervals, dtype=torch.bfloat16)
    # (a width export also carries its model code, the removed weights' stand-ins and the index listing them)
    extra = {"modeling_ppcl_qwenimage.py", REMOVED_WEIGHTS_FILE, INDEX_NAME}
    assert sorted(p.name for p in (tmp_path / "bf16" / "transformer").iterdir()
                  if p.name not in extra) == ["config.json", WEIGHTS_NAME]
    # --max-shard-size: the files, names and index diffusers' save_pretrained writes for the same model and size
    ref = ref.to(torch.bfloat16)
    size = sum(v.numel() * v.element_size() for v in ref.state_dict().values()) // 3
    common = ["export", "--model", str(teacher), "--plan", str(plan_path), "--plugs", str(run16), "--intervals", "0,2"]
    assert main([*common, "--max-shard-size", str(size), "--out", str(tmp_path / "sharded")]) == 0
    ref.save_pretrained(tmp_path / "ref", max_shard_size=size)
    got_dir = tmp_path / "sharded" / "transformer"
    names = sorted(p.name for p in got_dir.iterdir() if p.name not in extra - {INDEX_NAME})
    assert names == sorted(p.name for p in (tmp_path / "ref").iterdir()) and len(names) >= 5, names
    assert "diffusion_pytorch_model-00001-of-0000" in names[1] and INDEX_NAME in names
    got_index = json.loads((got_dir / INDEX_NAME).read_text())
    got_index["weight_map"] = {k: v for k, v in got_index["weight_map"].items() if v != REMOVED_WEIGHTS_FILE}
    assert got_index == json.loads((tmp_path / "ref" / INDEX_NAME).read_text())
    # ppcl's width class loads the sharded folder; the pipeline generates with it
    loaded = PPCLQwenImageTransformer2DModel.from_pretrained(got_dir, torch_dtype=torch.bfloat16)
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.isfinite(_latents(load_pipeline(tmp_path / "sharded", dtype=torch.float32))).all()
    # --dtype float32: today's in-memory export exactly
    assert main([*common, "--dtype", "float32", "--out", str(tmp_path / "fp32")]) == 0
    assert_same_as_in_memory(teacher, plan_path, run16, tmp_path / "fp32", [0, 2])
    capsys.readouterr()
    # a size that is not one: one line naming the flag, nothing written
    assert main([*common, "--max-shard-size", "10XB", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppcl export: error:") and "--max-shard-size" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_teacher_weights_that_do_not_fit_fail_in_one_line(runs, tmp_path, capsys):
    """Every tensor is checked by name and shape before anything is written (nanoGPT's rule: nothing copied by
    luck): a missing, misshapen or extra teacher tensor is one line naming it."""
    pipe_dir, plan_path, run = runs("flux")
    key = "transformer_blocks.0.attn.to_q.weight"
    cases = {
        "missing": (lambda sd: {k: v for k, v in sd.items() if k != key}, f"cannot fill {key}"),
        "shape": (lambda sd: {**sd, key: sd[key][:-1]}, f"shape mismatch for {key}"),
        "extra": (lambda sd: {**sd, "context_embedder.extra": torch.zeros(2)}, "context_embedder.extra"),
        "extra in a block": (lambda sd: {**sd, "transformer_blocks.0.extra": torch.zeros(2)},
                             "transformer_blocks.0.extra"),
    }
    capsys.readouterr()  # the fixture's loading messages
    for name, (change, fragment) in cases.items():
        where = tmp_path / name.replace(" ", "_")
        where.mkdir()
        teacher, new_run = _teacher_copy(pipe_dir, run, where, change)
        rc = main(["export", "--model", str(teacher), "--plan", str(plan_path), "--plugs", str(new_run), "--all",
                   "--out", str(where / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("ppcl export: error:") and len(err.strip().splitlines()) == 1, (name, err)
        assert fragment in err, (name, err)
        assert not (where / "out").exists()
