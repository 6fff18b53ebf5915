"""``ppcl evaluate`` end to end on the tiny FLUX pipeline: outputs, teacher self-check, determinism, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ppcl.cli import main

STEPS, RES = 2, 32


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_pipe_dir):
    """Teacher, a smaller 'pruned' model (fewer blocks, same VAE and text encoders), a tiny CLIP, references."""
    from PIL import Image

    from ppcl.evaluate.clip import build_tiny_clip
    from ppcl.arch.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("eval_assets")
    small = build_tiny_pipeline("flux", root / "small", seed=0,
                                transformer_overrides={"num_layers": 2, "num_single_layers": 3})
    clip = build_tiny_clip(root / "clip", seed=5)
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(ref / f"{i}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square at the top\na blue circle on the left\n")
    return {"teacher": tiny_pipe_dir["flux"], "small": small, "clip": clip, "ref": ref, "prompts": prompts,
            "root": root}


def _args(a, out, *models, extra=()):
    argv = ["evaluate", "--teacher", str(a["teacher"]), "--prompts", str(a["prompts"]), "--out", str(out),
            "--steps", str(STEPS), "--resolution", str(RES), "--batch-size", "2", "--device", "cpu"]
    for m in models:
        argv += ["--model", str(m)]
    return argv + list(extra)


def test_evaluate_teacher_against_itself_and_a_pruned_model(assets, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(_args(assets, out, assets["teacher"], assets["small"], extra=[
        "--clip", str(assets["clip"]), "--reference", str(assets["ref"]), "--fid-cache", str(tmp_path / "cache"),
        "--latency-repeats", "20", "--latency-warmup", "3", "--name", "self", "--name", "small"]))
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["version"] == 1 and metrics["samples"] == 2
    assert metrics["fid_extractor"]["name"].startswith("clip-image:") and len(metrics["fid_extractor"]["sha256"]) == 64
    assert metrics["reference"]["num_images"] == 4
    teacher, self_, small = metrics["models"]
    assert [m["name"] for m in metrics["models"]] == ["teacher", "self", "small"]
    assert teacher["role"] == "teacher" and teacher["fidelity"] is None and teacher["speedup"] == 1.0

    # the teacher against itself: identical latents and images (infinite PSNR stored as null), cosine 1,
    # same parameters, same FID and CLIP score, speedup 1 within timing noise
    f = self_["fidelity"]
    assert f["identical"] is True and f["latent_psnr_db"] is None and f["image_psnr_db"] is None
    assert f["latent_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert self_["parameters"] == teacher["parameters"] and self_["parameters_ratio"] == 1.0
    assert self_["fid"] == pytest.approx(teacher["fid"], abs=1e-9)
    assert self_["clip_score"] == pytest.approx(teacher["clip_score"], abs=1e-9)
    # "within noise": the two medians differ by no more than the larger measured min-max spread (and never 2x)
    noise = max(teacher["latency"]["spread"], self_["latency"]["spread"])
    assert abs(math.log(self_["speedup"])) <= math.log1p(noise), (self_["speedup"], noise)
    assert 0.5 < self_["speedup"] < 2.0
    lat = self_["latency"]
    assert lat["min_s"] <= lat["median_s"] <= lat["max_s"] and lat["calls_per_step"] == 1

    # the smaller model: fewer parameters, faster per step, finite fidelity
    assert small["parameters"] < teacher["parameters"]
    assert small["parameters_ratio"] == pytest.approx(small["parameters"] / teacher["parameters"])
    g = small["fidelity"]
    assert g["identical"] is False and g["latent_psnr_db"] is not None and g["image_psnr_db"] is not None
    assert g["latent_cosine"] < 1.0 and g["samples"] == 2
    assert small["fid"] is not None and small["fid"] >= 0 and small["memory"]["kind"] == "cpu_peak_rss"
    assert teacher["memory"]["peak_bytes"] > 0

    # grid: 3 model columns of 128 px cells (32 px upscaled), 2 sample rows
    from PIL import Image

    with Image.open(out / "grid.png") as im:
        assert im.size[0] == 6 + 3 * (128 + 6) and im.size[1] > 2 * 128
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "small" in html and "∞ (identical)" in html
    assert "http://" not in html and "https://" not in html  # readable offline
    assert "speedup" in capsys.readouterr().out

    # a second run reads the reference statistics from the cache
    out2 = tmp_path / "eval2"
    assert main(_args(assets, out2, assets["small"], extra=[
        "--clip", str(assets["clip"]), "--reference", str(assets["ref"]), "--fid-cache", str(tmp_path / "cache"),
        "--latency-repeats", "2"])) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["reference"]["statistics_cached"] is True
    assert m2["models"][1]["fid"] == pytest.approx(small["fid"], rel=1e-9)
    assert m2["models"][1]["fidelity"] == small["fidelity"]

    # the cross-run report reads both: the teacher once, every model, plots and both grids embedded
    rep = tmp_path / "report"
    assert main(["report", "--metrics", str(out / "metrics.json"), str(out2 / "metrics.json"), "--out", str(rep)]) == 0
    page = (rep / "report.html").read_text()
    assert page.count("(teacher)") == 1 and page.count("data:image/png;base64,") == 4


def test_same_seeds_give_identical_images(assets):
    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.evaluate.generate import generate, make_samples

    pipe = load_pipeline(assets["teacher"], device="cpu", dtype=torch.float32)
    adapter = get_adapter(pipe.transformer)
    samples = make_samples(["a red square at the top", "a blue circle on the left"], seeds=2)
    kw = dict(steps=STEPS, height=RES, width=RES)
    lat1, img1 = generate(pipe, adapter, samples, **kw)
    lat2, img2 = generate(pipe, adapter, samples, **kw)
    assert torch.equal(lat1, lat2) and torch.equal(img1, img2)
    assert img1.shape == (4, 3, RES, RES) and 0 <= float(img1.min()) and float(img1.max()) <= 1
    # a sample's noise depends on its seed only: same image whether generated alone or in a batch
    lat_alone, _ = generate(pipe, adapter, samples[2:3], **kw)
    torch.testing.assert_close(lat_alone[0], lat1[2], rtol=1e-4, atol=1e-5)
    # different seeds give different images
    assert not torch.allclose(lat1[0], lat1[2])


@pytest.mark.parametrize("case", ["missing_prompts", "empty_reference", "missing_clip", "missing_inception",
                                  "not_a_pipeline", "missing_model", "fid_without_extractor"])
def test_bad_input_is_one_line_exit_2_and_no_metrics(assets, tmp_path, capsys, case):
    out = tmp_path / "eval"
    a = dict(assets)
    models = [assets["teacher"]]
    extra: list[str] = []
    expected = {
        "missing_prompts": "prompts file not found",
        "empty_reference": "no images",
        "missing_clip": "CLIP model not found",
        "missing_inception": "Inception weights not found",
        "not_a_pipeline": "not a diffusers pipeline directory",
        "missing_model": "model not found",
        "fid_without_extractor": "FID needs a feature extractor",
    }[case]
    if case == "missing_prompts":
        a["prompts"] = tmp_path / "nope.txt"
    elif case == "empty_reference":
        (tmp_path / "empty").mkdir()
        extra = ["--reference", str(tmp_path / "empty"), "--clip", str(assets["clip"])]
    elif case == "missing_clip":
        extra = ["--clip", str(tmp_path / "no_clip")]
    elif case == "missing_inception":
        extra = ["--reference", str(assets["ref"]), "--fid-features", f"inception:{tmp_path / 'w.pth'}"]
    elif case == "not_a_pipeline":
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "weights.bin").write_bytes(b"x")
        models = [tmp_path / "junk"]
    elif case == "missing_model":
        models = [tmp_path / "no_model"]
    elif case == "fid_without_extractor":
        extra = ["--reference", str(assets["ref"])]
    rc = main(_args(a, out, *models, extra=extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ppcl evaluate: error:") and expected in err[0], err
    assert not (out / "metrics.json").exists()
    assert not any(p.name.startswith(".eval") for p in tmp_path.iterdir())  # no scratch left behind


@pytest.mark.parametrize("arch", ["sd3", "qwenimage"])
def test_evaluate_other_families_teacher_against_itself(arch, assets, tiny_pipe_dir, tmp_path):
    pipe = tiny_pipe_dir[arch]
    a = dict(assets, teacher=pipe)
    out = tmp_path / "eval"
    assert main(_args(a, out, pipe, extra=["--latency-repeats", "2", "--guidance", "2.0"])) == 0
    teacher, self_ = json.loads((out / "metrics.json").read_text())["models"]
    assert self_["fidelity"]["identical"] is True and self_["fidelity"]["latent_psnr_db"] is None
    assert self_["parameters"] == teacher["parameters"] > 0
    assert (out / "grid.png").is_file() and (out / "report.html").is_file()


def test_reference_teacher_gets_judge_scores_and_a_paired_speedup(tmp_path, capsys):
    """Synth prompts on the reference teacher: judge accuracy and judge-FID for every model, in metrics.json and
    report.html; the speedup comes from paired timings. Real prompts switch the judge off; --judge with them is
    an error."""
    from ppcl.bench.quality import REFERENCE_TEACHER
    from ppcl.config import synth_eval_prompts

    prompts = tmp_path / "synth.txt"
    prompts.write_text("\n".join(synth_eval_prompts(6)) + "\n")
    out = tmp_path / "eval"

    def argv(prompts_file, out_dir, *extra):
        return ["evaluate", "--teacher", str(REFERENCE_TEACHER), "--model", str(REFERENCE_TEACHER), "--prompts",
                str(prompts_file), "--out", str(out_dir), "--steps", "2", "--resolution", "32", "--batch-size", "6",
                "--device", "cpu", "--latency-warmup", "1", *extra]

    assert main(argv(prompts, out, "--latency-repeats", "4")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["judge"]["name"] == "ppcl-judge" and m["judge_reference"]["num_images"] == 6
    teacher, self_ = m["models"]
    assert 0 <= teacher["judge_accuracy"] <= 1 and teacher["judge_fid"] > 0
    assert self_["judge_accuracy"] == teacher["judge_accuracy"] and self_["judge_fid"] == pytest.approx(
        teacher["judge_fid"])
    st = self_["speedup_stats"]
    assert st["pairs"] == 4 and st["q25"] <= st["median"] <= st["q75"] and self_["speedup"] == st["median"]
    assert teacher["speedup_stats"] is None and teacher["latency"]["repeats"] == 4
    html = (out / "report.html").read_text()
    assert "judge acc." in html and "ppcl-judge" in html and f"{teacher['judge_accuracy']:.4f}" in html

    real = tmp_path / "real.txt"
    real.write_text("a cat on a mat\n")
    assert main(argv(real, tmp_path / "eval2", "--latency-repeats", "1")) == 0
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["models"][0]["judge_accuracy"] is None
    capsys.readouterr()
    assert main(argv(real, tmp_path / "eval3", "--judge")) == 2
    err = capsys.readouterr().err
    assert "--judge needs synth captions" in err and "'a cat on a mat'" in err
