"""Evaluation pieces: Fréchet distance, streaming FID + reference cache, CLIP score, fidelity, latency, grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import linalg

from ppcl.errors import PPCLError
from ppcl.evaluate.fid import (
    FeatureExtractor,
    FIDAccumulator,
    frechet_distance,
    gaussian_from_sums,
    load_extractor,
    reference_statistics,
)
from ppcl.evaluate.fidelity import fidelity, psnr_db
from ppcl.evaluate.generate import make_samples, read_prompts
from ppcl.evaluate.metrics import load_metrics


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FlatFeatures(torch.nn.Module):
    """Features = the pixels themselves: lets a test feed known Gaussian features through the FID path."""

    num_features = 12  # (3, 2, 2) images

    def forward(self, x):
        return x.flatten(1)


def flat_features():
    return FlatFeatures()


class MeanColour(torch.nn.Module):
    """A 3-feature extractor for real images (channel means); identifies itself by a buffer."""

    num_features = 3

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        return x.mean(dim=(2, 3)) * self.scale


def mean_colour():
    return MeanColour()


# ---------------------------------------------------------------- Fréchet distance
def test_frechet_distance_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    # Diagonal covariances: the matrix square root is elementwise.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-3)
    # Full covariance S and c^2 S: Tr(S + c^2 S - 2 c S) = (1 - c)^2 Tr(S).
    q = rng.normal(size=(d, d))
    s = q @ q.T + d * np.eye(d)
    c = 1.7
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s)
    assert frechet_distance(mu1, s, mu2, c * c * s) == pytest.approx(expected, abs=1e-3)
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-6)


def test_streaming_fid_matches_direct_numpy_scipy_computation():
    rng = np.random.default_rng(1)
    n = 600
    real = rng.multivariate_normal(np.zeros(12), np.diag(np.linspace(0.5, 2, 12)), size=n)
    fake = rng.multivariate_normal(np.full(12, 0.3), np.diag(np.linspace(1.5, 0.5, 12)), size=n)
    ex = FeatureExtractor("flat", "0" * 64, FlatFeatures(), num_features=12)
    acc = FIDAccumulator(ex)
    for i in range(0, n, 64):  # batch by batch
        acc.update(torch.from_numpy(real[i : i + 64]).view(-1, 3, 2, 2), real=True)
        acc.update(torch.from_numpy(fake[i : i + 64]).view(-1, 3, 2, 2), real=False)
    ours = acc.compute()

    # direct computation from all features at once
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert ours == pytest.approx(direct, abs=1e-3)
    # torchmetrics' own compute over the same streamed sums agrees
    assert float(acc.metric.compute()) == pytest.approx(direct, rel=1e-3)
    # and the sample FID approaches the population closed form
    closed = 12 * 0.09 + np.sum(np.linspace(0.5, 2, 12) + np.linspace(1.5, 0.5, 12)
                                - 2 * np.sqrt(np.linspace(0.5, 2, 12) * np.linspace(1.5, 0.5, 12)))
    assert ours == pytest.approx(closed, rel=0.25)


def test_fid_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(200, 12))).view(-1, 3, 2, 2)
    acc = FIDAccumulator(FeatureExtractor("flat", "0" * 64, FlatFeatures(), num_features=12))
    acc.update(x, real=True)
    acc.update(x, real=False)
    assert abs(acc.compute()) < 1e-6
    # a different set is far away, and the reference survives the reset between models
    acc.reset_generated()
    acc.update(x + 1.0, real=False)
    assert acc.compute() == pytest.approx(12.0, rel=1e-6)


def test_gaussian_from_sums_needs_two_images():
    with pytest.raises(PPCLError, match="at least 2"):
        gaussian_from_sums(np.zeros(3), np.zeros((3, 3)), 1)


# ---------------------------------------------------------------- extractors and reference cache
def _write_images(folder, n, size=(20, 24), seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((size[0], size[1], 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def test_load_extractor_specs_and_errors(tmp_path):
    ex = load_extractor("tests.test_evaluate:mean_colour")
    assert ex.name == "tests.test_evaluate:mean_colour" and ex.num_features == 3 and len(ex.sha256) == 64
    other = MeanColour()
    other.scale.fill_(2.0)  # different weights -> different identity
    from ppcl.evaluate.fid import state_dict_sha256

    assert state_dict_sha256(other) != ex.sha256
    with pytest.raises(PPCLError, match="Inception weights not found"):
        load_extractor(f"inception:{tmp_path / 'missing.pth'}")
    with pytest.raises(PPCLError, match="cannot import"):
        load_extractor("no_such_module_xyz:factory")
    with pytest.raises(PPCLError, match="needs a CLIP"):
        load_extractor("clip")
    with pytest.raises(PPCLError, match="unknown --fid-features"):
        load_extractor("resnet")


def test_inception_needs_torch_fidelity_here(tmp_path):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"not really weights")
    if _TORCH_FIDELITY_AVAILABLE:  # pragma: no cover - not in this environment
        ex = load_extractor(f"inception:{weights}")
        assert ex.name.startswith("inception") and ex.num_features == 2048
    else:
        with pytest.raises(PPCLError, match="torch-fidelity"):
            load_extractor(f"inception:{weights}")


def test_reference_statistics_are_cached_by_checksum(tmp_path):
    ref = _write_images(tmp_path / "ref", 6)
    cache = tmp_path / "cache"
    acc = FIDAccumulator(load_extractor("tests.test_evaluate:mean_colour"))
    first = reference_statistics(acc, ref, 16, 16, batch_size=4, cache_dir=cache, progress=False)
    assert not first.cached and first.num_images == 6 and first.cache_file.is_file()
    sums = acc.reference_sums()
    assert int(sums["n"]) == 6

    acc2 = FIDAccumulator(load_extractor("tests.test_evaluate:mean_colour"))
    second = reference_statistics(acc2, ref, 16, 16, batch_size=4, cache_dir=cache, progress=False)
    assert second.cached and second.sha256 == first.sha256
    np.testing.assert_array_equal(acc2.reference_sums()["cov_sum"], sums["cov_sum"])

    # a changed image changes the checksum: recomputed, not read from the stale cache
    _write_images(tmp_path / "ref", 1, seed=9)
    acc3 = FIDAccumulator(load_extractor("tests.test_evaluate:mean_colour"))
    third = reference_statistics(acc3, ref, 16, 16, cache_dir=cache, progress=False)
    assert not third.cached and third.sha256 != first.sha256
    assert not np.array_equal(acc3.reference_sums()["sum"], sums["sum"])


def test_empty_or_missing_reference_folder_is_an_error(tmp_path):
    acc = FIDAccumulator(load_extractor("tests.test_evaluate:mean_colour"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(PPCLError, match="no images"):
        reference_statistics(acc, tmp_path / "empty", 16, 16, cache_dir=tmp_path, progress=False)
    with pytest.raises(PPCLError, match="not found"):
        reference_statistics(acc, tmp_path / "missing", 16, 16, cache_dir=tmp_path, progress=False)


# ---------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from ppcl.evaluate.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"), seed=5)


def test_clip_score_matches_direct_cosine(tiny_clip_dir):
    from ppcl.evaluate.clip import clip_score, image_embeddings, load_clip, text_embeddings

    model, processor = load_clip(str(tiny_clip_dir))
    images = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a red square", "a blue circle", "two green dots", "big yellow star"]
    score = clip_score(images, prompts, (model, processor))

    pixels = processor(images=[(i * 255).round().to(torch.uint8) for i in images], return_tensors="pt")
    text = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(
            image_embeddings(model, pixels["pixel_values"]),
            text_embeddings(model, text["input_ids"], text["attention_mask"]),
        )
    direct = max(float(100 * cos.mean()), 0.0)
    assert direct > 0  # the tiny CLIP seed is chosen so this test measures something
    assert score == pytest.approx(direct, abs=1e-3)
    # a different prompt order changes the score: the pairing matters
    assert clip_score(images, prompts[::-1], (model, processor)) != pytest.approx(score, abs=1e-3)


def test_load_clip_missing_path_is_an_error(tmp_path):
    from ppcl.evaluate.clip import load_clip

    with pytest.raises(PPCLError, match="CLIP model not found"):
        load_clip(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PPCLError, match="cannot load CLIP"):
        load_clip(str(tmp_path / "empty"))


def test_clip_features_for_fid(tiny_clip_dir):
    from ppcl.evaluate.clip import load_clip

    clip = load_clip(str(tiny_clip_dir))
    ex = load_extractor("clip", clip, str(tiny_clip_dir))
    feats = ex.module(torch.rand(3, 3, 40, 56))
    assert feats.shape == (3, ex.num_features) == (3, 16)
    assert torch.isfinite(feats).all()


# ---------------------------------------------------------------- fidelity
def test_fidelity_identical_is_infinite_and_stored_as_null():
    lat = torch.randn(3, 16, 8)
    img = torch.rand(3, 3, 8, 8)
    f = fidelity(lat, lat.clone(), img, img.clone())
    assert f.identical and f.latent_psnr_db is None and f.image_psnr_db is None
    assert f.latent_cosine == pytest.approx(1.0, abs=1e-9) and f.samples == 3
    assert json.loads(f.model_dump_json())["latent_psnr_db"] is None


def test_fidelity_numbers_match_definitions():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 5)
    noise = 0.1 * torch.randn(2, 4, 5)
    f = fidelity(t, t + noise)
    mse = float(noise.double().square().mean())
    rng = float(t.max() - t.min())
    assert f.latent_psnr_db == pytest.approx(10 * math.log10(rng**2 / mse), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(t.flatten(1).double(), (t + noise).flatten(1).double())
    assert f.latent_cosine == pytest.approx(float(cos.mean()), rel=1e-9)
    assert f.latent_cosine_min == pytest.approx(float(cos.min()), rel=1e-9)
    assert not f.identical
    assert psnr_db(0.01, 1.0) == pytest.approx(20.0)
    assert psnr_db(0.0, 1.0) == math.inf


# ---------------------------------------------------------------- prompts, samples
def test_read_prompts_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"caption": "a dog", "x": 1}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a cat"}\n')
    with pytest.raises(PPCLError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PPCLError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(PPCLError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_samples_are_seed_major():
    s = make_samples(["a", "b"], seeds=2, seed_offset=10)
    assert [(x.prompt, x.seed) for x in s] == [("a", 10), ("b", 10), ("a", 11), ("b", 11)]


# ---------------------------------------------------------------- latency, memory
def test_latency_replays_a_captured_call_and_reports_spread():
    from ppcl.evaluate.cost import capture_transformer_call, measure_latency

    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    with capture_transformer_call(net) as call:
        for _ in range(6):  # e.g. 3 steps x 2 calls (CFG)
            net(torch.randn(8, 64))
    assert call.calls == 6 and call.args[0].shape == (8, 64)
    lat = measure_latency(net, call, warmup=1, repeats=5, calls_per_step=2)
    assert lat.min_s <= lat.median_s <= lat.max_s and lat.min_s > 0
    assert lat.per_step_s == pytest.approx(2 * lat.median_s)
    assert lat.spread == pytest.approx((lat.max_s - lat.min_s) / lat.median_s)


def test_peak_memory_sees_an_allocation_inside_the_block():
    from ppcl.evaluate.cost import PeakMemory

    with PeakMemory("cpu") as pm:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert pm.result.kind == "cpu_peak_rss"
    assert pm.result.model_bytes >= 48 * 2**20
    with PeakMemory("cpu") as small:
        torch.ones(10)
    assert small.result.model_bytes < pm.result.model_bytes


# ---------------------------------------------------------------- schema, grid
def test_load_metrics_rejects_bad_files(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text('{"version": 7}')
    with pytest.raises(PPCLError, match="'version'"):
        load_metrics(p)
    p.write_text('{"version": 1, "created": "x"}')
    with pytest.raises(PPCLError, match="metrics.json: field 'settings'"):
        load_metrics(p)
    with pytest.raises(PPCLError, match="not found"):
        load_metrics(tmp_path / "none.json")


def test_grid_has_a_column_per_model_and_a_row_per_sample():
    from ppcl.evaluate.grid import render_grid

    red = torch.zeros(3, 32, 32)
    red[0] = 1
    blue = torch.zeros(3, 32, 32)
    blue[2] = 1
    grid = render_grid([("teacher", [red, red]), ("pruned", [blue, blue])], ["a red square", "another"])
    arr = np.asarray(grid)
    # cells are upscaled to 128 px: two columns of 128 px plus padding, two rows plus captions and a header
    assert arr.shape[1] == 6 + 2 * (128 + 6) and arr.shape[0] > 2 * 128
    # find pure red and pure blue regions of 128x128
    assert ((arr == [255, 0, 0]).all(-1)).sum() == 2 * 128 * 128
    assert ((arr == [0, 0, 255]).all(-1)).sum() == 2 * 128 * 128


# ---------------------------------------------------------------- paired speed
def test_paired_speedup_is_the_median_of_pair_ratios_and_flags_a_wide_spread():
    from ppcl.evaluate.cost import SPREAD_LIMIT, PairedTiming

    steady = PairedTiming(teacher_s=[2.0, 2.0, 2.0, 2.1, 2.0], model_s=[1.0, 1.0, 1.0, 1.0, 4.0], warmup=1,
                          timer="perf_counter").speedup()
    # one stalled model forward moves a min-max spread, not the median or the interquartile range
    assert steady.median == pytest.approx(2.0) and steady.min == pytest.approx(0.5) and steady.pairs == 5
    assert steady.reliable and steady.spread <= SPREAD_LIMIT
    # two calls per step for the teacher (CFG), one for the model: per-step ratios
    assert PairedTiming([1.0], [1.0], 0, "perf_counter").speedup(2, 1).median == pytest.approx(2.0)
    # half the pairs say 2x, half 1x: the number cannot be trusted
    noisy = PairedTiming([2.0] * 6, [1.0, 2.0] * 3, 0, "perf_counter").speedup()
    assert noisy.q25 == pytest.approx(1.0) and noisy.q75 == pytest.approx(2.0)
    assert noisy.spread == pytest.approx(1 / 1.5) and not noisy.reliable


def test_paired_timing_alternates_and_sees_the_cheaper_model():
    from ppcl.evaluate.cost import capture_transformer_call, measure_paired

    big = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    small = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(2)])
    order = []
    big.register_forward_pre_hook(lambda *_: order.append("T"))
    small.register_forward_pre_hook(lambda *_: order.append("M"))
    with capture_transformer_call(big) as call:
        big(torch.randn(64, 256))
    order.clear()
    paired = measure_paired(big, small, call, warmup=1, repeats=6)
    assert order == ["T", "M"] + ["T", "M", "M", "T"] * 3  # warm-up, then AB BA AB BA ...
    assert len(paired.teacher_s) == len(paired.model_s) == 6 and paired.timer == "perf_counter"
    assert paired.speedup().median > 1.5  # 4x the layers: clearly faster, whatever the machine's load


# ---------------------------------------------------------------- judge
def test_judge_references_are_the_benchmarks_images_and_real_images_score_high():
    from ppcl.bench.judge import synth_batch
    from ppcl.bench.teacher import EVAL_SEED, eval_prompts
    from ppcl.evaluate.judge import REFERENCE_SEED, JudgeScorer, reference_images, synth_attributes

    assert REFERENCE_SEED == EVAL_SEED
    prompts, _, _ = eval_prompts(48)
    real, _ = synth_batch(48, EVAL_SEED, 32)
    # the benchmark's own judge-FID reference, so the demo's judge-FID and the benchmark's measure the same thing
    assert torch.equal(reference_images(prompts), real)
    # any synth caption gets a render of that caption (here: a caption not in the set, re-coloured from a draw)
    from ppcl.data.synth import caption

    assert synth_attributes(["a cat on a mat"]) is None and synth_attributes(prompts) is not None
    scorer = JudgeScorer(prompts)
    scorer.update(real[:20])
    scorer.update(torch.nn.functional.interpolate(real[20:], size=64, mode="nearest"))  # any resolution
    s = scorer.compute()
    assert s["attribute_accuracy"] >= 0.95 and s["image_accuracy"] >= 0.8
    scorer.reset()
    scorer.update(torch.full_like(real, 0.92))  # blank grey canvases: nothing drawn
    blank = scorer.compute()
    # the real images themselves (the 64 px ones resized back) sit far closer to the reference than blank canvases
    assert blank["attribute_accuracy"] < 0.6 and blank["judge_fid"] > 10 * s["judge_fid"], (blank, s)
    assert caption({"kind": "single", "objects": [{"colour": "red", "shape": "circle"}]}) == "a red circle"
