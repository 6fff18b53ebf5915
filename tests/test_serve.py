"""One plan for several ratios: the joint selection (``select(..., serve=...)``), the plan's recorded subsets
(``Plan.serves``) that export and distillation use, and the trained-plug probe's output error it scores with."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from ppcl.arch import get_adapter, load_pipeline
from ppcl.cli import main
from ppcl.distill import build_units, export_placements
from ppcl.errors import PPCLError
from ppcl.plan import load_plan, make_plan, save_plan
from ppcl.probe_result import ProbeResult
from ppcl.probe_trained import _output_errors, candidate_units, trained_interval_scores
from ppcl.select import Budget, SelectionContext, _ppcl_candidates, _ppcl_thresholds, _flat_runs, select
from ppcl.subsets import choose_intervals, exported_subset, subset_accounting
from tests.probe_data import synthetic_probe_data, tiny_flux_batches

torch.set_num_threads(1)


def _probe(L: int = 10, seed: int = 0, params=None) -> ProbeResult:
    """Dual blocks of uneven sizes, every interval with a random output error (R^2 flat: only the trained
    scores differ)."""
    rng = random.Random(seed)
    params = params or [100 + 40 * (i % 3) for i in range(L)]
    blocks = []
    for i in range(L):
        stats = {"cka": 0.97, "r2": 0.9, "probe_cka": 0.9, "cosine": 0.9, "trend": 0.0 if i + 1 < L else None}
        blocks.append({"index": i, "kind": "dual", "list_name": "transformer_blocks", "params": params[i],
                       "streams": ["image"], **stats, "per_stream": {"image": stats}})
    intervals = [{"start": s, "end": e, "r2": 0.5, "probe_cka": None, "cka": None, "per_stream": {}}
                 for s in range(L) for e in range(s + 1, L)]
    data = synthetic_probe_data(blocks, intervals)
    data["trained"] = {
        "steps": 10, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "timesteps": "logit_normal",
        "max_grad_norm": 1.0, "seed": 0, "eval_batches": 1, "init": "middle", "identity_floor": 1e-6,
        "data": "in-memory", "heldout": "batches", "seconds": 1.0,
        "intervals": [{"start": s, "end": e, "source": (s + e) // 2, "trained_loss": 0.1, "initial_loss": 0.2,
                       "identity_loss": 0.2, "trained_quality": 0.5, "per_stream": {},
                       "output_error": rng.uniform(0.01, 0.1) * (e - s) ** rng.uniform(1.0, 2.0)}
                      for s in range(L) for e in range(s + 1, L)]}
    return ProbeResult.model_validate(data)


def _brute_force(probe, keep, serve):
    """Least joint cost over EVERY plan meeting ``keep`` and every choice of subsets meeting each served ratio."""
    ctx = SelectionContext(probe=probe, budget=Budget(keep_params=keep), score="output")
    min_cka, max_jump, break_cost = _ppcl_thresholds(ctx)
    _, high, jump = _flat_runs(ctx, min_cka, max_jump)
    cost = {(c.s, c.e): c.cost for c in _ppcl_candidates(ctx, high, jump, break_cost)}

    def plans(a):
        if a >= ctx.L:
            yield []
            return
        yield from plans(a + 1)
        for e in range(a + 1, ctx.L):
            if (a, e) in cost:
                for rest in plans(e + 1):
                    yield [(a, e)] + rest

    best = float("inf")
    for plan in plans(0):
        if ctx.student(plan) > int(keep * ctx.total):
            continue
        total = sum(cost[iv] for iv in plan)
        for r in serve:
            subsets = [sub for k in range(1, len(plan) + 1) for sub in itertools.combinations(plan, k)
                       if ctx.student(list(sub)) <= int(r * ctx.total)]
            if not subsets:
                total = float("inf")
                break
            total += min(sum(cost[iv] for iv in sub) for sub in subsets)
        best = min(best, total)
    return best


@pytest.mark.parametrize("seed,keep,serve", [(0, 0.5, [0.75]), (1, 0.45, [0.8]), (2, 0.5, [0.8, 0.65])])
def test_joint_selection_is_the_exact_minimum(seed, keep, serve):
    probe = _probe(seed=seed)
    plan = select(probe, method="ppcl", keep_params=keep, score="output", serve=serve, serve_subsets="joint")
    assert plan.selection["joint_cost"] == pytest.approx(_brute_force(probe, keep, serve), rel=1e-12)
    ctx = SelectionContext(probe=probe, budget=Budget(keep_params=keep), score="output")
    assert plan.params.student <= keep * plan.params.teacher
    assert sorted(plan.serves) == sorted(f"{r:g}" for r in serve)
    for key, ids in plan.serves.items():  # each recorded subset meets its own ratio, and is what the notes say
        subset = [plan.intervals[k] for k in ids]
        assert ctx.student(subset) <= float(key) * ctx.total
        assert [list(iv) for iv in subset] == plan.selection["serve"][key]["intervals"]


def test_joint_selection_trades_the_low_ratio_for_the_high_one():
    """Alone, the low ratio's best plan has no good subset for the high ratio; asked to serve it, the plan changes,
    its own cost rises and the joint cost falls below what the low-only plan plus its best subset costs."""
    probe = _probe(seed=4)
    alone = select(probe, method="ppcl", keep_params=0.5, score="output")
    joint = select(probe, method="ppcl", keep_params=0.5, score="output", serve=[0.75], serve_subsets="joint")
    assert not alone.serves and alone.selection["score"] == "output"
    assert joint.selection["cost"] >= alone.selection["cost"]
    ctx = SelectionContext(probe=probe, budget=Budget(keep_params=0.5), score="output")
    errs = {(iv.start, iv.end): iv.output_error for iv in probe.trained.intervals}
    best_sub = min(sum(errs[iv] for iv in sub) for k in range(1, len(alone.intervals) + 1)
                   for sub in itertools.combinations(alone.intervals, k) if ctx.student(list(sub)) <= 0.75 * ctx.total)
    assert joint.intervals != alone.intervals
    assert joint.selection["joint_cost"] < alone.selection["cost"] + best_sub - 1e-3


def test_serve_by_default_chooses_the_plan_and_leaves_the_subsets_to_the_size_rule():
    """``serve_subsets`` size_rule (the default): the same plan as joint, nothing recorded in ``serves`` (export and
    distillation then use the size rule), the jointly chosen subsets kept in the metadata; ``plan show`` says so."""
    from ppcl.plan import format_plan

    probe = _probe(seed=4)
    joint = select(probe, method="ppcl", keep_params=0.5, score="output", serve=[0.75], serve_subsets="joint")
    plan = select(probe, method="ppcl", keep_params=0.5, score="output", serve=[0.75])
    assert plan.intervals == joint.intervals and joint.serves["0.75"]
    assert plan.serves == {} and plan.selection["serve_subsets"] == "size_rule"
    assert plan.selection["serve"] == joint.selection["serve"]
    assert "selected to serve keep 0.75 too: the export's size rule picks" in format_plan(plan)
    assert "serves keep 0.75 with intervals" in format_plan(joint)
    with pytest.raises(PPCLError, match="unknown serve_subsets 'both': expected one of size_rule, joint"):
        select(probe, method="ppcl", keep_params=0.5, score="output", serve=[0.75], serve_subsets="both")


def test_output_score_defaults_to_no_break_cost_and_needs_output_errors(tmp_path):
    probe = _probe()
    plan = select(probe, method="ppcl", keep_params=0.5, score="output")
    assert plan.selection["break_cost"] == 0.0
    chosen = plan.selection["interval_scores"]
    assert all(v["output_error"] is not None for v in chosen.values())
    old = probe.model_copy(deep=True)
    for iv in old.trained.intervals:
        iv.output_error = None
    with pytest.raises(PPCLError, match="no output errors.*--trained-steps"):
        select(old, method="ppcl", keep_params=0.5, score="output")


@pytest.mark.parametrize("kw,message", [
    (dict(method="shortgpt", keep_params=0.5, serve=[0.7]), "only the ppcl selector"),
    (dict(method="ppcl", remove_blocks=3, serve=[0.7]), "needs a --keep-params budget"),
    (dict(method="ppcl", keep_params=0.5, serve=[0.4]), "--serve 0.4: a served ratio must lie between"),
    (dict(method="ppcl", keep_params=0.5, serve=[1.0]), "--serve 1: a served ratio must lie between"),
])
def test_serve_errors_are_one_line(kw, message):
    with pytest.raises(PPCLError, match=message):
        select(_probe(), **kw)


def test_joint_selection_too_large_is_a_one_line_error(monkeypatch):
    import ppcl.select

    monkeypatch.setattr(ppcl.select, "MAX_JOINT_STATES", 3)
    with pytest.raises(PPCLError, match=r"--serve 0.8, 0.65: the joint selection holds .* serve fewer ratios"):
        select(_probe(), method="ppcl", keep_params=0.5, score="output", serve=[0.8, 0.65])


def test_cli_select_serve_records_the_subsets(tmp_path, capsys):
    from ppcl.probe import write_probe

    write_probe(_probe(), tmp_path / "probe", plots=False)
    out = tmp_path / "plan.json"
    assert main(["select", "--probe", str(tmp_path / "probe" / "probe.json"), "--keep-params", "0.5",
                 "--score", "output", "--serve", "0.75", "--serve-subsets", "joint", "--out", str(out),
                 "--no-plot"]) == 0
    plan = load_plan(out)
    assert list(plan.serves) == ["0.75"] and plan.serves["0.75"]
    assert main(["select", "--probe", str(tmp_path / "probe" / "probe.json"), "--keep-params", "0.5",
                 "--serve", "0.3", "--out", str(tmp_path / "bad.json"), "--no-plot"]) == 2
    assert "--serve 0.3" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


# -------------------------------------------------------------------------------- the recorded subsets in use
@pytest.fixture()
def flux_plan(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir["flux"])
    adapter = get_adapter(pipe)
    return adapter, make_plan(adapter, [[1, 2], [4, 5], [6, 8]])


def test_plan_serves_is_validated_and_round_trips(flux_plan, tmp_path):
    adapter, plan = flux_plan
    served = plan.model_copy(update={"serves": {"0.8": [0, 2]}})
    save_plan(served, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").serves == {"0.8": [0, 2]}
    for bad, message in (({"0.8": [2, 0]}, "sorted"), ({"0.8": []}, "non-empty"), ({"0.8": [3]}, "0..2"),
                         ({"fast": [0]}, "not a keep ratio"), ({"1.5": [0]}, "not a keep ratio")):
        data = served.model_dump(mode="json")
        data["serves"] = bad
        (tmp_path / "bad.json").write_text(__import__("json").dumps(data))
        with pytest.raises(PPCLError, match=message):
            load_plan(tmp_path / "bad.json")


def test_export_rule_and_output_term_use_the_recorded_subset(flux_plan):
    adapter, plan = flux_plan
    units = build_units(adapter, plan)
    teacher, width_saving, savings = subset_accounting(adapter, units)
    size_rule = exported_subset(adapter, units, 0.85)
    # a different subset that also meets 0.85: the recorded one wins at 0.85, the size rule stays for other ratios
    other = next(list(c) for k in range(1, 3) for c in itertools.combinations(range(3), k)
                 if list(c) != size_rule and teacher - sum(savings[i] for i in c) <= 0.85 * teacher)
    serves = {"0.85": other}
    assert choose_intervals(0.85, teacher, width_saving, savings, {}, serves) == other
    assert exported_subset(adapter, units, 0.85, serves=serves) == other
    assert exported_subset(adapter, units, 0.95, serves=serves) == exported_subset(adapter, units, 0.95)
    placements = export_placements(adapter, units, [0.85], serves)
    assert [u.index for u in placements[1]] == other and len(placements[0]) == 3
    # a recorded subset over its ratio (a hand-edited plan) is refused, not exported
    too_big = next(i for i in range(3) if teacher - savings[i] > 0.85 * teacher)
    with pytest.raises(PPCLError, match="over the ratio"):
        choose_intervals(0.85, teacher, width_saving, savings, {}, {"0.85": [too_big]})


# ----------------------------------------------------------------------------------------- the output error
_batches = tiny_flux_batches


def test_output_error_is_the_whole_model_run_with_the_plug(tiny_pipe_dir):
    """The score (teacher states reused up to the plug) equals running the whole pruned model from its input,
    with and without guidance."""
    from ppcl.distill.losses import student_forward
    from ppcl.distill.streams import step_inputs
    from ppcl.settings import DistillSettings

    pipe = load_pipeline(tiny_pipe_dir["flux"])
    adapter = get_adapter(pipe)
    units = candidate_units(adapter, [(1, 3), (5, 8)])
    noised = step_inputs(pipe, adapter, DistillSettings(batch_size=2, steps=1, warmup_steps=0), torch.device("cpu"),
                         torch.float32, 0)
    cond = [noised(b, -1 - j) for j, b in enumerate(_batches(2))]
    uncond = [dict(x, encoder_hidden_states=torch.zeros_like(x["encoder_hidden_states"])) for x in cond]
    for guidance, un in ((1.0, None), (3.0, uncond)):
        got = _output_errors(adapter, units, cond, un, guidance)
        for u in units:
            want = 0.0
            with torch.no_grad():
                for j, x in enumerate(cond):
                    t = pipe.transformer(**x, return_dict=False)[0]
                    s = student_forward(adapter, x, [u], capture=False)[0]
                    if un is not None:
                        t = guidance * t - (guidance - 1) * pipe.transformer(**un[j], return_dict=False)[0]
                        s = guidance * s - (guidance - 1) * student_forward(adapter, un[j], [u], capture=False)[0]
                    want += float((s - t).pow(2).mean() / t.pow(2).mean()) / len(cond)
            assert got[u.name] == pytest.approx(want, rel=1e-5) and want > 0


def test_trained_probe_writes_output_errors_and_refuses_guidance_without_a_negative_prompt(tiny_pipe_dir):
    pipe_dir = str(tiny_pipe_dir["flux"])
    res = trained_interval_scores(pipe_dir, _batches(4), candidates=[(1, 3), (6, 9)], steps=3, batch_size=2,
                                  lr=2e-3, warmup_steps=1, eval_batches=2, progress=False)
    assert res.output_guidance == 1.0 and res.uncond_ratio == 0.0
    assert all(iv.output_error is not None and iv.output_error > 0 for iv in res.intervals)
    with pytest.raises(PPCLError, match="negative prompt"):
        trained_interval_scores(pipe_dir, _batches(4), candidates=[(1, 3)], steps=1, batch_size=2, eval_batches=2,
                                output_guidance=3.0, progress=False)
    with pytest.raises(PPCLError, match="output_guidance must be >= 1"):
        trained_interval_scores(pipe_dir, _batches(4), candidates=[(1, 3)], steps=1, output_guidance=0.5,
                                progress=False)


def test_distill_and_export_build_the_recorded_subset(flux_plan, tiny_pipe_dir, tmp_path):
    """End to end: a plan recording a subset for 0.85 that is NOT the size rule's; the run trains it in its
    output-level term and ``export --keep-params 0.85`` builds exactly it; 0.95 still follows the size rule."""
    from ppcl.distill import distill
    from ppcl.export import export

    adapter, plan = flux_plan
    units = build_units(adapter, plan)
    size_rule = exported_subset(adapter, units, 0.85)
    teacher, _, savings = subset_accounting(adapter, units)
    other = next(list(c) for k in range(1, 3) for c in itertools.combinations(range(3), k)
                 if list(c) != size_rule and teacher - sum(savings[i] for i in c) <= 0.85 * teacher)
    path = save_plan(plan.model_copy(update={"serves": {"0.85": other}}), tmp_path / "plan.json")
    pipe_dir = str(tiny_pipe_dir["flux"])
    distill(pipe_dir, path, tmp_path / "run", steps=2, lr=1e-3, warmup_steps=1, n_samples=2,
            output_loss_weight=1.0, output_loss_ratios=[0.85], progress=False)
    res = export(pipe_dir, path, tmp_path / "run", tmp_path / "m85", keep_params=0.85)
    assert res.intervals == other and res.parameters == teacher - sum(savings[i] for i in other)
    assert export(pipe_dir, path, tmp_path / "run", tmp_path / "m95", keep_params=0.95).intervals == \
        exported_subset(adapter, units, 0.95)
