"""The Plan: validation, exact parameter accounting from the modules, the released Qwen-Image plan, plan show."""

from __future__ import annotations

import json

import pytest

from ppcl.arch import count_parameters, get_adapter
from ppcl.cli import main
from ppcl.errors import PPCLError
from ppcl.plan import Plan, load_plan, make_plan, predict_params, save_plan
from ppcl.tiny import tiny_transformer

RELEASED = [[3, 4], [5, 7], [8, 10], [11, 12], [15, 24], [25, 27], [29, 30], [42, 43], [45, 47], [48, 49],
            [52, 53], [54, 55], [56, 57]]
RELEASED_WIDTH = ([{"op": "ffn_linear", "block": b, "stream": s} for b in (2, 58, 59) for s in ("image", "text")]
                  + [{"op": "text_freeze", "interval": iv} for iv in ([36, 37], [40, 41], [50, 59])])


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
