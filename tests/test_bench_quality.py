"""``ppcl bench quality``: the smoke table runs end to end on the reference teacher and writes its files."""

from __future__ import annotations

import json

import pytest

from ppcl.cli import main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "quality"
    assert main(["bench", "quality", "--smoke", "--out", str(out), "--no-keep-work"]) == 0
    return out


def test_smoke_table_has_every_row_and_column(smoke):
    result = json.loads((smoke / "quality.json").read_text())
    rows = result["rows"]
    assert rows[0]["name"] == "teacher" and rows[0]["params_ratio"] == 1.0
    for ratio in (0.7, 0.5):
        names = [r["name"] for r in rows if r["ratio"] == ratio]
        assert names == ["ppcl", "no-distill", "shortgpt", "scattered", "per-ratio"]
        for r in rows:
            if r["ratio"] != ratio:
                continue
            assert 0 <= r["judge_accuracy"] <= 1 and r["judge_fid"] >= 0 and r["latency_ratio"] > 0
            assert r["latent_psnr_db"] is not None and r["latent_psnr_db"] > 0
            # same budget: every row at or under the ratio, except the scattered ablation at the low ratio,
            # which matches ppcl's NUMBER of removed blocks instead (recorded in its note)
            if not (r["name"] == "scattered" and ratio == 0.5):
                assert r["params_ratio"] <= ratio
            if r["name"] != "ppcl":
                assert set(r["beats_ppcl"]) == {"judge_accuracy", "judge_fid"}
                assert r["judge_fid_diff_se"] >= 0
                # FID beats ppcl only by more than the SE of the difference
                ppcl_fid = next(x["judge_fid"] for x in rows if x["name"] == "ppcl" and x["ratio"] == ratio)
                assert r["beats_ppcl"]["judge_fid"] == (r["judge_fid"] < ppcl_fid - r["judge_fid_diff_se"])
                assert r["judge_accuracy_diff_se"] >= 0
    # no distillation keeps exactly ppcl's intervals and parameter count
    for ratio in (0.7, 0.5):
        p = next(r for r in rows if r["name"] == "ppcl" and r["ratio"] == ratio)
        n = next(r for r in rows if r["name"] == "no-distill" and r["ratio"] == ratio)
        assert (n["intervals"], n["parameters"]) == (p["intervals"], p["parameters"])
    # ppcl's plan was selected for both ratios (score output, serve "plan"); its 0.7 model is the size rule's subset
    # of it, so no subset is recorded
    plan = result["plans"]["ppcl"]
    assert result["settings"]["score"] == "output" and result["seconds"]["trained_probe"] > 0
    assert result["settings"]["serve"] == "plan" and plan["serves"] == {}
    at_07 = next(r for r in rows if r["name"] == "ppcl" and r["ratio"] == 0.7)
    assert at_07["intervals"] and all(iv in plan["intervals"] for iv in at_07["intervals"])
    assert set(result["targets"]) == {"ppcl_within_3pct_at_low", "ppcl_beats_all", "one_run_within_1pt"}
    assert result["settings"]["uncond_ratio"] == 0.1  # the evaluation runs true CFG: every run trains that branch
    assert not (smoke / "work").exists()


def test_smoke_writes_markdown_and_plot(smoke):
    md = (smoke / "quality.md").read_text()
    assert md.startswith("| ratio | row | params |")
    assert "| 0.5 | ppcl |" in md and "Targets:" in md and "judge-FID (± SE of the difference to ppcl)" in md
    assert "(±" in md and "judge acc. (± SE of the difference to ppcl)" in md
    assert (smoke / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_steps_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", "quality", "--smoke", "--steps", "0", "--out", str(tmp_path / "q")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_pipeline_generation_defaults_set_text_length(tiny_pipe_dir, tmp_path):
    """A ``ppcl.json`` beside model_index.json sets the text length of the built-in calibration set; the
    reference teacher ships one (16 tokens, 32 px, true CFG 3); a malformed one is a one-line error."""
    import shutil

    from ppcl.arch import generation_defaults, load_pipeline
    from ppcl.bench import REFERENCE_TEACHER
    from ppcl.calibration import synthetic_batches
    from ppcl.errors import PPCLError

    assert generation_defaults(REFERENCE_TEACHER) == {"height": 32, "width": 32, "steps": 10,
                                                      "max_sequence_length": 16, "guidance": 3.0}
    pipe_dir = tmp_path / "pipe"
    shutil.copytree(tiny_pipe_dir["flux"], pipe_dir)
    (pipe_dir / "ppcl.json").write_text(json.dumps({"version": 1, "generation": {"max_sequence_length": 7}}))
    pipe = load_pipeline(pipe_dir)
    batch = next(synthetic_batches(pipe, n_samples=2, batch_size=2, resolution=32))
    assert batch["prompt_embeds"].shape[1] == 7
    batch = next(synthetic_batches(pipe, n_samples=2, batch_size=2, resolution=32, max_sequence_length=5))
    assert batch["prompt_embeds"].shape[1] == 5  # an explicit setting wins
    (pipe_dir / "ppcl.json").write_text(json.dumps({"generation": {"max_sequence_length": 0}}))
    with pytest.raises(PPCLError, match="generation.max_sequence_length"):
        generation_defaults(pipe_dir)


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "0", "--lr must be a positive number"),
    ("--output-loss-weight", "-1", "--output-loss-weight must be >= 0"),
    ("--output-loss-keep", "0", "--output-loss-keep must be in (0, 1]"),
    ("--output-loss-sequential", "-1", "--output-loss-sequential must be >= 0"),
    ("--eval-n", "1", "--eval-n must be >= 2"),
    ("--uncond-ratio", "1", "--uncond-ratio must be in [0, 1)"),
    ("--train-seed", "-1", "--train-seed must be >= 0"),
    ("--rows", "ppcl,nope", "--rows: unknown row 'nope'"),
])
def test_bad_training_flags_are_one_line_errors(tmp_path, capsys, flag, value, message):
    assert main(["bench", "quality", "--smoke", flag, value, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_fid_difference_se_is_the_spread_of_the_paired_difference():
    import numpy as np

    from ppcl.bench.judge import fid_difference_se
    from ppcl.errors import PPCLError
    from ppcl.evaluate.fid import frechet_distance

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(512, 8))
    near = ref + 0.3 * rng.normal(size=ref.shape)
    far = ref + 0.3 * rng.normal(size=ref.shape) + 0.5  # a mean shift of 0.5 in every feature: FID + 2.0

    def fid(x):
        return frechet_distance(x.mean(0), np.cov(x, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))

    assert fid_difference_se(near, near, ref) == 0.0  # the same model: no spread at all
    se = fid_difference_se(far, near, ref)
    gap = fid(far) - fid(near)
    assert 1.8 < gap < 2.2 and 0 < se < gap / 5  # a clear gap, measured as clear
    # two models of the same quality: the difference is within a few SE
    other = ref + 0.3 * rng.normal(size=ref.shape)
    assert abs(fid(other) - fid(near)) < 3 * fid_difference_se(other, near, ref)
    with pytest.raises(PPCLError, match="same length"):
        fid_difference_se(near[:10], near, ref)


def test_accuracy_difference_se_matches_a_paired_bootstrap():
    import numpy as np

    from ppcl.bench.judge import accuracy_difference_se
    from ppcl.errors import PPCLError

    rng = np.random.default_rng(0)
    n = 512
    checks = rng.integers(1, 5, n)
    hard = rng.random(n) < 0.1  # captions both models tend to miss: the pairing cancels them
    a = np.array([rng.binomial(c, 0.5 if h else 0.99) for c, h in zip(checks, hard)])
    b = np.array([rng.binomial(c, 0.5 if h else 0.97) for c, h in zip(checks, hard)])
    assert accuracy_difference_se(a, a, checks) == 0.0  # the same model: no spread at all
    se = accuracy_difference_se(a, b, checks)
    boot = []
    for _ in range(2000):
        i = rng.integers(0, n, n)
        boot.append(a[i].sum() / checks[i].sum() - b[i].sum() / checks[i].sum())
    assert abs(se - np.std(boot, ddof=1)) < 0.1 * se
    # paired: smaller than the unpaired SE of the two accuracies, which the hard captions inflate
    unpaired = np.sqrt(sum(np.var(x / checks.mean(), ddof=1) for x in (a, b)) / n)
    assert se < unpaired
    with pytest.raises(PPCLError, match="same length"):
        accuracy_difference_se(a[:10], b, checks)
    with pytest.raises(PPCLError, match="0..checks"):
        accuracy_difference_se(checks + 1, b, checks)


def test_a_lower_fid_beats_ppcl_only_beyond_the_standard_error():
    import numpy as np

    from ppcl.bench.quality import Row, compare_with_ppcl
    from ppcl.evaluate.fid import frechet_distance

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(256, 8))
    shift = {"ppcl": 0.2, "same": 0.2, "better": 0.0, "worse": 0.4}
    f = {(k, 0.5): ref + 0.3 * rng.normal(size=ref.shape) + v for k, v in shift.items()}

    def row(name, acc):
        x = f[(name, 0.5)]
        fid = frechet_distance(x.mean(0), np.cov(x, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
        return Row(name, 0.5, 100, 0.5, 0.5, acc, 0.8, fid, 20.0)

    rows = [Row("teacher", None, 200, 1.0, 1.0, 0.99, 0.9, 10.0, None), row("ppcl", 0.95), row("same", 0.94),
            row("better", 0.96), row("worse", 0.97)]
    hits = {(k, 0.5): (np.full(256, 3 - i % 2), np.full(256, 3)) for i, k in enumerate(shift)}
    compare_with_ppcl(rows, f, ref, hits)
    ppcl, same, better, worse = rows[1:]
    assert ppcl.beats_ppcl is None and ppcl.judge_fid_diff_se is None and ppcl.judge_accuracy_diff_se is None
    assert same.judge_accuracy_diff_se == 0.0 and better.judge_accuracy_diff_se == 0.0  # constant paired differences
    for r in (same, better, worse):
        assert r.judge_fid_diff_se > 0
        assert r.beats_ppcl["judge_fid"] == (r.judge_fid < ppcl.judge_fid - r.judge_fid_diff_se)
    # the same quality: the FID gap is noise, a few SE at most, and does not count as a win here
    assert abs(same.judge_fid - ppcl.judge_fid) < 3 * same.judge_fid_diff_se and not same.beats_ppcl["judge_fid"]
    assert better.beats_ppcl == {"judge_accuracy": True, "judge_fid": True}
    assert worse.beats_ppcl == {"judge_accuracy": True, "judge_fid": False}


_PARENT = """
import concurrent.futures as cf, multiprocessing as mp, sys, time
from ppcl.bench.quality import _die_with_parent

def work(path):
    import os
    open(path, "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_die_with_parent)
    pool.submit(work, sys.argv[1])
    time.sleep(120)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_distillation_workers_die_with_the_benchmark(tmp_path):
    """Killing ``ppcl bench quality`` (SIGKILL: no handler runs) stops its worker processes too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pidfile = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pidfile)])
    try:
        deadline = time.time() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        worker = int(pidfile.read_text())

        def gone():  # no such process, or a zombie waiting for a reaper that may not come in a container
            try:
                return "\nState:\tZ" in open(f"/proc/{worker}/status").read()
            except FileNotFoundError:
                return True

        assert not gone()
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while time.time() < deadline:
            if gone():
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            raise AssertionError("the worker outlived the benchmark's process")
    finally:
        parent.kill()


def test_targets_say_which_accuracy_leads_exceed_their_paired_se():
    from ppcl.bench.quality import targets

    def row(name, ratio, acc, beats=None, se=None):
        return {"name": name, "ratio": ratio, "judge_accuracy": acc, "beats_ppcl": beats,
                "judge_accuracy_diff_se": se}

    rows = [row("teacher", None, 0.99), row("ppcl", 0.5, 0.970),
            row("a", 0.5, 0.980, {"judge_accuracy": True, "judge_fid": False}, 0.002),
            row("b", 0.5, 0.971, {"judge_accuracy": True, "judge_fid": False}, 0.002),
            row("c", 0.5, 0.960, {"judge_accuracy": False, "judge_fid": False}, 0.002)]
    t = targets(rows, 0.5)["ppcl_beats_all"]
    assert not t["met"] and t["rows_beating_ppcl_on_a_metric"] == ["a@0.5", "b@0.5"]
    assert t["accuracy_leads_in_paired_se"] == {"a@0.5": 5.0, "b@0.5": 0.5}  # a: a real lead; b: within noise


def test_serve_joint_exports_the_subset_the_selection_records(tmp_path):
    """``--serve joint``: ppcl's plan records the subset chosen with it for 0.7, and the 0.7 row is that subset."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "q"
    assert main(["bench", "quality", "--smoke", "--rows", "ppcl", "--serve", "joint", "--out", str(out),
                 "--no-keep-work"]) == 0
    result = json.loads((out / "quality.json").read_text())
    plan = result["plans"]["ppcl"]
    assert result["settings"]["serve"] == "joint" and plan["serves"]["0.7"]
    at_07 = next(r for r in result["rows"] if r["name"] == "ppcl" and r["ratio"] == 0.7)
    assert at_07["intervals"] == plan["serves"]["0.7"]
    assert "with the subsets it records" in (out / "quality.md").read_text()


def test_unknown_serve_mode_is_refused_before_any_work(tmp_path):
    from ppcl.bench.quality import QualitySettings, run_quality
    from ppcl.errors import PPCLError

    with pytest.raises(PPCLError, match="serve must be one of plan, joint, none"):
        run_quality(tmp_path / "q", QualitySettings(serve="both"))
    assert not (tmp_path / "q").exists()


def test_train_seed_changes_the_distillation_runs_only(tmp_path):
    """``--train-seed``: the runs train with that seed; the cache, the probe and the plans keep the benchmark's."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "q"
    assert main(["bench", "quality", "--smoke", "--rows", "ppcl", "--train-seed", "7", "--out", str(out)]) == 0
    result = json.loads((out / "quality.json").read_text())
    assert result["settings"]["train_seed"] == 7 and result["settings"]["seed"] == 0
    run = json.loads((out / "work" / "runs" / "ppcl" / "run.json").read_text())
    assert run["settings"]["seed"] == 7
    assert "distillation seed 7" in (out / "quality.md").read_text()


def test_output_loss_sequential_reaches_every_nonsequential_run(tmp_path):
    """``--output-loss-sequential W``: the ppcl run trains with it (its steps log the whole plan's sequential D as
    ``<stream>@plan``); the sequential ablation, sequential already, runs without it; quality.md says so."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "q"
    assert main(["bench", "quality", "--smoke", "--rows", "ppcl,sequential", "--output-loss-sequential", "0.5",
                 "--out", str(out)]) == 0
    runs = out / "work" / "runs"
    assert json.loads((runs / "ppcl" / "run.json").read_text())["settings"]["output_loss_sequential"] == 0.5
    seq = json.loads((runs / "sequential" / "run.json").read_text())["settings"]
    assert seq["mode"] == "sequential" and seq["output_loss_sequential"] == 0.0
    first = json.loads((runs / "ppcl" / "metrics.jsonl").read_text().splitlines()[0])["losses"]
    assert any(k.endswith("@plan") for k in first) and not any(
        k.endswith("@plan") for k in json.loads((runs / "sequential" / "metrics.jsonl").read_text()
                                                 .splitlines()[0])["losses"])
    assert "+ 0.5 x the sequential loss D in the whole plan's student" in (out / "quality.md").read_text()
