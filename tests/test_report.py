"""``ppcl report``: several metrics.json across ratios -> one offline HTML page with table and plots."""

from __future__ import annotations

import json

import pytest

from ppcl.cli import main
from ppcl.evaluate.metrics import (
    EvalMetrics,
    EvalSettings,
    ExtractorInfo,
    Fidelity,
    Latency,
    Memory,
    ModelMetrics,
)


def _entry(name, role, params, ms, fid, psnr):
    lat = Latency(median_s=ms / 1e3, min_s=0.9 * ms / 1e3, max_s=1.2 * ms / 1e3, spread=0.3, repeats=5, warmup=1,
                  calls_per_step=1, per_step_s=ms / 1e3)
    fidelity = None if role == "teacher" else Fidelity(latent_psnr_db=psnr, latent_cosine=0.99, latent_cosine_min=0.98,
                                                       image_psnr_db=30.0, identical=False, samples=4)
    return ModelMetrics(name=name, path=f"/runs/{name}-{params}", role=role, parameters=params,
                        parameters_ratio=params / 1000, latency=lat, speedup=100.0 / ms,
                        memory=Memory(kind="cpu_peak_rss", peak_bytes=2**30, baseline_bytes=2**29,
                                      model_bytes=2**29),
                        generation_s=1.0, fid=fid, clip_score=25.0, fidelity=fidelity)


def _write_run(folder, ratio_name, params, ms, fid, psnr, extractor_sha="a" * 64, teacher_params=1000):
    m = EvalMetrics(
        created="2026-01-01T00:00:00+00:00", settings=EvalSettings(steps=2, height=32, width=32, device="cpu"),
        prompts=["a cat", "a dog"], samples=4, teacher="/runs/teacher",
        fid_extractor=ExtractorInfo(name="mod:feat", sha256=extractor_sha, num_features=8),
        models=[_entry("teacher", "teacher", teacher_params, 100.0, 10.0, None), _entry(ratio_name, "model", params, ms, fid, psnr)],
    )
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(m.model_dump_json(indent=2))
    return folder / "metrics.json"


def test_report_across_ratios(tmp_path, capsys):
    m1 = _write_run(tmp_path / "keep75", "keep75", 750, 80.0, 12.0, 28.0)
    m2 = _write_run(tmp_path / "keep50", "keep50", 500, 55.0, 15.0, 22.0)
    out = tmp_path / "report"
    assert main(["report", "--metrics", str(m1), str(m2), "--out", str(out)]) == 0
    assert "3 models from 2 runs" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    # the teacher once, each ratio once, ordered by parameters
    assert html.count("(teacher)") == 1
    assert html.index("keep75") < html.index("keep50")
    rows = html.split("<tbody>")[1]
    assert rows.index("750") < rows.index("500")
    assert html.count("data:image/png;base64,") == 2  # the two plots (no grid.png beside these runs)
    assert "http://" not in html and "https://" not in html
    assert "Not comparable" not in html
    for name in ("quality_vs_parameters.png", "latency_vs_parameters.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_warns_when_fid_extractors_differ(tmp_path, capsys):
    m1 = _write_run(tmp_path / "a", "keep75", 750, 80.0, 12.0, 28.0, extractor_sha="a" * 64)
    m2 = _write_run(tmp_path / "b", "keep50", 500, 55.0, 15.0, None, extractor_sha="b" * 64)
    assert main(["report", "--metrics", str(m1), str(m2), "--out", str(tmp_path / "r")]) == 0
    assert "different FID feature extractors" in capsys.readouterr().out
    assert "Not comparable" in (tmp_path / "r" / "report.html").read_text()


def test_report_bad_metrics_file_is_one_line_exit_2(tmp_path, capsys):
    good = _write_run(tmp_path / "a", "keep75", 750, 80.0, 12.0, 28.0)
    bad = tmp_path / "bad" / "metrics.json"
    bad.parent.mkdir()
    data = json.loads(good.read_text())
    del data["models"][1]["latency"]
    bad.write_text(json.dumps(data))
    out = tmp_path / "r"
    assert main(["report", "--metrics", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models.1.latency" in err[0] and str(bad) in err[0]
    assert not (out / "report.html").exists()
    assert main(["report", "--metrics", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "metrics file not found" in capsys.readouterr().err


@pytest.mark.parametrize("version", [0, 2])
def test_report_rejects_other_schema_versions(tmp_path, capsys, version):
    good = _write_run(tmp_path / "a", "keep75", 750, 80.0, 12.0, 28.0)
    data = json.loads(good.read_text())
    data["version"] = version
    good.write_text(json.dumps(data))
    assert main(["report", "--metrics", str(good), "--out", str(tmp_path / "r")]) == 2
    assert "'version'" in capsys.readouterr().err


def test_report_shows_one_teacher_per_teacher(tmp_path):
    from ppcl.report import build_report

    # each ratio's run copied the teacher to its own folder (different paths, same model)
    m1 = _write_run(tmp_path / "a", "keep75", 750, 80.0, 12.0, 28.0)
    m2 = _write_run(tmp_path / "b", "keep50", 500, 55.0, 15.0, 22.0)
    data = json.loads(m2.read_text())
    data["models"][0]["path"] = "/elsewhere/teacher"
    m2.write_text(json.dumps(data))
    # and a run against a different teacher
    m3 = _write_run(tmp_path / "c", "other", 400, 50.0, 15.0, 22.0, teacher_params=800)
    result = build_report([m1, m2, m3], tmp_path / "r")
    assert [e.parameters for _, e in result.rows if e.role == "teacher"] == [1000, 800]
    assert len(result.rows) == 5


def test_labels_name_the_achieved_fraction_with_the_one_asked():
    from ppcl.report import ratio_label

    assert ratio_label(0.5849, 0.6) == "keep 0.58 (asked 0.6)"
    assert ratio_label(0.6807, 0.8) == "keep 0.68 (asked 0.8)"
    assert ratio_label(0.6004, 0.6) == "keep 0.60"  # hit: no "asked"
    assert ratio_label(0.5, None) == "keep 0.50"


def test_summary_one_line_per_ratio_with_judge_accuracy_and_untrusted_speed(tmp_path):
    from ppcl.evaluate.metrics import Speedup
    from ppcl.report import SUMMARY_FILE, build_report

    paths = []
    for folder, name, params, acc, spread in (("a", "keep 0.68 (asked 0.8)", 680, 0.95, 0.05),
                                              ("b", "keep 0.58 (asked 0.6)", 580, 0.93, 0.6)):
        p = _write_run(tmp_path / folder / "evaluation", name, params, 50.0, None, 28.0)
        m = EvalMetrics.model_validate_json(p.read_text())
        teacher, model = m.models
        m.models = [teacher.model_copy(update={"judge_accuracy": 0.99, "judge_fid": 12.0}),
                    model.model_copy(update={
                        "judge_accuracy": acc, "judge_fid": 40.0, "speedup": 1.9,
                        "speedup_stats": Speedup(median=1.9, q25=1.9 - spread, q75=1.9 + spread, min=1.0, max=3.0,
                                                 spread=2 * spread / 1.9, pairs=20, spread_limit=0.2,
                                                 reliable=2 * spread / 1.9 <= 0.2)})]
        p.write_text(m.model_dump_json())
        paths.append(p)
    result = build_report(paths, tmp_path / "r")
    lines = (tmp_path / "r" / SUMMARY_FILE).read_text().splitlines()
    assert lines == result.summary and len(lines) == 2
    assert lines[0].startswith("keep 0.68 (asked 0.8): 0.68 of the parameters (0.00 M of 0.00 M), speedup 1.90x")
    assert "judge accuracy 0.950 vs the teacher's 0.990" in lines[0] and "UNRELIABLE" not in lines[0]
    assert "judge accuracy 0.930 vs the teacher's 0.990" in lines[1] and "UNRELIABLE" in lines[1]
    # the untrusted speedup is a warning (report stage metric, CLI output) and a box on the page
    assert any("keep 0.58 (asked 0.6): speedup 1.90 is not reliable" in w for w in result.warnings)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Speed not trusted" in html and "⚠ unreliable" in html and "judge acc." in html
    # both runs sit in folders called "evaluation" (the pipeline's layout): points are labelled by model name
    from ppcl.report import _point_names

    assert sorted(_point_names(result.rows).values()) == ["keep 0.58 (asked 0.6)", "keep 0.68 (asked 0.8)",
                                                          "teacher"]


def test_export_names_the_plug_subsets_when_the_ratio_asked_is_out_of_reach():
    from ppcl.export import far_from_asked_note, subset_fractions

    subsets = subset_fractions(1000, 0, {0: 100, 1: 320})
    assert subsets == [([], 1.0), ([0], 0.9), ([1], 0.68), ([0, 1], 0.58)]
    assert far_from_asked_note(0.6, 0.58, subsets) is None  # close enough: nothing to say
    note = far_from_asked_note(0.8, 0.68, subsets)
    assert "--keep-params 0.8 asked, 0.680 achieved" in note
    assert "[0] 0.900, [1] 0.680, [0, 1] 0.580" in note
