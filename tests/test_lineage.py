"""Lineage of an export: the plan is copied in unchanged and the block map says, for every student block, which
teacher block it is or which interval its plug replaces; checked here by WEIGHT IDENTITY, not by re-deriving the
map. ``ppcl plan show --model`` reads it back; foreign, garbled or mismatched inputs fail in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ppcl.arch import get_adapter, load_pipeline
from ppcl.cli import main
from ppcl.distill import distill
from ppcl.export import export
from ppcl.lineage import LINEAGE_FILE, read_lineage
from ppcl.plan import load_plan, make_plan, meta_adapter, save_plan
from ppcl.width_runtime import REMOVED_WEIGHTS_FILE

torch.set_num_threads(1)

#: per family: depth intervals and width ops so that the map has plain kept blocks, kept blocks with trained width
#: ops (ffn_linear; text-frozen members) and plugs (FLUX, Qwen-Image: plugs inside a frozen text group)
PLANS = {
    # FLUX: 4 dual blocks, then 6 single
    "flux": ([[2, 3], [5, 8]], [{"op": "text_freeze", "interval": [0, 3]},
                                {"op": "ffn_linear", "block": 1, "stream": "image"}]),
    "sd3": ([[1, 2], [6, 8]], [{"op": "ffn_linear", "block": 4, "stream": "image"}]),
    # [5, 6] is a plug inside the frozen text group [4, 7] (role member)
    "qwenimage": ([[1, 2], [5, 6]], [{"op": "text_freeze", "interval": [4, 7]},
                                     {"op": "ffn_linear", "block": 7, "stream": "image"}]),
}


@pytest.fixture(scope="module")
def runs(tiny_pipe_dir, tmp_path_factory):
    """family -> (pipe_dir, plan path, distill run), a two-step run made on first use."""
    root = tmp_path_factory.mktemp("lineage_runs")
    cache = {}

    def get(family):
        if family not in cache:
            pipe_dir = tiny_pipe_dir[family]
            intervals, width = PLANS[family]
            plan = make_plan(get_adapter(load_pipeline(pipe_dir)), intervals, width=width)
            path = save_plan(plan, root / f"{family}.json")
            run = root / f"run-{family}"
            distill(str(pipe_dir), path, run, steps=2, lr=1e-3, warmup_steps=1, n_samples=2, batch_size=1,
                    resolution=32, lsq_batches=1, progress=False)
            cache[family] = (pipe_dir, path, run)
        return cache[family]

    return get


def _transformer_state(folder):
    sd = {}
    for f in sorted((folder / "transformer").glob("*.safetensors")):
        if f.name != REMOVED_WEIGHTS_FILE:  # a width export's empty stand-ins of removed stock weights
            sd.update(load_file(str(f)))
    return sd


def _check_by_weight_identity(pipe_dir, plan_path, run, out):
    """Every student block's tensors are exactly those of the source its lineage entry names."""
    lin = read_lineage(out)
    plan = load_plan(plan_path)
    student = _transformer_state(out)
    teacher = load_pipeline(pipe_dir).transformer.state_dict()
    plugs = load_file(str(run / "plugs.safetensors"))
    lists = {bl.name for bl in lin.student.lists}
    covered = set()
    for b in lin.blocks:
        prefix = f"{b.student_list}.{b.student_index}."
        keys = {k for k in student if k.startswith(prefix)}
        assert keys, prefix
        covered |= keys
        if b.kind == "plug":
            assert list(plan.intervals[b.plan_index]) == list(b.interval)
            src, where = plugs, f"interval_{b.plan_index}."  # the trained plug of THAT interval
        elif not b.width_ops:
            src, where = teacher, f"{b.teacher_list}.{b.teacher_index}."
        else:  # a kept block with width ops: the trained copy of that very teacher block
            freeze = [op for op in b.width_ops if op["op"] == "text_freeze"]
            if freeze:
                a, e = freeze[0]["interval"]
                where = f"text_freeze_{a}_{e}.{b.teacher_block - a - 1}."
            else:
                where = f"width_{b.teacher_block}."
            src = plugs
        assert b.weights.prefix + "." == where, (b, where)
        assert {where + k[len(prefix):] for k in keys} == {k for k in src if k.startswith(where)}, prefix
        for k in keys:
            ref = src[where + k[len(prefix):]]
            assert torch.equal(student[k], ref.to(student[k].dtype)), (k, where)
    # nothing outside the map: every block tensor of the student belongs to exactly one entry
    assert covered == {k for k in student if k.split(".", 1)[0] in lists}
    return lin


def test_export_lineage_is_the_weights_and_plan(family, runs, tmp_path):
    pipe_dir, plan_path, run = runs(family)
    intervals, width = PLANS[family]
    out = tmp_path / "pruned"
    export(pipe_dir, plan_path, run, out, all_intervals=True)
    assert (out / "plan.json").read_bytes() == plan_path.read_bytes()
    lin = _check_by_weight_identity(pipe_dir, plan_path, run, out)
    adapter = get_adapter(load_pipeline(pipe_dir))
    assert lin.teacher.num_blocks == adapter.num_blocks
    assert lin.student.num_blocks == adapter.num_blocks - sum(e - s for s, e in intervals)
    assert get_adapter(load_pipeline(out)).num_blocks == lin.student.num_blocks
    # each teacher block appears once: kept as itself, or inside exactly one plug's interval
    seen = []
    for b in lin.blocks:
        seen += [b.teacher_block] if b.kind == "kept" else list(range(b.interval[0], b.interval[1] + 1))
    assert seen == list(range(adapter.num_blocks))
    assert [list(b.interval) for b in lin.blocks if b.kind == "plug"] == intervals
    with_ops = {b.teacher_block for b in lin.blocks if b.kind == "kept" and b.width_ops}
    assert {op["block"] for op in width if op["op"] == "ffn_linear"} <= with_ops
    card = (out / "README.md").read_text()
    assert "## Block map" in card and f"plug of teacher blocks [{intervals[0][0]}, {intervals[0][1]}]" in card


def test_subset_export_names_the_plan_interval(runs, tmp_path):
    """One run, a subset of its plugs: plan indices (not positions) and the teacher blocks left in place."""
    pipe_dir, plan_path, run = runs("sd3")
    out = tmp_path / "sub"
    export(pipe_dir, plan_path, run, out, intervals=[1])
    lin = _check_by_weight_identity(pipe_dir, plan_path, run, out)
    assert lin.intervals == [1]
    plugs = [b for b in lin.blocks if b.kind == "plug"]
    assert [(b.plan_index, list(b.interval), b.student_index) for b in plugs] == [(1, [6, 8], 6)]
    # [1, 2] was not chosen: teacher blocks 1 and 2 are kept, as the teacher's own weights
    assert [(b.student_index, b.teacher_block) for b in lin.blocks[:3]] == [(0, 0), (1, 1), (2, 2)]


def test_plan_show_reads_back_and_checks(runs, tiny_pipe_dir, tmp_path, capsys):
    pipe_dir, plan_path, run = runs("flux")
    out = tmp_path / "pruned"
    args = ["--model", str(pipe_dir), "--plan", str(plan_path), "--plugs", str(run), "--all", "--out", str(out)]
    assert main(["export", *args]) == 0
    assert str(out / LINEAGE_FILE) in capsys.readouterr().out
    # exporting again into its own output is allowed: the plan copied in is part of the export, not a foreign plan
    assert main(["export", *args]) == 0, capsys.readouterr().err
    capsys.readouterr()

    assert main(["plan", "show", "--model", str(out)]) == 0
    text = capsys.readouterr().out
    assert "family flux: 10 teacher blocks -> 6" in text  # the plan ...
    assert "transformer_blocks.0 <- teacher transformer_blocks.0 (block 0)" in text  # ... and the block map
    assert ("transformer_blocks.1 <- teacher transformer_blocks.1 (block 1) + text_freeze [0, 3], ffn_linear image"
            in text)
    assert ("transformer_blocks.2 <- plug of teacher blocks [2, 3] (plan interval 0, initialised from teacher block 2), "
            "text frozen [0, 3] as last") in text
    assert "single_transformer_blocks.0 <- teacher single_transformer_blocks.0 (block 4)" in text
    assert "single_transformer_blocks.1 <- plug of teacher blocks [5, 8] (plan interval 1" in text
    assert "single_transformer_blocks.2 <- teacher single_transformer_blocks.5 (block 9)" in text

    assert main(["plan", "show", "--plan", str(plan_path), "--model", str(out)]) == 0
    assert "was exported from this plan" in capsys.readouterr().out
    # a plan for a model of this size (a further pruning of the export) fits it as a teacher
    again = save_plan(make_plan(meta_adapter(out), [[3, 4]]), tmp_path / "again.json")
    assert main(["plan", "show", str(again), "--model", str(out)]) == 0
    assert "fits" in capsys.readouterr().out

    def refused(argv, fragment):
        assert main(["plan", "show", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ppcl plan: error:") and len(err.strip().splitlines()) == 1, err
        assert fragment in err, err

    # another plan of the same teacher
    other = save_plan(make_plan(get_adapter(load_pipeline(pipe_dir)), [[1, 2]]), tmp_path / "other.json")
    refused(["--plan", str(other), "--model", str(out)], "the plan is for 10 blocks, the model has 6")
    refused(["--plan", str(other), "--model", str(out / LINEAGE_FILE)], "exported from another plan")
    # a plan of another family; a folder without lineage (a teacher) read as an export
    sd3 = save_plan(make_plan(get_adapter(load_pipeline(tiny_pipe_dir["sd3"])), [[1, 2]]), tmp_path / "sd3.json")
    refused(["--plan", str(sd3), "--model", str(out)], "for a sd3 model")
    refused(["--model", str(pipe_dir)], "no block map")
    refused(["--model", str(tmp_path / "nope")], "not found")
    # but the teacher itself is a model the plan can be checked against
    assert main(["plan", "show", "--plan", str(plan_path), "--model", str(pipe_dir)]) == 0
    capsys.readouterr()

    # foreign, garbled or tampered lineage files
    good = json.loads((out / LINEAGE_FILE).read_text())
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cases = [
        ("{not json", "unreadable"),
        (json.dumps({"format": "something.else", "version": 1}), "not a ppcl lineage file"),
        (json.dumps({**good, "version": 99}), "unsupported lineage version 99"),
        (json.dumps({**good, "blocks": [{**good["blocks"][0], "kind": "moved"}, *good["blocks"][1:]]}),
         "field blocks.0.kind"),
        (json.dumps({k: v for k, v in good.items() if k != "teacher"}), "field teacher"),
        (json.dumps({**good, "blocks": good["blocks"][1:]}), "student blocks 0..5 in order"),
    ]
    for text, fragment in cases:
        (bad / LINEAGE_FILE).write_text(text)
        refused(["--model", str(bad)], fragment)
    (bad / LINEAGE_FILE).write_text(json.dumps(good))
    (bad / "plan.json").write_text((bad / "plan.json").read_text().replace('"middle"', '"first"'))
    refused(["--model", str(bad)], "sha256 differs")


def test_pipeline_export_step_writes_lineage(runs, tmp_path):
    """The pipeline's export step (``ppcl.stages.export``, what the KFP component calls) carries the same lineage."""
    from ppcl.stages import export as export_stage

    pipe_dir, plan_path, run = runs("sd3")
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    shutil.copy(plan_path, plan_dir / "plan.json")
    plan = load_plan(plan_path)
    out = tmp_path / "model"
    export_stage(str(pipe_dir), str(plan_dir), str(run), plan.params.student / plan.params.teacher, str(out))
    assert (out / "plan.json").read_bytes() == plan_path.read_bytes()
    lin = _check_by_weight_identity(pipe_dir, plan_path, run, out)
    assert lin.intervals == [0, 1] and lin.student.num_blocks == 10 - 3
