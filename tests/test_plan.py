"""The Plan: validation, exact parameter accounting from the modules, the released Qwen-Image plan, plan show."""

from __future__ import annotations

import json

import pytest

from ppcl.arch import count_parameters, get_adapter
from ppcl.cli import main
from ppcl.errors import PPCLError
from ppcl.plan import (
    QWEN_IMAGE_RELEASED_INTERVALS,
    QWEN_IMAGE_RELEASED_WIDTH,
    Plan,
    load_plan,
    make_plan,
    predict_params,
    save_plan,
)
from ppcl.arch.tiny import tiny_transformer

RELEASED = QWEN_IMAGE_RELEASED_INTERVALS
RELEASED_WIDTH = QWEN_IMAGE_RELEASED_WIDTH


@pytest.fixture(scope="module")
def qwen60():
    return get_adapter(tiny_transformer("qwenimage", num_layers=60, attention_head_dim=8))


@pytest.fixture(scope="module")
def flux():
    return get_adapter(tiny_transformer("flux"))


def _pruned_param_count(adapter, intervals, init):
    """Parameters of the transformer with each interval's blocks deleted except its plug source."""
    import copy

    t = copy.deepcopy(adapter.transformer)
    a = get_adapter(t)
    drop = {i for s, e in intervals for i in range(s, e + 1)} - {a.plug_source(s, e, init) for s, e in intervals}
    offset = 0
    for list_name, _ in a.block_lists:
        blocks = getattr(t, list_name)
        keep = [b for j, b in enumerate(blocks) if offset + j not in drop]
        setattr(t, list_name, type(blocks)(keep))
        offset += len(blocks)
    return count_parameters(t)


def test_released_qwen_plan_round_trips_with_exact_params(qwen60, tmp_path):
    plan = make_plan(qwen60, RELEASED)
    assert plan.removed_blocks == 25 and qwen60.num_blocks - plan.removed_blocks == 35
    assert plan.params.student == _pruned_param_count(qwen60, RELEASED, "middle")
    path = save_plan(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["intervals"] == RELEASED and data["version"] == 1
    again = load_plan(path)
    assert again == plan
    assert predict_params(again, qwen60) == {"teacher": plan.params.teacher, "student": plan.params.student}
    # with the released width operations too: the file keeps them exactly
    full = Plan(**{**plan.model_dump(), "width": RELEASED_WIDTH})
    save_plan(full, tmp_path / "full.json")
    raw = json.loads((tmp_path / "full.json").read_text())
    assert raw["intervals"] == RELEASED and raw["width"] == RELEASED_WIDTH
    assert load_plan(tmp_path / "full.json") == full


@pytest.mark.parametrize("init", ["first", "last"])
def test_params_follow_the_plug_source(flux, init):
    plan = make_plan(flux, [[1, 3], [5, 8]], init=init)
    assert plan.params.student == _pruned_param_count(flux, [[1, 3], [5, 8]], init)


@pytest.mark.parametrize(
    "intervals, message",
    [
        ([[1, 2], [2, 3]], "overlaps"),
        ([[1, 12]], "out of range"),
        ([[-1, 2]], "out of range"),
        ([[3, 2]], "start after end"),
        ([[2, 5]], "crosses a block-kind boundary"),
        ([[0, 2]], "first block"),
        ([[7, 9]], "last block"),
        ([[5, 6], [1, 2]], "execution order"),
    ],
)
def test_bad_intervals_name_the_interval(flux, intervals, message):
    with pytest.raises(PPCLError, match=message) as err:
        make_plan(flux, intervals)
    assert f"[{intervals[-1][0]}, {intervals[-1][1]}]" in str(err.value) or message in str(err.value)


def test_ends_and_protect(flux):
    plan = make_plan(flux, [[0, 2]], allow_ends=True)
    assert plan.intervals == [(0, 2)]
    with pytest.raises(PPCLError, match="protected block 6"):
        make_plan(flux, [[5, 7]], protect=[6])
    assert make_plan(flux, [[0, 0]]).removed_blocks == 0  # re-train in place removes nothing


def test_width_op_validation(qwen60):
    with pytest.raises(PPCLError, match="inside a depth interval"):
        Plan(**{**make_plan(qwen60, [[3, 5]]).model_dump(),
                "width": [{"op": "ffn_linear", "block": 4, "stream": "image"}]})
    with pytest.raises(PPCLError, match="overlaps text_freeze"):
        Plan(**{**make_plan(qwen60, []).model_dump(),
                "width": [{"op": "text_freeze", "interval": [1, 5]}, {"op": "text_freeze", "interval": [5, 6]}]})


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"intervals": [[1, 2], [2, 4]]}, "overlaps"),
        ({"intervals": [[1]]}, "not a \\[start, end\\] pair"),
        ({"intervals": [[1, 99]]}, "out of range"),
        ({"intervals": [[2, 5]]}, "crosses a block-kind boundary"),
        ({"family": "sdxl"}, "unknown family"),
        ({"version": 7}, "version 7"),
    ],
)
def test_plan_show_bad_file_is_one_line_exit_2(flux, tmp_path, capsys, edit, message):
    good = make_plan(flux, [[1, 2]]).model_dump(mode="json")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**good, **edit}))
    assert main(["plan", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err
    import re

    assert re.search(message, err), err


def test_plan_show_prints_table(flux, tmp_path, capsys):
    save_plan(make_plan(flux, [[1, 2], [5, 8]]), tmp_path / "p.json")
    assert main(["plan", "show", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "[5, 8]" in out and "removes 4" in out and "single" in out


# ------------------------------------------------------------------------------------ text_freeze x depth intervals
def test_full_released_plan_counts_every_parameter_once(qwen60):
    """The released plan with all its width ops: predicted == the parameters of the pruned model built by its own
    constructor (35 blocks; the width ops at the pruned positions, mapped here by hand)."""
    import importlib

    import torch

    plan = make_plan(qwen60, RELEASED, width=RELEASED_WIDTH)
    module = importlib.import_module(type(qwen60).__module__)
    cfg = {k: v for k, v in qwen60.transformer.config.items() if not k.startswith("_")}
    # teacher 2 -> 2; 36, 37 -> 18, 19; 40, 41 -> 22, 23; 50 -> 28; 51, [52,53], [54,55], [56,57], 58, 59 -> 29..34
    width = [{"op": "ffn_linear", "block": 2, "stream": "image"}, {"op": "ffn_linear", "block": 2, "stream": "text"},
             {"op": "text_freeze", "interval": [18, 19]}, {"op": "text_freeze", "interval": [22, 23]},
             {"op": "text_freeze", "interval": [28, 34]}, {"op": "ffn_linear", "block": 33, "stream": "image"},
             {"op": "ffn_linear", "block": 34, "stream": "image"}]
    with torch.device("meta"):
        pruned = module.PPCLQwenImageTransformer2DModel(**{**cfg, "num_layers": 35}, width_ops=width)
    assert plan.params.student == count_parameters(pruned)
    depth_only = make_plan(qwen60, RELEASED).params.student
    assert plan.params.student < depth_only < plan.params.teacher
    assert predict_params(plan, qwen60) == {"teacher": plan.params.teacher, "student": plan.params.student}


@pytest.mark.parametrize(
    "intervals, width, message",
    [
        # a plug crossing the end of the frozen group
        ([[52, 53], [57, 58]], [{"op": "text_freeze", "interval": [50, 57]}],
         r"depth interval \[57, 58\] crosses the end of width op text_freeze \[50, 57\]"),
        # a plug covering the whole group
        ([[35, 38]], [{"op": "text_freeze", "interval": [36, 37]}],
         r"depth interval \[35, 38\] covers all of width op text_freeze \[36, 37\]"),
        ([[36, 37]], [{"op": "text_freeze", "interval": [36, 37]}], r"covers all of width op text_freeze \[36, 37\]"),
        # the text FFN of a frozen block is already gone
        ([], [{"op": "text_freeze", "interval": [50, 59]}, {"op": "ffn_linear", "block": 58, "stream": "text"}],
         r"ffn_linear block 58 stream text: the block's text stream is frozen by text_freeze \[50, 59\]"),
        # a block re-trained in place by a plug cannot also get a width op
        ([[2, 2]], [{"op": "ffn_linear", "block": 2, "stream": "image"}],
         r"ffn_linear block 2: the block is inside a depth interval \[2, 2\]"),
    ],
)
def test_bad_composition_fails_at_load_with_one_line(qwen60, tmp_path, capsys, intervals, width, message):
    import re

    good = make_plan(qwen60, RELEASED).model_dump(mode="json")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**good, "intervals": intervals, "plug_sources": [], "width": width}))
    with pytest.raises(PPCLError, match=message):
        load_plan(path)
    with pytest.raises(PPCLError, match=message):
        make_plan(qwen60, intervals, width=width)
    assert main(["plan", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and re.search(message, err), err


def test_composition_roles(qwen60):
    from ppcl.plan import text_freeze_roles

    roles = text_freeze_roles([[3, 4], [49, 51], [52, 53], [56, 59]], [(50, 59)])
    assert roles == {1: ("source", (50, 59)), 2: ("member", (50, 59)), 3: ("last", (50, 59))}
    # a source plug and a last plug: still exact (a plain copy stands at 50, a frozen projected copy ends at 59)
    plan = make_plan(qwen60, [[49, 51], [52, 53], [56, 59]], width=[{"op": "text_freeze", "interval": [50, 59]}],
                     allow_ends=True)
    assert predict_params(plan, qwen60)["student"] == plan.params.student
