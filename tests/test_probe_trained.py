"""The trained-plug probe: plugs learn, one teacher pass per step, scores reach probe.json and steer the selector."""

from __future__ import annotations

import json

import pytest
import torch

from ppcl.arch import get_adapter, load_pipeline
from ppcl.cli import main
from ppcl.errors import PPCLError
from ppcl.probe import load_probe, write_probe
from ppcl.probe_result import ProbeResult, TrainedProbe
from ppcl.probe_trained import default_candidates, trained_interval_scores
from ppcl.select import select
from tests.probe_data import synthetic_probe_data, tiny_flux_batches

torch.set_num_threads(1)

FAST = dict(batch_size=2, lr=2e-3, warmup_steps=2, eval_batches=2, progress=False)


_batches = tiny_flux_batches


def test_plugs_learn_and_scores_are_fractions_of_what_the_interval_does(tiny_pipe_dir):
    pipe_dir = tiny_pipe_dir["flux"]
    data = _batches(6)
    res = trained_interval_scores(str(pipe_dir), data, steps=30, **FAST)
    # every interval of >= 2 blocks inside one kind: 4 dual blocks (6 intervals) and 6 single ones (15)
    got = [(iv.start, iv.end) for iv in res.intervals]
    assert got == default_candidates(get_adapter(load_pipeline(pipe_dir)))
    assert len(got) == 21 and (3, 4) not in got and (0, 3) in got and (4, 9) in got
    assert res.heldout == "batches" and res.steps == 30 and res.data == "in-memory"
    for iv in res.intervals:
        assert iv.trained_loss < iv.initial_loss  # the plug learned, on batches it never saw
        assert iv.identity_loss > 1e-4
        assert 0 <= iv.trained_quality <= 1.0  # better than skipping the interval
        assert iv.trained_quality == pytest.approx(iv.trained_loss / iv.identity_loss)
        assert set(iv.per_stream) == {"image", "text"}
    # longer training on the same candidates: lower held-out loss; no training: the untrained copy's loss
    some = [(1, 3), (4, 6), (6, 9)]
    by_steps = {n: trained_interval_scores(str(pipe_dir), data, candidates=some, steps=n, **FAST) for n in (0, 10)}
    by_steps[30] = TrainedProbe(**{**res.model_dump(), "intervals": [res.interval(*c) for c in some]})
    assert all(iv.trained_loss == iv.initial_loss for iv in by_steps[0].intervals)
    for k in range(len(some)):
        losses = [by_steps[n].intervals[k].trained_loss for n in (0, 10, 30)]
        assert losses[0] > losses[1] > losses[2], (some[k], losses)


def test_one_teacher_pass_per_step(tiny_pipe_dir, monkeypatch):
    pipe_dir = tiny_pipe_dir["flux"]
    cls = type(get_adapter(load_pipeline(pipe_dir)))
    calls = []
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    trained_interval_scores(str(pipe_dir), _batches(4), steps=5, **FAST)
    # 5 steps for all 21 plugs, plus the held-out batches scored before and after training; the output errors then
    # take one full teacher pass per held-out batch and one student forward per plug and batch (each starting at
    # its plug from the teacher's captured call)
    assert len(calls) == 5 + 2 * 2 + 2 + 21 * 2


def test_bad_candidates_are_one_line_errors(tiny_pipe_dir):
    pipe_dir = str(tiny_pipe_dir["flux"])
    with pytest.raises(PPCLError, match=r"candidate 0 \[2, 2\]"):
        trained_interval_scores(pipe_dir, _batches(3), candidates=[(2, 2)], steps=1, **FAST)
    with pytest.raises(PPCLError, match="crosses block lists"):
        trained_interval_scores(pipe_dir, _batches(3), candidates=[(2, 5)], steps=1, **FAST)


# ------------------------------------------------------------------------------------------------ the selector
def _probe(L: int = 12, trained: dict[tuple[int, int], float] | None = None) -> ProbeResult:
    """One flat high-CKA run over every block (no breaks): R^2 best at [2, 4]; trained quality (where given)."""
    blocks = []
    for i in range(L):
        stats = {"cka": 0.97, "r2": 0.9, "probe_cka": 0.9, "cosine": 0.9, "trend": 0.0 if i + 1 < L else None}
        blocks.append({"index": i, "kind": "dual", "list_name": "transformer_blocks", "params": 100,
                       "streams": ["image"], **stats, "per_stream": {"image": stats}})
    intervals = [{"start": s, "end": e, "r2": 0.99 if (s, e) == (2, 4) else 0.5, "probe_cka": None, "cka": None,
                  "per_stream": {}} for s in range(L) for e in range(s + 1, L)]
    data = synthetic_probe_data(blocks, intervals)
    if trained is not None:
        data["trained"] = {
            "steps": 10, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "timesteps": "logit_normal",
            "max_grad_norm": 1.0, "seed": 0, "eval_batches": 1, "init": "middle", "identity_floor": 1e-6,
            "data": "in-memory", "heldout": "batches", "seconds": 1.0,
            "intervals": [{"start": s, "end": e, "source": (s + e) // 2, "trained_loss": q * 0.1,
                           "initial_loss": 0.1, "identity_loss": 0.1, "trained_quality": q,
                           "per_stream": {"image": {"trained": q * 0.1, "initial": 0.1, "identity": 0.1}}}
                          for (s, e), q in trained.items()]}
    return ProbeResult.model_validate(data)


def test_select_follows_the_trained_score():
    trained = {(s, e): 0.01 if (s, e) == (7, 9) else 0.5 for s in range(1, 11) for e in range(s + 1, 11)}
    probe = _probe(trained=trained)
    r2_plan = select(probe, method="ppcl", remove_blocks=2)
    plan = select(probe, method="ppcl", remove_blocks=2, score="trained")
    assert r2_plan.intervals == [(2, 4)] and r2_plan.selection["score"] == "r2"
    assert plan.intervals == [(7, 9)] and plan.selection["score"] == "trained"
    assert plan.selection["interval_scores"]["7-9"]["trained_quality"] == 0.01
    # an interval without a trained score counts as the worst scored one (at least 1), whatever its R^2
    del trained[(7, 9)]
    trained[(5, 7)] = 0.02
    plan = select(_probe(trained={k: v for k, v in trained.items() if k != (2, 4)}), method="ppcl",
                  remove_blocks=2, score="trained")
    assert plan.intervals == [(5, 7)] and not plan.selection["relaxed"]


def test_trained_score_without_trained_probe_is_an_error(tmp_path, capsys):
    probe = _probe()
    with pytest.raises(PPCLError, match="field 'trained'.*ppcl probe --trained-steps"):
        select(probe, method="ppcl", remove_blocks=2, score="trained")
    with pytest.raises(PPCLError, match="only the ppcl selector"):
        select(_probe(trained={(1, 3): 0.1}), method="shortgpt", remove_blocks=2, score="trained")
    write_probe(probe, tmp_path / "probe", plots=False)
    path = tmp_path / "probe" / "probe.json"
    assert main(["select", "--probe", str(path), "--remove-blocks", "2", "--score", "trained",
                 "--out", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "--trained-steps" in err
    assert not (tmp_path / "plan.json").exists()


def test_probe_json_round_trip_and_old_files_load(tmp_path, capsys):
    probe = _probe(trained={(1, 3): 0.25, (2, 5): 0.5})
    write_probe(probe, tmp_path / "new", plots=False)
    back = load_probe(tmp_path / "new" / "probe.json")
    assert back.trained == probe.trained and back.trained.interval(2, 5).trained_quality == 0.5
    old = json.loads((tmp_path / "new" / "probe.json").read_text())
    del old["trained"]  # a probe.json written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_probe(tmp_path / "old.json").trained is None
    # the CLI reads the field
    assert main(["select", "--probe", str(tmp_path / "new" / "probe.json"), "--remove-blocks", "2", "--score",
                 "trained", "--out", str(tmp_path / "plan.json"), "--no-plot"]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["intervals"] == [[1, 3]]


def test_cli_probe_trained_steps_writes_the_scores(tiny_pipe_dir, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "--model", str(tiny_pipe_dir["flux"]), "--out", str(out), "--samples", "2",
                 "--timesteps", "1", "--batch-size", "2", "--resolution", "64", "--max-interval", "2",
                 "--trained-steps", "2"]) == 0
    res = load_probe(out / "probe.json")
    # max_interval 2: the two-block intervals of each kind, 3 dual and 5 single
    assert res.trained.steps == 2 and len(res.trained.intervals) == 8
    assert all(iv.end == iv.start + 1 for iv in res.trained.intervals)
    plan = select(res, method="ppcl", remove_blocks=1, score="trained", break_cost=0.0)
    best = min((iv for iv in res.trained.intervals if 0 < iv.start and iv.end < 9), key=lambda iv: iv.trained_quality)
    assert plan.intervals == [(best.start, best.end)]


@pytest.mark.slow
def test_bench_quality_trained_probe_row(tmp_path):
    """The optional row end to end on the reference teacher (smoke settings, ~20 s): its plan comes from the
    trained scores written beside the probe, and it is evaluated at both ratios."""
    out = tmp_path / "q"
    assert main(["bench", "quality", "--smoke", "--rows", "trained-probe", "--trained-probe-steps", "2",
                 "--out", str(out)]) == 0
    result = json.loads((out / "quality.json").read_text())
    assert [r["ratio"] for r in result["rows"] if r["name"] == "trained-probe"] == [0.7, 0.5]
    assert result["seconds"]["trained_probe"] > 0 and result["settings"]["trained_probe_steps"] == 2
    probe = load_probe(out / "work" / "probe-trained" / "probe.json")
    assert probe.trained.steps == 2 and all(0 < iv.start and iv.end < 15 for iv in probe.trained.intervals)
    expected = select(probe, method="ppcl", score="trained", keep_params=0.5)
    assert result["plans"]["trained-probe"]["intervals"] == [list(iv) for iv in expected.intervals]
