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
    # no distillation keeps exactly ppcl's intervals and parameter count
    for ratio in (0.7, 0.5):
        p = next(r for r in rows if r["name"] == "ppcl" and r["ratio"] == ratio)
        n = next(r for r in rows if r["name"] == "no-distill" and r["ratio"] == ratio)
        assert (n["intervals"], n["parameters"]) == (p["intervals"], p["parameters"])
    assert set(result["targets"]) == {"ppcl_within_3pct_at_low", "ppcl_beats_all", "one_run_within_1pt"}
    assert not (smoke / "work").exists()


def test_smoke_writes_markdown_and_plot(smoke):
    md = (smoke / "quality.md").read_text()
    assert md.startswith("| ratio | row | params |")
    assert "| 0.5 | ppcl |" in md and "Targets:" in md
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
    ("--eval-n", "1", "--eval-n must be >= 2"),
    ("--rows", "ppcl,nope", "--rows: unknown row 'nope'"),
])
def test_bad_training_flags_are_one_line_errors(tmp_path, capsys, flag, value, message):
    assert main(["bench", "quality", "--smoke", flag, value, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()
