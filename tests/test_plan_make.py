"""``ppcl plan make``: plans from explicit intervals on a model built from its bare config.json (no weights), and
the committed real configs' exact parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppcl.cli import main

CONFIGS = Path(__file__).parent / "data" / "configs"
QWEN = CONFIGS / "qwen-image" / "config.json"
TINY = CONFIGS / "tiny-flux"
RELEASED = "3-4,5-7,8-10,11-12,15-24,25-27,29-30,42-43,45-47,48-49,52-53,54-55,56-57"


@pytest.mark.parametrize("name, params, blocks", [
    ("qwen-image", 20_430_401_088, 60),
    ("flux1-dev", 11_901_408_320, 57),
    ("sd35-large", 8_056_627_520, 38),
])
def test_real_configs_build_on_meta_with_exact_parameter_counts(name, params, blocks):
    from ppcl.plan import meta_adapter

    adapter = meta_adapter(CONFIGS / name)
    assert adapter.total_parameters() == params
    assert adapter.num_blocks == blocks
    assert next(adapter.transformer.parameters()).device.type == "meta"


def test_released_qwen_image_plan_reproduces_from_the_config(tmp_path, capsys):
    from ppcl.plan import QWEN_IMAGE_RELEASED_INTERVALS, QWEN_IMAGE_RELEASED_WIDTH, load_plan

    out = tmp_path / "plan.json"
    assert main(["plan", "make", "--model", str(QWEN), "--intervals", RELEASED, "--out", str(out)]) == 0
    plan = load_plan(out)
    assert [list(iv) for iv in plan.intervals] == QWEN_IMAGE_RELEASED_INTERVALS
    assert plan.teacher.num_blocks - plan.removed_blocks == 35
    assert plan.params.teacher == 20_430_401_088
    assert plan.params.student == 11_934_618_688
    assert plan.selection["method"] == "explicit"
    capsys.readouterr()

    # the same plan written as the JSON list the paper prints, and with the released width ops in the flag syntax
    out2 = tmp_path / "plan2.json"
    width = "ffn:2:image,ffn:2:text,ffn:58:image,ffn:59:image,freeze:36-37,freeze:40-41,freeze:50-59"
    assert main(["plan", "make", "--model", str(QWEN.parent), "--intervals", json.dumps(QWEN_IMAGE_RELEASED_INTERVALS),
                 "--width", width, "--out", str(out2)]) == 0
    plan2 = load_plan(out2)
    assert [list(iv) for iv in plan2.intervals] == QWEN_IMAGE_RELEASED_INTERVALS
    assert [op.model_dump(mode="json") for op in plan2.width] == QWEN_IMAGE_RELEASED_WIDTH
    assert plan2.params.student < plan.params.student  # the width ops remove parameters on top of the depth plan
    capsys.readouterr()

    assert main(["plan", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "11,934,618,688" in shown and "[15, 24]" in shown


def test_make_from_a_pipeline_folder_reads_its_transformer_config(tmp_path):
    from ppcl.plan import load_plan

    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "FluxTransformer2DModel"]}))
    (pipe / "transformer" / "config.json").write_text((TINY / "config.json").read_text())
    out = tmp_path / "plan.json"
    assert main(["plan", "make", "--model", str(pipe), "--intervals", "1-2,3,4-5", "--allow-ends",
                 "--init", "first", "--out", str(out)]) == 0
    plan = load_plan(out)
    assert [list(iv) for iv in plan.intervals] == [[1, 2], [3, 3], [4, 5]]
    assert plan.plug_sources == [1, 3, 4]
    assert plan.family == "flux"


@pytest.mark.parametrize("extra, message", [
    (["--intervals", "1-x"], "--intervals: '1-x' is not a block range"),
    (["--intervals", "[[1,2],[3]]"], "--intervals: expected a JSON list"),
    (["--intervals", "[[1,2"], "--intervals: not a JSON list"),
    (["--intervals", ","], "--intervals: no interval given"),
    (["--intervals", "1-2,2-3"], "interval [2, 3]: overlaps [1, 2]"),
    (["--intervals", "1-9"], "interval [1, 9]: out of range"),
    (["--intervals", "1-3"], "crosses a block-kind boundary"),
    (["--intervals", "1-2", "--width", "ffn:0"], "--width: 'ffn:0' is not"),
    (["--intervals", "1-2", "--width", "freeze:3"], "--width: 'freeze:3' is not"),
    (["--intervals", "1-2", "--width", "ffn:4:text"],
     "width op ffn_linear on block 4: block FluxSingleTransformerBlock has no separate text FFN"),
    (["--intervals", "1-2", "--init", "centre"], "--init: 'centre' is not one of middle, first, last"),
    (["--intervals", "1-2", "--protect", "a"], "--protect: 'a' is not an integer"),
    (["--intervals", "1-2", "--protect", "2"], "interval [1, 2]: contains protected block 2"),
])
def test_make_bad_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    out = tmp_path / "plan.json"
    rc = main(["plan", "make", "--model", str(TINY), *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ppcl plan: error: ") and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("write, message", [
    (None, "model config not found"),
    ("{not json", "unreadable"),
    (json.dumps({"num_layers": 2}), "field '_class_name' is missing"),
    (json.dumps({"_class_name": "NoSuchTransformer"}), "unknown transformer class diffusers.NoSuchTransformer"),
    (json.dumps({"_class_name": "UNet2DModel"}), "unsupported transformer class UNet2DModel"),
])
def test_make_bad_model_config_is_one_line_error(tmp_path, capsys, write, message):
    cfg = tmp_path / "m" / "config.json"
    if write is not None:
        cfg.parent.mkdir()
        cfg.write_text(write)
    rc = main(["plan", "make", "--model", str(cfg), "--intervals", "1-2", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
