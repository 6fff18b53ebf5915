"""Distillation: plugs learn, resume is exact, bad input fails cleanly (one line, exit 2, nothing final written)."""

from __future__ import annotations

import json

import pytest
import torch

from ppcl.arch import get_adapter, load_pipeline
from ppcl.calibration import synthetic_batches
from ppcl.cli import main
from ppcl.distill import distill, heldout_losses
from ppcl.errors import PPCLError
from ppcl.plan import make_plan, save_plan

torch.set_num_threads(1)

#: per family: intervals that include a single-stream run (FLUX) and the end of the model (SD3), plus width ops
PLANS = {
    "flux": ([[1, 2], [5, 8]], [{"op": "ffn_linear", "block": 3, "stream": "image"}]),
    "sd3": ([[1, 2], [7, 9]], [{"op": "ffn_linear", "block": 4, "stream": "text"}]),
    "qwenimage": ([[1, 2], [5, 8]], [{"op": "ffn_linear", "block": 3, "stream": "image"},
                                     {"op": "ffn_linear", "block": 3, "stream": "text"}]),
}
FAST = dict(steps=12, lr=2e-3, warmup_steps=2, n_samples=8, batch_size=2, progress=False)


def write_plan(pipe_dir, arch, path, intervals=None, width=None):
    adapter = get_adapter(load_pipeline(pipe_dir))
    iv, w = PLANS[arch]
    plan = make_plan(adapter, intervals if intervals is not None else iv, width=w if width is None else width,
                     allow_ends=True)
    save_plan(plan, path)
    return path


def test_distillation_lowers_heldout_loss(family, tiny_pipe_dir, tmp_path):
    pipe_dir = tiny_pipe_dir[family]
    plan = write_plan(pipe_dir, family, tmp_path / "plan.json")
    run = tmp_path / "run"
    result = distill(str(pipe_dir), plan, run, **FAST)
    heldout = list(synthetic_batches(load_pipeline(pipe_dir), n_samples=4, batch_size=2, seed=99))
    before = heldout_losses(str(pipe_dir), plan, heldout)
    after = heldout_losses(str(pipe_dir), plan, heldout, run=run)
    assert set(before) == set(after)
    # Every interval plug improves on its initial teacher copy; SD3's plug at the end has no text stream.
    for k in range(2):
        b = sum(v for key, v in before.items() if key.startswith(f"interval_{k}/"))
        a = sum(v for key, v in after.items() if key.startswith(f"interval_{k}/"))
        assert a < b, (k, before, after)
    if family == "sd3":
        assert "interval_1/text" not in after and "interval_0/text" in after
    meta = json.loads((run / "run.json").read_text())
    assert meta["version"] == 1 and meta["steps"] == FAST["steps"]
    assert [p["source"] for p in meta["plugs"] if p["kind"] == "interval"] == (
        [1, 9] if family == "sd3" else [1, 6])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == FAST["steps"] and "interval_0/image" in json.loads(lines[0])["losses"]
    assert result.final_losses.keys() == meta["final_losses"].keys()


def test_sequential_mode_feeds_each_plug_the_student_state(tiny_pipe_dir, tmp_path):
    """Step 1 (plugs at their initial copies, same batch and noise in both modes): the first plug sees the teacher's
    state in both modes, so its losses agree exactly; the second is fed the first plug's output in the sequential
    student, so its losses differ. The output-level term with every plug in place is the same student in both modes,
    and the logged loss is the sum of the D terms plus weight x output term."""
    pipe_dir = tiny_pipe_dir["qwenimage"]
    plan = write_plan(pipe_dir, "qwenimage", tmp_path / "plan.json", width=[])
    runs = {}
    for mode in ("sequential", "nonsequential"):
        seen = []
        distill(str(pipe_dir), plan, tmp_path / mode, mode=mode, output_loss_weight=0.5,
                on_step=lambda s, m: seen.append(m), **{**FAST, "steps": 2, "warmup_steps": 1})
        assert [m["step"] for m in seen] == [1, 2]
        for m in seen:
            assert m["loss"] == pytest.approx(sum(m["losses"].values()) + 0.5 * m["output_loss"], rel=1e-5)
        runs[mode] = seen[0]
    seq, non = runs["sequential"], runs["nonsequential"]
    assert seq["losses"]["interval_0/image"] == non["losses"]["interval_0/image"]
    assert seq["losses"]["interval_0/text"] == non["losses"]["interval_0/text"]
    assert seq["losses"]["interval_1/image"] != pytest.approx(non["losses"]["interval_1/image"], rel=1e-3)
    assert seq["output_loss"] == pytest.approx(non["output_loss"], rel=1e-5) and seq["output_loss"] > 1e-4


def test_loss_d_matches_a_hand_computation_from_teacher_states(tiny_pipe_dir):
    """Loss D of the initial plugs (copies of teacher blocks) recomputed here from the teacher's own states: the
    call entering ``s`` captured by a hook, the source block run on it, compared with the streams leaving ``e`` as
    2 - 2 cos, averaged over tokens (method.md section 2)."""
    from ppcl.arch.common import split_output
    from ppcl.calibration import noise_batch

    pipe_dir = tiny_pipe_dir["flux"]
    pipe = load_pipeline(pipe_dir)
    adapter = get_adapter(pipe)
    plan = make_plan(adapter, [[1, 2], [5, 8]], allow_ends=True)  # sources: middle blocks 1 and 6
    batch = list(synthetic_batches(pipe, n_samples=2, batch_size=2, seed=99))[0]
    got = heldout_losses(str(pipe_dir), plan, [batch], seed=7)

    inputs = noise_batch(adapter, dict(pipe.scheduler.config), batch, scheme="uniform",
                         generator=torch.Generator().manual_seed(7)).model_inputs
    entering, leaving = {}, {}

    def on_input(i, call):
        entering[i] = call

    def on_output(i, call, streams):
        leaving[i] = streams

    with torch.no_grad(), adapter.hooks(on_input=on_input, on_output=on_output):
        adapter.forward(inputs)
    expected = {}
    for k, (s, e, source) in enumerate([(1, 2, 1), (5, 8, 6)]):
        with torch.no_grad():
            out = split_output(adapter.block(source)(**entering[s].kwargs))
        for stream, a in out.items():
            b = leaving[e][stream]
            cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
            expected[f"interval_{k}/{stream}"] = float((2 - 2 * cos).mean())
    assert set(got) == set(expected) and "interval_1/image" in got
    for key, v in expected.items():
        assert v > 1e-4 and got[key] == pytest.approx(v, rel=1e-4), (key, got, expected)


def test_output_loss_subsets_keep_width_units_and_at_least_one_plug(tiny_pipe_dir):
    from ppcl.distill import build_units, output_loss_units

    pipe_dir = tiny_pipe_dir["flux"]
    adapter = get_adapter(load_pipeline(pipe_dir))
    units = build_units(adapter, make_plan(adapter, [[1, 2], [5, 6], [7, 8]],
                                           width=[{"op": "ffn_linear", "block": 3, "stream": "image"}]))
    plugs = {u.name for u in units if u.kind == "interval"}
    assert output_loss_units(units, 1.0, torch.Generator().manual_seed(0)) == units
    seen = set()
    for seed in range(40):
        placed = output_loss_units(units, 0.3, torch.Generator().manual_seed(seed))
        names = {u.name for u in placed}
        assert {u.name for u in units if u.kind != "interval"} <= names  # width units always in place
        assert names & plugs  # never the bare teacher
        assert [u.name for u in placed] == [u.name for u in units if u.name in names]  # order kept
        assert placed == output_loss_units(units, 0.3, torch.Generator().manual_seed(seed))  # reproducible
        seen.add(frozenset(names & plugs))
    assert len(seen) > 3  # real, varying subsets are drawn (7 are possible)


def test_output_loss_subsets_train_and_resume_exactly(tiny_pipe_dir, tmp_path):
    pipe_dir = tiny_pipe_dir["flux"]
    plan = write_plan(pipe_dir, "flux", tmp_path / "plan.json", width=[])
    kw = {**FAST, "steps": 5, "checkpoint_every": 2, "output_loss_weight": 0.5, "output_loss_keep": 0.5}
    seen, every = [], []
    distill(str(pipe_dir), plan, tmp_path / "full", on_step=lambda s, m: seen.append(m), **kw)
    distill(str(pipe_dir), plan, tmp_path / "every", on_step=lambda s, m: every.append(m),
            **{**kw, "steps": 1, "warmup_steps": 0, "output_loss_keep": 1.0})
    # step 1, same initial plugs and inputs: the same D terms; the output-level term of this seed's subset (one
    # of the two plugs) differs from the term with both in place
    assert len(seen) == 5 and seen[0]["losses"] == every[0]["losses"]
    assert seen[0]["output_loss"] != pytest.approx(every[0]["output_loss"], rel=1e-3)
    assert all(m["loss"] == pytest.approx(sum(m["losses"].values()) + 0.5 * m["output_loss"], rel=1e-5) for m in seen)
    distill(str(pipe_dir), plan, tmp_path / "cut", stop_after=3, **kw)
    distill(str(pipe_dir), plan, tmp_path / "cut", resume=True, **kw)
    assert (tmp_path / "full" / "plugs.safetensors").read_bytes() == (tmp_path / "cut" / "plugs.safetensors").read_bytes()
    with pytest.raises(PPCLError, match="field 'output_loss_keep' Input should be greater than 0"):
        distill(str(pipe_dir), plan, tmp_path / "bad", **{**kw, "output_loss_keep": 0.0})
    assert not (tmp_path / "bad").exists()


def test_resume_is_bit_identical(tiny_pipe_dir, tmp_path):
    pipe_dir = tiny_pipe_dir["flux"]
    plan = write_plan(pipe_dir, "flux", tmp_path / "plan.json")
    kw = {**FAST, "steps": 7, "checkpoint_every": 2}
    distill(str(pipe_dir), plan, tmp_path / "full", **kw)
    # "killed" after step 5: the last checkpoint is step 4, step 5 is replayed on resume
    r = distill(str(pipe_dir), plan, tmp_path / "cut", stop_after=5, **kw)
    assert r.steps == 5 and not (tmp_path / "cut" / "plugs.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    distill(str(pipe_dir), plan, tmp_path / "cut", resume=True, **kw)
    a = (tmp_path / "full" / "plugs.safetensors").read_bytes()
    b = (tmp_path / "cut" / "plugs.safetensors").read_bytes()
    assert a == b
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_bad_resume_and_checkpoints_fail_cleanly(tiny_pipe_dir, tmp_path, capsys):
    pipe_dir = tiny_pipe_dir["flux"]
    plan = write_plan(pipe_dir, "flux", tmp_path / "plan.json")
    other = write_plan(pipe_dir, "flux", tmp_path / "other.json", intervals=[[1, 2]])
    # the old CLI defaults this test was written against (the defaults are now the pipeline's 2000-step run);
    # a warm-up shorter than the run, which the settings now require
    base = ["distill", "--model", str(pipe_dir), "--steps", "4", "--checkpoint-every", "2", "--n-samples", "4",
            "--batch-size", "2", "--lr", "1e-4", "--timesteps", "uniform", "--warmup-steps", "3",
            "--out", str(tmp_path / "run")]
    assert main([*base, "--plan", str(plan), "--stop-after", "3"]) == 0
    capsys.readouterr()
    # a different plan
    assert main([*base, "--plan", str(other), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different plan" in err and len(err.strip().splitlines()) == 1
    # an existing run without --resume
    assert main([*base, "--plan", str(plan)]) == 2
    assert "already exists" in capsys.readouterr().err
    # a truncated checkpoint (its shard file): found before the teacher loads
    ck = tmp_path / "run" / "checkpoints" / "step-000002" / "__0_0.distcp"
    ck.write_bytes(ck.read_bytes()[:100])
    assert main([*base, "--plan", str(plan), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "plugs.safetensors").exists()
    # a plan made for another model
    sd3_plan = write_plan(tiny_pipe_dir["sd3"], "sd3", tmp_path / "sd3.json")
    assert main(["distill", "--model", str(pipe_dir), "--plan", str(sd3_plan), "--out", str(tmp_path / "x")]) == 2
    assert "family" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_pipe_dir, tmp_path):
    pipe_dir = tiny_pipe_dir["sd3"]
    plan = write_plan(pipe_dir, "sd3", tmp_path / "plan.json", width=[])
    good = list(synthetic_batches(load_pipeline(pipe_dir), n_samples=2, batch_size=2, seed=0))[0]
    bad = {**good, "latents": torch.full_like(good["latents"], float("nan"))}
    # one epoch = [good, good, bad] in a seeded order: the NaN batch arrives within the first 3 steps
    with pytest.raises(PPCLError, match=r"loss is not finite at step \d+") as e:
        distill(str(pipe_dir), plan, tmp_path / "run", data=[good, dict(good), bad], checkpoint_every=1,
                **{**FAST, "steps": 6})
    step = int(str(e.value).split("at step ")[1].split(":")[0])
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts[-1] == f"step-{step - 1:06d}" if step > 1 else ckpts == []
    assert not (tmp_path / "run" / "plugs.safetensors").exists()
    assert not (tmp_path / "run" / "run.json").exists()


# ------------------------------------------------------------------------------------------------ text_freeze
#: per family: a text_freeze interval of dual blocks with a text stream of their own
TEXT_FREEZE = {"flux": [0, 3], "sd3": [1, 4], "qwenimage": [2, 5]}


def test_text_freeze_lsq_init_and_distillation_lower_heldout_loss(family, tiny_pipe_dir, tmp_path):
    pipe_dir = tiny_pipe_dir[family]
    a, b = TEXT_FREEZE[family]
    plan = write_plan(pipe_dir, family, tmp_path / "plan.json", intervals=[],
                      width=[{"op": "text_freeze", "interval": [a, b]}])
    pipe = load_pipeline(pipe_dir)
    heldout = list(synthetic_batches(pipe, n_samples=4, batch_size=2, seed=99))
    fit = list(synthetic_batches(pipe, n_samples=8, batch_size=2, seed=0))
    name = f"text_freeze_{a}_{b}"
    none = heldout_losses(str(pipe_dir), plan, heldout)  # no projection: text leaves b as it left a
    lsq = heldout_losses(str(pipe_dir), plan, heldout, lsq=fit)
    assert set(none) == {f"{name}/image", f"{name}/text"}
    # the least-squares projection at b explains most of what blocks a+1..b add to the text state
    assert lsq[f"{name}/text"] < 0.5 * none[f"{name}/text"], (none, lsq)
    run = tmp_path / "run"
    distill(str(pipe_dir), plan, run, **FAST)
    after = heldout_losses(str(pipe_dir), plan, heldout, run=run)
    # the unit's loss (image + text, what training minimises) is lower than with the initial copies
    assert after[f"{name}/text"] + after[f"{name}/image"] < none[f"{name}/text"] + none[f"{name}/image"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["plugs"][0]["members"] == list(range(a + 1, b + 1))


def test_text_freeze_bad_plans_fail_cleanly(tiny_pipe_dir, tmp_path, capsys):
    pipe_dir = tiny_pipe_dir["flux"]  # 4 dual blocks (0..3), then 6 single blocks (4..9)
    good = json.loads(write_plan(pipe_dir, "flux", tmp_path / "good.json", intervals=[[5, 8]], width=[]).read_text())
    capsys.readouterr()  # loading the pipeline may log (once per process) before the commands under test run
    cases = {"single": ([2, 5], "block 4 has no own text stream"), "negative": ([-1, 2], "out of range"),
             "beyond": ([1, 10], "out of range"), "empty": ([2, 2], "needs start < end")}
    for name, (iv, msg) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**good, "width": [{"op": "text_freeze", "interval": iv}]}))
        out = tmp_path / f"run-{name}"
        assert main(["distill", "--model", str(pipe_dir), "--plan", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists()
    # a depth interval crossing the end of a frozen text interval: refused at plan load, naming both
    overlap = tmp_path / "overlap.json"
    overlap.write_text(json.dumps({**good, "intervals": [[2, 3]], "plug_sources": [],
                                   "width": [{"op": "text_freeze", "interval": [0, 2]}]}))
    out = tmp_path / "run-overlap"
    assert main(["distill", "--model", str(pipe_dir), "--plan", str(overlap), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "depth interval [2, 3] crosses the end of width op text_freeze [0, 2]" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_plugs_inside_a_frozen_text_interval_follow_the_frozen_reference(tiny_pipe_dir):
    """At init (copies of teacher blocks), on held-out batches: a plug re-training block a in place (role source) is
    the teacher's block a, and its text target is tau, the text leaving a: both losses are 0. A plug inside the
    frozen interval (role member) returns tau as its text (no text loss) and is fed tau. A plug ending at b (role
    last) is compared with the teacher's text leaving b. The frozen unit keeps every block a+1..b."""
    from ppcl.distill import build_units

    pipe_dir = tiny_pipe_dir["qwenimage"]  # 10 dual blocks
    pipe = load_pipeline(pipe_dir)
    adapter = get_adapter(pipe)
    plan = make_plan(adapter, [[2, 2], [3, 4], [5, 6]], width=[{"op": "text_freeze", "interval": [2, 6]}])
    heldout = list(synthetic_batches(pipe, n_samples=2, batch_size=2, seed=99))
    losses = heldout_losses(str(pipe_dir), plan, heldout)
    assert losses["interval_0/image"] == pytest.approx(0.0, abs=1e-10)
    assert losses["interval_0/text"] == pytest.approx(0.0, abs=1e-10)
    assert "interval_1/text" not in losses and losses["interval_1/image"] > 1e-4
    assert losses["interval_2/text"] > 1e-4 and losses["text_freeze_2_6/text"] > 1e-4
    units = {u.name: u for u in build_units(adapter, plan)}
    assert units["text_freeze_2_6"].members == [3, 4, 5, 6]
    assert "ppcl_proj" in units["interval_2"].module._modules and "ppcl_proj" not in units["interval_1"].module._modules


def test_distill_from_encoded_cache(tiny_pipe_dir, tmp_path):
    """The real data path: synth images -> shards -> the teacher's encoders -> cache -> distill(data=CACHE)."""
    from ppcl.data.cache import iter_cache_batches
    from ppcl.data.encode import encode_shards
    from ppcl.data.shard import shard_source
    from ppcl.data.synth import write_synth

    pipe_dir = tiny_pipe_dir["flux"]
    write_synth(tmp_path / "src", 8, size=32)
    shard_source(str(tmp_path / "src"), str(tmp_path / "shards"), 2, progress=False)
    cache = tmp_path / "cache"
    encode_shards(str(pipe_dir), str(tmp_path / "shards"), str(cache), resolution=32, batch_size=4, progress=False)
    plan = write_plan(pipe_dir, "flux", tmp_path / "plan.json", intervals=[[1, 2]],
                      width=[{"op": "ffn_linear", "block": 3, "stream": "image"}])
    run = tmp_path / "run"
    distill(str(pipe_dir), plan, run, data=cache, **{**FAST, "steps": 8, "lsq_batches": 2})
    meta = json.loads((run / "run.json").read_text())
    assert meta["data"] == str(cache) and meta["steps"] == 8
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 9))
    assert all(l["loss"] == pytest.approx(sum(l["losses"].values()), rel=1e-5) for l in lines)  # the objective
    batches = list(iter_cache_batches(str(cache), 4))
    before = heldout_losses(str(pipe_dir), plan, batches)
    after = heldout_losses(str(pipe_dir), plan, batches, run=run)
    assert sum(v for k, v in after.items() if k.startswith("interval_0/")) < sum(
        v for k, v in before.items() if k.startswith("interval_0/"))


def test_uncond_ratio_trains_on_the_negative_prompt_the_cache_stores(tiny_pipe_dir, tmp_path):
    """``ppcl encode`` stores the family's negative prompt's text tensors (verified like a shard); with
    ``uncond_ratio`` a share of each step's rows get them in place of their caption's, drawn after the noise, so the
    latents, noise and timesteps are those of a run without it; caches without them and lists of batches are
    one-line errors."""
    from ppcl.arch import generation_defaults
    from ppcl.data.cache import iter_cache_batches, read_cache_manifest, read_uncond
    from ppcl.data.encode import encode_shards
    from ppcl.data.shard import shard_source
    from ppcl.data.synth import write_synth
    from ppcl.distill import DistillSettings
    from ppcl.distill.streams import step_inputs, training_uncond

    pipe_dir = tiny_pipe_dir["flux"]
    write_synth(tmp_path / "src", 8, size=32)
    shard_source(str(tmp_path / "src"), str(tmp_path / "shards"), 2, progress=False)
    cache = tmp_path / "cache"
    encode_shards(str(pipe_dir), str(tmp_path / "shards"), str(cache), resolution=32, batch_size=4, progress=False)
    pipe = load_pipeline(pipe_dir)
    adapter = get_adapter(pipe)
    prompt, uncond = read_uncond(cache)
    assert prompt == adapter.negative_prompt == "" and set(uncond) == {"prompt_embeds", "pooled_prompt_embeds"}
    length = generation_defaults(pipe_dir).get("max_sequence_length")
    with torch.inference_mode():
        want = adapter.encode_prompts(pipe, [""], **({} if length is None else {"max_sequence_length": length}))
    for k, v in want.items():  # stored in float16 like the captions' tensors
        assert uncond[k].shape == v.shape[1:] and torch.equal(uncond[k], v[0].half().float()), k
    batch = next(iter_cache_batches(str(cache), 4))
    assert uncond["prompt_embeds"].shape == batch["prompt_embeds"].shape[1:]

    device = torch.device("cpu")
    plain = step_inputs(pipe, adapter, DistillSettings(), device, torch.float32, 0)
    half = DistillSettings(uncond_ratio=0.5)
    assert training_uncond(pipe, adapter, None, DistillSettings()) is None
    swapped = step_inputs(pipe, adapter, half, device, torch.float32, 0, uncond=training_uncond(pipe, adapter, cache,
                                                                                               half))
    dropped = kept = 0
    for step in range(6):
        a, b = plain(batch, step), swapped(batch, step)
        assert torch.equal(a["hidden_states"], b["hidden_states"]) and torch.equal(a["timestep"], b["timestep"])
        for r in range(4):
            if torch.equal(a["encoder_hidden_states"][r], b["encoder_hidden_states"][r]):
                kept += 1
                assert torch.equal(a["pooled_projections"][r], b["pooled_projections"][r])
            else:
                dropped += 1
                assert torch.equal(b["encoder_hidden_states"][r], uncond["prompt_embeds"])
                assert torch.equal(b["pooled_projections"][r], uncond["pooled_prompt_embeds"])
        assert torch.equal(b["encoder_hidden_states"], swapped(batch, step)["encoder_hidden_states"])  # seeded
    assert dropped > 4 and kept > 4, (dropped, kept)

    plan = write_plan(pipe_dir, "flux", tmp_path / "plan.json", intervals=[[1, 2]], width=[])
    distill(str(pipe_dir), plan, tmp_path / "run", data=cache, **{**FAST, "steps": 3, "uncond_ratio": 0.2})
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["uncond_ratio"] == 0.2
    # the built-in set: the negative prompt through the pipeline's own encoders
    synth = training_uncond(pipe, adapter, None, half)
    assert torch.allclose(synth["prompt_embeds"], want["prompt_embeds"][0].float())
    assert not synth["prompt_embeds"].is_inference()
    distill(str(pipe_dir), plan, tmp_path / "synth", **{**FAST, "steps": 3, "uncond_ratio": 0.5})
    with pytest.raises(PPCLError, match="^uncond_ratio > 0 needs the negative prompt's embeddings: train on a latent"):
        distill(str(pipe_dir), plan, tmp_path / "list", data=[batch], **{**FAST, "uncond_ratio": 0.2})
    (cache / "uncond.safetensors").write_bytes(b"x" * (cache / "uncond.safetensors").stat().st_size)
    with pytest.raises(PPCLError, match=r"uncond\.safetensors: sha256 differs from the cache manifest"):
        read_uncond(cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["uncond"]  # a cache written before the negative prompt was stored
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert read_cache_manifest(str(cache)).uncond is None
    with pytest.raises(PPCLError, match=r"holds no negative-prompt embeddings .* re-run `ppcl encode`"):
        distill(str(pipe_dir), plan, tmp_path / "old", data=cache, **{**FAST, "uncond_ratio": 0.2})
    assert not (tmp_path / "old").exists() and not (tmp_path / "list").exists()
    distill(str(pipe_dir), plan, tmp_path / "old0", data=cache, **{**FAST, "steps": 3})  # ratio 0: still trains


def test_with_uncond_pads_a_differing_text_length_like_collate():
    """Qwen-Image's text length differs between encodings: the swapped rows and the batch are zero-padded to the
    longer, masks with 0 (masked), as :func:`ppcl.data.cache.collate` pads."""
    from ppcl.data.cache import with_uncond

    batch = {"latents": torch.ones(3, 2), "prompt_embeds": torch.ones(3, 4, 2),
             "prompt_embeds_mask": torch.ones(3, 4, dtype=torch.long)}
    short = {"prompt_embeds": torch.full((2, 2), 7.0), "prompt_embeds_mask": torch.ones(2, dtype=torch.long)}
    out = with_uncond(batch, torch.tensor([False, True, False]), short)
    assert out["prompt_embeds"].shape == (3, 4, 2) and torch.equal(out["latents"], batch["latents"])
    assert out["prompt_embeds_mask"][1].tolist() == [1, 1, 0, 0] and out["prompt_embeds"][1, 2:].abs().sum() == 0
    assert out["prompt_embeds"][1, :2].eq(7).all() and out["prompt_embeds_mask"][0].tolist() == [1, 1, 1, 1]
    long = {"prompt_embeds": torch.full((6, 2), 7.0), "prompt_embeds_mask": torch.ones(6, dtype=torch.long)}
    out = with_uncond(batch, torch.tensor([True, False, False]), long)
    assert out["prompt_embeds_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert with_uncond(batch, torch.zeros(3, dtype=torch.bool), long) is batch


def test_sequential_mode_runs_with_plugs_inside_a_frozen_text_interval(tiny_pipe_dir, tmp_path):
    """The ablation with a composed plan: the student holds the source plug [2, 2], the frozen plug [3, 4] and the
    kept frozen blocks 5, 6 (the one at b = 6 carries the text loss); every unit gets a loss. At step 1 the source
    plug is still block 2 fed the teacher's state (nothing before it is replaced): its losses are 0."""
    pipe_dir = tiny_pipe_dir["qwenimage"]
    plan = write_plan(pipe_dir, "qwenimage", tmp_path / "plan.json", intervals=[[2, 2], [3, 4]],
                      width=[{"op": "text_freeze", "interval": [2, 6]}])
    run = tmp_path / "run"
    distill(str(pipe_dir), plan, run, mode="sequential", **{**FAST, "steps": 2, "warmup_steps": 1, "n_samples": 2})
    first, last = (json.loads(l)["losses"] for l in (run / "metrics.jsonl").read_text().splitlines())
    assert set(last) == {"interval_0/image", "interval_0/text", "interval_1/image", "text_freeze_2_6/image",
                         "text_freeze_2_6/text"}
    assert first["interval_0/image"] == pytest.approx(0.0, abs=1e-10)
    assert first["interval_0/text"] == pytest.approx(0.0, abs=1e-10)
    assert first["interval_1/image"] > 1e-4 and first["text_freeze_2_6/text"] > 1e-4


def _composed_plan_batch(tiny_pipe_dir):
    """A tiny Qwen-Image with a composed plan (a source plug, a plug inside a frozen text interval, the
    text_freeze unit's member blocks): ``(adapter, units, their parameters, one batch's model inputs)``."""
    from ppcl.calibration import noise_batch
    from ppcl.distill import build_units
    from ppcl.plugs import freeze

    pipe_dir = tiny_pipe_dir["qwenimage"]
    pipe = load_pipeline(pipe_dir)
    adapter = get_adapter(pipe)
    freeze(adapter.transformer)
    plan = make_plan(adapter, [[2, 2], [3, 4]], width=[{"op": "text_freeze", "interval": [2, 6]}], allow_ends=True)
    units = build_units(adapter, plan)
    params = [p for u in units for p in u.module.parameters()]
    batch = list(synthetic_batches(pipe, n_samples=2, batch_size=2, seed=5))[0]
    inputs = noise_batch(adapter, dict(pipe.scheduler.config), batch, generator=torch.Generator().manual_seed(1)
                         ).model_inputs
    return adapter, units, params, inputs


def test_per_plug_backward_gives_the_gradients_of_one_backward(tiny_pipe_dir):
    """Each unit's loss backpropagated as soon as it exists (then the output-level term) accumulates exactly the
    gradients of one backward of the total: same losses, same gradient for every trainable tensor (a composed plan:
    a source plug, a plug inside a frozen text interval, the text_freeze unit's member blocks, the output term)."""
    from ppcl.distill import DistillSettings, nonsequential_losses
    from ppcl.distill.losses import total_loss

    adapter, units, params, inputs = _composed_plan_batch(tiny_pipe_dir)
    settings = DistillSettings(output_loss_weight=0.5)

    losses, out = nonsequential_losses(adapter, inputs, units, settings, step=3)
    total_loss(losses, out, 0.5).backward()
    once = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    per_losses, per_out = nonsequential_losses(adapter, inputs, units, settings, step=3,
                                               backward=lambda loss: loss.backward())
    assert all(not v.requires_grad for per in per_losses.values() for v in per.values())  # logged, detached
    assert float(per_out) == float(out.detach()) and float(total_loss(per_losses, per_out, 0.5)) == pytest.approx(
        float(total_loss(losses, out, 0.5).detach()), rel=1e-6)
    assert len(once) > 20 and all(p.grad is not None for p in params)
    for g, p in zip(once, params):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-8), float((p.grad - g).abs().max())
    assert any(float(g.abs().max()) > 0 for g in once)


def test_output_loss_sequential_adds_the_whole_plan_students_losses(tiny_pipe_dir):
    """``output_loss_sequential=w``: the step's gradients are those of one backward of the teacher-forced losses +
    the weighted output term + ``w`` x the sequential ablation's losses (each unit at its end in the whole-plan
    student); those are logged as ``<stream>@plan``, already weighted (a composed plan: a source plug, a plug
    inside a frozen text interval, the text_freeze unit's member blocks). Without the output term it is refused."""
    from ppcl.distill import DistillSettings, nonsequential_losses, sequential_losses
    from ppcl.distill.losses import total_loss
    from ppcl.settings import validate_settings

    adapter, units, params, inputs = _composed_plan_batch(tiny_pipe_dir)

    plain, out = nonsequential_losses(adapter, inputs, units, DistillSettings(output_loss_weight=0.5), step=3)
    seq, _ = sequential_losses(adapter, inputs, units, DistillSettings(mode="sequential"))
    expected = total_loss(plain, out, 0.5) + 0.25 * total_loss(seq, None, 0.0)
    expected.backward()
    once = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    got, got_out = nonsequential_losses(adapter, inputs, units,
                                        DistillSettings(output_loss_weight=0.5, output_loss_sequential=0.25), step=3,
                                        backward=lambda loss: loss.backward())
    assert {(n, f"{s}@plan") for n, per in seq.items() for s in per} | {(n, s) for n, per in plain.items()
                                                                        for s in per} \
        == {(n, s) for n, per in got.items() for s in per}
    for n, per in seq.items():
        for s, v in per.items():
            assert float(got[n][f"{s}@plan"]) == pytest.approx(0.25 * float(v.detach()), rel=1e-5)
    assert float(total_loss(got, got_out, 0.5)) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert all(p.grad is not None for p in params)
    for g, p in zip(once, params):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7), float((p.grad - g).abs().max())
    # the sequential losses change the gradients: the plugs after the first see what the first one made
    for p in params:
        p.grad = None
    nonsequential_losses(adapter, inputs, units, DistillSettings(output_loss_weight=0.5), step=3,
                         backward=lambda loss: loss.backward())
    assert any(not torch.allclose(p.grad, g) for p, g in zip(params, once))
    with pytest.raises(PPCLError, match="output_loss_sequential' needs output_loss_weight > 0"):
        validate_settings(DistillSettings, {"output_loss_sequential": 1.0})
    with pytest.raises(PPCLError, match="output_loss_sequential' is for mode nonsequential"):
        validate_settings(DistillSettings, {"output_loss_sequential": 1.0, "output_loss_weight": 1.0,
                                            "mode": "sequential"})


@pytest.mark.parametrize("family", ["flux", "sd3", "qwenimage"])
def test_student_forward_starts_at_the_first_unit_with_the_same_output(family, tiny_pipe_dir):
    """The output-level term's student does not run the blocks before its first unit again: they are the
    teacher's blocks on the teacher's states, so the forward starts from the call the teacher pass captured there.
    Same output bit for bit and the same gradients as the full student forward, and the prefix blocks never run
    (a flux plan crossing from the dual to the single list, sd3's last block, a qwen text_freeze)."""
    from ppcl.calibration import noise_batch
    from ppcl.distill import build_units
    from ppcl.distill.losses import output_loss, student_forward, teacher_pass
    from ppcl.plugs import freeze

    pipe = load_pipeline(tiny_pipe_dir[family])
    adapter = get_adapter(pipe)
    freeze(adapter.transformer)
    intervals, width = {"flux": ([[2, 3], [5, 8]], []), "sd3": ([[3, 4], [7, 9]], []),
                        "qwenimage": ([[4, 5]], [{"op": "text_freeze", "interval": [2, 6]}])}[family]
    units = build_units(adapter, make_plan(adapter, intervals, width=width, allow_ends=True))
    first = min(u.start for u in units)
    assert first >= 2
    batch = list(synthetic_batches(pipe, n_samples=2, batch_size=2, seed=5))[0]
    inputs = noise_batch(adapter, dict(pipe.scheduler.config), batch, generator=torch.Generator().manual_seed(1)
                         ).model_inputs
    calls, _, teacher_out = teacher_pass(adapter, inputs, units, full=True)
    params = [p for u in units for p in u.module.parameters()]

    ran = []
    handles = [adapter.block(l).register_forward_hook(lambda *a, l=l: ran.append(l)) for l in range(first)]
    grads = []
    for kw in ({}, {"teacher_calls": calls}):
        ran.clear()
        out, _ = student_forward(adapter, inputs, units, capture=False, **kw)
        output_loss(out, teacher_out).backward()
        grads.append((out.detach(), [None if p.grad is None else p.grad.clone() for p in params], sorted(set(ran))))
        for p in params:
            p.grad = None
    for h in handles:
        h.remove()
    (full_out, full_g, full_ran), (skip_out, skip_g, skip_ran) = grads
    assert full_ran == list(range(first)) and skip_ran == []
    assert torch.equal(full_out, skip_out)
    assert [g is None for g in full_g] == [g is None for g in skip_g]
    assert all(a is None or torch.equal(a, b) for a, b in zip(full_g, skip_g))
    assert any(g is not None and float(g.abs().max()) > 0 for g in full_g)


def test_output_loss_takes_turns_with_the_exported_subsets(tiny_pipe_dir, tmp_path):
    """``output_loss_ratios``: the output-level term alternates between the whole plan and the subset export
    --keep-params picks at each ratio (the same rule, so the model trained in turn IS the exported one); an
    unreachable ratio and the combination with random subsets are one-line errors before training."""
    from ppcl.distill import build_units, export_placements
    from ppcl.export import export
    from ppcl.subsets import subset_accounting

    pipe_dir = tiny_pipe_dir["flux"]
    adapter = get_adapter(load_pipeline(pipe_dir))
    plan_path = write_plan(pipe_dir, "flux", tmp_path / "plan.json", intervals=[[1, 2], [5, 8]], width=[])
    from ppcl.plan import load_plan

    units = build_units(adapter, load_plan(plan_path))
    teacher, width_saving, savings = subset_accounting(adapter, units)
    only_long = (teacher - savings[1]) / teacher  # the subset keeping just the [5, 8] plug
    ratio = only_long + 1e-6
    turns = export_placements(adapter, units, [ratio, 1e-3 + (teacher - sum(savings.values())) / teacher])
    assert [[u.name for u in p] for p in turns] == [["interval_0", "interval_1"], ["interval_1"]]  # no repeat
    with pytest.raises(PPCLError, match=r"^output_loss_ratios: --keep-params 0.01 is out of reach"):
        export_placements(adapter, units, [0.01])

    run = tmp_path / "run"
    distill(str(pipe_dir), plan_path, run, **{**FAST, "steps": 4, "output_loss_weight": 0.5,
                                               "output_loss_ratios": [ratio]})
    alone = tmp_path / "alone"
    distill(str(pipe_dir), plan_path, alone, **{**FAST, "steps": 4, "output_loss_weight": 0.5})
    turned = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    every = [json.loads(l) for l in (alone / "metrics.jsonl").read_text().splitlines()]
    assert turned[0]["output_loss"] == pytest.approx(every[0]["output_loss"], rel=1e-6)  # step 0: whole plan
    assert turned[1]["output_loss"] != pytest.approx(every[1]["output_loss"], rel=1e-3)  # step 1: [5, 8] alone
    assert export(str(pipe_dir), plan_path, run, tmp_path / "m", keep_params=ratio).intervals == [1]
    with pytest.raises(PPCLError, match="output_loss_ratios.*not both"):
        distill(str(pipe_dir), plan_path, tmp_path / "bad", **{**FAST, "output_loss_weight": 0.5,
                                                                 "output_loss_ratios": [ratio], "output_loss_keep": 0.5})
    with pytest.raises(PPCLError, match="output_loss_ratios.*needs output_loss_weight > 0"):
        distill(str(pipe_dir), plan_path, tmp_path / "bad", **{**FAST, "output_loss_ratios": [ratio]})
    assert not (tmp_path / "bad").exists()


def test_ema_plugs_are_the_average_and_resume_exactly(tiny_pipe_dir, tmp_path):
    """``ema_decay``: plugs.safetensors holds the moving average of the weights (checked against the average
    recomputed from every step's weights, read from per-step checkpoints), the losses logged are the trained
    weights' (the same as without EMA), and a run cut and resumed writes the same bytes (the average is in the
    checkpoint)."""
    from safetensors.torch import load_file

    from ppcl.distill.checkpoint import checkpoint_dirs

    pipe_dir = tiny_pipe_dir["flux"]
    plan = write_plan(pipe_dir, "flux", tmp_path / "plan.json", intervals=[[1, 2]], width=[])
    kw = {**FAST, "steps": 5, "checkpoint_every": 1, "keep_checkpoints": 10}
    distill(str(pipe_dir), plan, tmp_path / "raw", **kw)
    distill(str(pipe_dir), plan, tmp_path / "ema", ema_decay=0.5, **kw)
    raw = [json.loads(l)["losses"] for l in (tmp_path / "raw" / "metrics.jsonl").read_text().splitlines()]
    ema = [json.loads(l)["losses"] for l in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert raw == ema  # EMA never feeds back into training
    # the average recomputed from the raw run's initial weights and its per-step checkpoints (DCP folders)
    import torch.distributed.checkpoint as dcp

    from ppcl.distill import build_units
    from ppcl.plan import load_plan

    adapter = get_adapter(load_pipeline(pipe_dir))
    init = {f"{u.name}.{k}": v.detach().float() for u in build_units(adapter, load_plan(plan))
            for k, v in u.module.state_dict().items()}
    weights = []
    for ck in checkpoint_dirs(tmp_path / "raw"):
        state = {"model": {k: torch.empty_like(v) for k, v in init.items()}}
        dcp.load(state, checkpoint_id=str(ck), no_dist=True)
        weights.append(state["model"])
    assert len(weights) == 5
    avg = dict(init)
    for step, w in enumerate(weights):
        d = min(0.5, (1 + step) / (10 + step))
        avg = {k: d * avg[k] + (1 - d) * w[k] for k in avg}
    got = load_file(str(tmp_path / "ema" / "plugs.safetensors"))
    last = load_file(str(tmp_path / "raw" / "plugs.safetensors"))
    assert max(float((got[k] - avg[k]).abs().max()) for k in avg) < 1e-6
    assert max(float((got[k] - last[k]).abs().max()) for k in avg) > 1e-5
    # killed after step 4 (last checkpoint 3), resumed: the same bytes
    kw2 = {**FAST, "steps": 5, "checkpoint_every": 3, "ema_decay": 0.5}
    distill(str(pipe_dir), plan, tmp_path / "full", **kw2)
    distill(str(pipe_dir), plan, tmp_path / "cut", stop_after=4, **kw2)
    distill(str(pipe_dir), plan, tmp_path / "cut", resume=True, **kw2)
    assert (tmp_path / "full" / "plugs.safetensors").read_bytes() == (tmp_path / "cut" / "plugs.safetensors").read_bytes()


def test_distill_many_shares_the_teacher_pass_and_matches_separate_runs(tiny_pipe_dir, tmp_path):
    """Runs in lockstep with one teacher pass per step write what each writes alone, byte for byte: different
    plans, a width op, sequential mode, the output-level term with and without turns, one not needing the teacher's
    output at all. Runs that cannot share a pass are one-line errors."""
    from ppcl.distill import DistillSettings, distill_many

    pipe_dir = tiny_pipe_dir["flux"]
    a = write_plan(pipe_dir, "flux", tmp_path / "a.json", intervals=[[1, 2], [5, 8]], width=[])
    b = write_plan(pipe_dir, "flux", tmp_path / "b.json", intervals=[[0, 1]])
    base = {k: v for k, v in FAST.items() if k != "progress"} | {"steps": 4}
    runs = {
        "turns": (a, {"output_loss_weight": 0.5, "output_loss_ratios": [0.9]}),
        "width": (b, {}),
        "sequential": (a, {"mode": "sequential", "output_loss_weight": 1.0}),
        "whole": (a, {"output_loss_weight": 0.5}),
    }
    for name, (plan, kw) in runs.items():
        distill(str(pipe_dir), plan, tmp_path / "alone" / name, progress=False, **base, **kw)
    results = distill_many(str(pipe_dir), [(plan, tmp_path / "many" / name, DistillSettings(**base, **kw))
                                           for name, (plan, kw) in runs.items()], progress=False)
    assert [r.steps for r in results] == [4] * 4
    for name in runs:
        alone, many = tmp_path / "alone" / name, tmp_path / "many" / name
        assert (alone / "plugs.safetensors").read_bytes() == (many / "plugs.safetensors").read_bytes(), name
        strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "step_time_s"}  # noqa: E731
                           for l in (p / "metrics.jsonl").read_text().splitlines()]
        assert strip(alone) == strip(many), name

    with pytest.raises(PPCLError, match=r"^distill_many: run 2 \(.*s1\) has seed 1, run 1 0: .* same batches and"):
        distill_many(str(pipe_dir), [(a, tmp_path / "s0", DistillSettings(**base)),
                                     (a, tmp_path / "s1", DistillSettings(**base | {"seed": 1}))], progress=False)
    with pytest.raises(PPCLError, match=r"^distill_many: run 2 .* has steps 5, run 1 4: .* the same steps$"):
        distill_many(str(pipe_dir), [(a, tmp_path / "t0", DistillSettings(**base)),
                                     (a, tmp_path / "t1", DistillSettings(**base | {"steps": 5}))], progress=False)
    assert not any((tmp_path / n).exists() for n in ("s0", "s1", "t0", "t1"))  # refused before anything is written
    # the per-step check behind it: data given as two different in-memory sets (same settings) -> other inputs
    batches = list(synthetic_batches(load_pipeline(pipe_dir), n_samples=4, batch_size=2, seed=0))
    import ppcl.distill.train as T

    real = T.Session.inputs
    T.Session.inputs = lambda self, step: {**real(self, step), "timestep": real(self, step)["timestep"] * (
        1 if self.run.name == "u0" else 0.5)}
    try:
        with pytest.raises(PPCLError, match=r"^distill_many: run 2 .* draws other inputs than run 1 at step 1"):
            distill_many(str(pipe_dir), [(a, tmp_path / "u0", DistillSettings(**base)),
                                         (a, tmp_path / "u1", DistillSettings(**base))], data=batches, progress=False)
    finally:
        T.Session.inputs = real
    assert not (tmp_path / "u0" / "plugs.safetensors").exists()


def test_output_loss_every_step_sums_the_turns_terms_and_their_gradients(tiny_pipe_dir):
    """``output_loss_schedule="every_step"``: on one batch the term is the sum of the terms the turns take on
    consecutive steps (the whole plan, then the subset exported at the ratio), and its gradients are the sum of
    theirs, each student backpropagated before the next runs."""
    from ppcl.calibration import noise_batch
    from ppcl.distill import DistillSettings, build_units, export_placements, nonsequential_losses
    from ppcl.plugs import freeze
    from ppcl.subsets import subset_accounting

    pipe_dir = tiny_pipe_dir["flux"]
    pipe = load_pipeline(pipe_dir)
    adapter = get_adapter(pipe)
    freeze(adapter.transformer)
    units = build_units(adapter, make_plan(adapter, [[1, 2], [5, 8]], allow_ends=True))
    teacher, _, savings = subset_accounting(adapter, units)
    ratio = (teacher - savings[1]) / teacher + 1e-6  # the subset keeping only the [5, 8] plug
    assert len(export_placements(adapter, units, [ratio])) == 2
    params = [p for u in units for p in u.module.parameters()]
    batch = list(synthetic_batches(pipe, n_samples=2, batch_size=2, seed=5))[0]
    inputs = noise_batch(adapter, dict(pipe.scheduler.config), batch, generator=torch.Generator().manual_seed(1)
                         ).model_inputs

    def run(schedule, step, weight=0.5):
        for p in params:
            p.grad = None
        s = DistillSettings(output_loss_weight=weight, output_loss_ratios=[ratio] if weight else [],
                            output_loss_schedule=schedule)
        _, out = nonsequential_losses(adapter, inputs, units, s, step=step, backward=lambda l: l.backward())
        return (None if out is None else float(out)), [p.grad.clone() for p in params]

    whole, g_whole = run("turns", 0)
    subset, g_subset = run("turns", 1)
    both, g_both = run("every_step", 0)
    _, g_d = run("turns", 0, weight=0.0)  # the D terms alone (the same in every run: same batch)
    assert whole != pytest.approx(subset, rel=1e-3)
    assert both == pytest.approx(whole + subset, rel=1e-6)
    for gb, gw, gs, gd in zip(g_both, g_whole, g_subset, g_d):
        assert torch.allclose(gb, gw + gs - gd, rtol=1e-4, atol=1e-7), float((gb - (gw + gs - gd)).abs().max())
    assert any(not torch.allclose(gb, gw) for gb, gw in zip(g_both, g_whole))
