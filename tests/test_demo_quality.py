"""Must hold (issue 20): the demo's settings make a pruned model that draws what the teacher draws.

The demo's own work, reduced only where the result does not depend on it: every stage of the DAG that leads to
the lowest-ratio model runs in this process through the same :mod:`ppcl.stages` functions the KFP components
call, with exactly the settings ``ppcl demo`` hands each component (``demo_config_data()`` on the shipped reference
teacher). Left out: kfp.local's subprocesses, the other ratio's branch (exported from the same plugs), the
report, MLflow, and most latency pairs (timing does not change the images). A change that lowers the demo's
quality (fewer steps, a worse recipe, a broken stage, evaluation off the teacher's generation defaults) fails
here.

Takes about 2 minutes on a quiet 2-core machine (distillation is most of it); not marked slow on purpose: it
is the check that the first thing a user runs shows pruning working.
"""

from __future__ import annotations

import json
import time

import pytest

#: the issue's floor for the demo's keep-0.6 branch (the teacher scores ~0.99 on the same prompts)
ACCURACY_FLOOR = 0.90


@pytest.fixture
def no_tracking(monkeypatch):
    monkeypatch.setenv("PPCL_TRACKING", "0")


def test_demo_settings_give_a_pruned_model_the_judge_accepts(tmp_path, no_tracking, capsys):
    from ppcl import stages
    from ppcl.config import demo_config_data, validate_config
    from ppcl_kfp.cli.demo import reference_teacher

    teacher = reference_teacher()
    if teacher is None:
        pytest.skip("the reference teacher is not shipped in this checkout")
    # only the timing is cut: 2 latency pairs instead of the demo's 20 (images and scores do not depend on it)
    cfg = validate_config(demo_config_data({"teacher": str(teacher),
                                            "evaluate": {"latency_warmup": 1, "latency_repeats": 2}}))
    assert cfg.distill.output_loss_ratios == [0.8]  # the demo's one run serves both its ratios
    assert cfg.distill.output_loss_schedule == "every_step"
    low = min(cfg.ratios)
    assert len(cfg.evaluate.prompts) >= 64 and cfg.evaluate.steps == 10

    seconds = {}
    t = time.perf_counter()

    def lap(stage):
        nonlocal t
        now = time.perf_counter()
        seconds[stage] = now - t
        t = now

    stages.shard("", str(tmp_path / "data"), cfg.stage_settings("shard"), progress=False)
    lap("shard")
    stages.encode(cfg.teacher, str(tmp_path / "data"), str(tmp_path / "cache"), cfg.stage_settings("encode"),
                  progress=False)
    lap("encode")
    stages.probe(cfg.teacher, str(tmp_path / "cache"), str(tmp_path / "probe"), cfg.stage_settings("probe"),
                 progress=False)
    lap("probe")
    stages.select(str(tmp_path / "probe"), str(tmp_path / "plan"), cfg.stage_settings("select"))
    lap("select")
    distill = {**cfg.stage_settings("distill"), "steps": cfg.distill.steps, "lr": cfg.distill.lr}  # as the component
    stages.distill(cfg.teacher, str(tmp_path / "plan"), str(tmp_path / "cache"), str(tmp_path / "plugs"), distill,
                   progress=False)
    lap("distill")
    exported = stages.export(cfg.teacher, str(tmp_path / "plan"), str(tmp_path / "plugs"), low,
                             str(tmp_path / "model"), cfg.stage_settings("export"))
    lap("export")
    m = stages.evaluate(str(tmp_path / "model"), cfg.teacher, str(tmp_path / "eval"), cfg.stage_settings("evaluate"),
                        progress=False)
    lap("evaluate")

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    teacher_row, model_row = metrics["models"]
    with capsys.disabled():
        print(f"\ndemo settings, keep {low} (achieved {exported['parameters_ratio']:.3f}): judge accuracy "
              f"{m['judge_accuracy']:.4f} vs teacher {m['teacher_judge_accuracy']:.4f}, judge-FID "
              f"{m['judge_fid']:.1f} vs {m['teacher_judge_fid']:.1f}; seconds "
              + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    # the evaluation ran with the teacher's generation defaults (ppcl.json: true CFG 3, 16 tokens) on 64 prompts
    assert metrics["settings"]["guidance"] == 3.0 and metrics["settings"]["max_sequence_length"] == 16
    assert metrics["samples"] >= 64 and metrics["judge"]["name"] == "ppcl-judge"
    assert model_row["name"].startswith(f"keep {exported['parameters_ratio']:.2f}")
    assert teacher_row["judge_accuracy"] >= 0.95
    assert m["judge_accuracy"] >= ACCURACY_FLOOR, (m["judge_accuracy"], m["teacher_judge_accuracy"])
    assert m["parameters_ratio"] <= low
