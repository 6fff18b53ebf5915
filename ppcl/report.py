"""The pipeline's last stage: one offline HTML page comparing every evaluated ratio.

Input: several ``metrics.json`` (one per ``ppcl evaluate`` run, typically one per exported ratio, each with the
teacher measured in the same run). Output in DIR:

- ``quality_vs_parameters.png``: judge accuracy and judge-FID (the reference teacher's synth prompts), FID, CLIP
  score and fidelity to the teacher (latent PSNR, latent cosine) against transformer parameters;
- ``latency_vs_parameters.png``: latency per denoising step (median, min-max bars) and the paired speedup
  (median, interquartile bars) vs parameters;
- ``report.html``: the table of every model, the plots and each run's grid.png, all embedded (base64);
- ``summary.txt``: one line per evaluated model: parameters kept (achieved, and the ratio asked), speedup, and
  the quality number that is measured (judge accuracy, else FID, CLIP or latent PSNR) beside the teacher's.

Labels: a pipeline branch names its model by the parameter fraction it ACHIEVED, with the ratio asked beside it
(:func:`ratio_label`, ``keep 0.58 (asked 0.6)``): the export's subset rule can only land on subsets of the
trained plugs, so the two can differ a lot, and a point labelled by the ratio asked would misstate the model.

Choices: the teacher appears in every run; it is shown once (from the first run that has it). Teacher entries
are the same teacher when their paths or their exact parameter counts match: in a pipeline each ratio's run
may have copied the teacher to its own folder, and two different teachers with identical parameter counts are
not a case a compression run produces. Speedup
is always the one measured within a model's own run against the teacher measured on the same machine, so
runs made on different machines stay comparable. Runs whose settings or measuring networks differ are still
shown, with a warning naming what differs: FID from different extractors, or any number from different
resolutions/steps/prompts, is not comparable. Infinite PSNR (a model identical to the teacher) is not plotted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ppcl.errors import PPCLError
from ppcl.evaluate.metrics import EvalMetrics, ModelMetrics, load_metrics


@dataclass
class ReportResult:
    out: Path
    report_path: Path
    plots: list[Path]
    rows: list[tuple[str, ModelMetrics]]  # (run label, entry)
    warnings: list[str]
    summary: list[str]


def ratio_label(achieved: float, asked: float | None = None) -> str:
    """``keep 0.58 (asked 0.6)``; ``keep 0.60`` when the export hit the ratio asked (to 2 decimals)."""
    label = f"keep {achieved:.2f}"
    if asked is not None and round(achieved, 2) != round(asked, 2):
        label += f" (asked {asked:g})"
    return label


def _run_label(path: Path, index: int) -> str:
    return path.parent.name or f"run{index}"


def _settings_key(m: EvalMetrics) -> str:
    s = m.settings
    key = {"steps": s.steps, "height": s.height, "width": s.width, "guidance": s.guidance, "seeds": s.seeds,
           "seed_offset": s.seed_offset, "prompts": m.prompts}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def comparability_warnings(runs: list[tuple[str, EvalMetrics]]) -> list[str]:
    """What differs between runs in a way that makes their numbers incomparable."""
    out = []
    if len({_settings_key(m) for _, m in runs}) > 1:
        out.append("runs used different generation settings or prompts (steps, resolution, guidance, seeds): "
                   "quality numbers are not comparable across them")
    fids = {(m.fid_extractor.name, m.fid_extractor.sha256) for _, m in runs if m.fid_extractor}
    if len(fids) > 1:
        out.append("runs used different FID feature extractors (" + ", ".join(sorted(n for n, _ in fids))
                   + "): FID values are not comparable across them")
    refs = {m.reference.sha256 for _, m in runs if m.reference}
    if len(refs) > 1:
        out.append("runs used different FID reference sets: FID values are not comparable across them")
    clips = {m.clip_model.sha256 for _, m in runs if m.clip_model}
    if len(clips) > 1:
        out.append("runs used different CLIP models: CLIP scores are not comparable across them")
    devices = {m.settings.device for _, m in runs}
    if len(devices) > 1:
        out.append(f"runs ran on different devices ({', '.join(sorted(map(str, devices)))}): compare speedups, "
                   "not absolute latencies")
    return out


def collect_rows(runs: list[tuple[str, EvalMetrics]]) -> list[tuple[str, ModelMetrics]]:
    """Every model entry; the teacher once (first run; same path or parameter count); by parameters, desc."""
    rows: list[tuple[str, ModelMetrics]] = []
    teachers: set = set()
    for label, m in runs:
        for e in m.models:
            if e.role == "teacher":
                if e.path in teachers or e.parameters in teachers:
                    continue
                teachers.update((e.path, e.parameters))
            rows.append((label, e))
    return sorted(rows, key=lambda r: (-r[1].parameters, r[1].role != "teacher", r[0], r[1].name))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fig_png(fig, plt) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _point_names(rows: list[tuple[str, ModelMetrics]]) -> dict[int, str]:
    """Plot label per row: the model's name, prefixed by its run's only where two models share a name."""
    names = [e.name for _, e in rows if e.role != "teacher"]
    return {id(e): "teacher" if e.role == "teacher" else (e.name if names.count(e.name) == 1 else f"{lbl}/{e.name}")
            for lbl, e in rows}


def _scatter(ax, rows, value, ylabel: str) -> bool:
    names = _point_names(rows)
    pts = [(e.parameters / 1e6, value(e), names[id(e)], e.role) for lbl, e in rows if value(e) is not None]
    if not pts:
        ax.set_visible(False)
        return False
    pts.sort()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="0.75", zorder=1)
    for x, y, name, role in pts:
        ax.scatter([x], [y], marker="*" if role == "teacher" else "o", s=90 if role == "teacher" else 40,
                   color="C3" if role == "teacher" else "C0", zorder=2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("transformer parameters (M)")
    ax.set_ylabel(ylabel)
    ax.margins(x=0.2, y=0.15)  # room for the point labels
    ax.grid(alpha=0.3)
    return True


QUALITY_PANELS = (
    (lambda e: e.judge_accuracy, "judge attribute accuracy"),
    (lambda e: e.judge_fid, "judge-FID (lower is better)"),
    (lambda e: e.fid, "FID (lower is better)"),
    (lambda e: e.clip_score, "CLIP score"),
    (lambda e: e.fidelity.latent_psnr_db if e.fidelity else None, "latent PSNR vs teacher (dB)"),
    (lambda e: e.fidelity.latent_cosine if e.fidelity else None, "latent cosine vs teacher"),
)


def plot_quality(rows: list[tuple[str, ModelMetrics]]) -> bytes:
    """One panel per quality metric that was measured (unmeasured ones would be empty axes)."""
    plt = _pyplot()
    panels = [(value, label) for value, label in QUALITY_PANELS if any(value(e) is not None for _, e in rows)]
    panels = panels or list(QUALITY_PANELS[:1])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), layout="constrained", squeeze=False)
    for ax, (value, label) in zip(axes[0], panels, strict=True):
        _scatter(ax, rows, value, label)
    fig.suptitle("quality vs parameters")
    return _fig_png(fig, plt)


def plot_latency(rows: list[tuple[str, ModelMetrics]]) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    ax = axes[0]
    _scatter(ax, rows, lambda e: e.latency.per_step_s * 1e3, "latency per step (ms)")
    for _, e in rows:
        lat = e.latency
        ax.errorbar([e.parameters / 1e6], [lat.per_step_s * 1e3],
                    yerr=[[(lat.median_s - lat.min_s) * lat.calls_per_step * 1e3],
                          [(lat.max_s - lat.median_s) * lat.calls_per_step * 1e3]],
                    fmt="none", ecolor="0.4", capsize=3)
    _scatter(axes[1], rows, lambda e: e.speedup, "speedup vs teacher (x, paired)")
    for _, e in rows:
        st = e.speedup_stats
        if st is not None:
            axes[1].errorbar([e.parameters / 1e6], [st.median], yerr=[[st.median - st.q25], [st.q75 - st.median]],
                             fmt="none", ecolor="C3" if not st.reliable else "0.4", capsize=3)
    fig.suptitle("latency vs parameters (bars: min-max of the timed forwards; speedup: interquartile range of "
                 "the teacher/model pairs, red = too spread to trust)", fontsize=9)
    return _fig_png(fig, plt)


def build_report(metrics_paths: list[str | Path], out: str | Path, *, title: str = "ppcl: pruning ratios compared"
                 ) -> ReportResult:
    """Read every metrics.json (validated), write the plots and report.html into ``out``.

    Raises:
        PPCLError: no inputs, or a missing/invalid metrics file (before anything is written).
    """
    from ppcl.atomic import atomic_path, write_bytes
    from ppcl.evaluate.html import HEADER, esc, img_tag, model_row, page, speed_warnings, table

    if not metrics_paths:
        raise PPCLError("no metrics files given")
    paths = [Path(p) for p in metrics_paths]
    runs = [(_run_label(p, i), load_metrics(p)) for i, p in enumerate(paths)]
    labels = [lbl for lbl, _ in runs]
    if len(set(labels)) < len(labels):  # same folder names: fall back to numbered labels
        runs = [(f"run{i}", m) for i, (_, m) in enumerate(runs)]
    rows = collect_rows(runs)
    warnings = comparability_warnings(runs)
    slow = speed_warnings([e for _, m in runs for e in m.models])
    summary = summary_lines(runs)

    quality_png = plot_quality(rows)
    latency_png = plot_latency(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [write_bytes(out / "quality_vs_parameters.png", quality_png),
             write_bytes(out / "latency_vs_parameters.png", latency_png)]

    body = ""
    if warnings:
        body += "<div style='background:#fff3cd;padding:0.5em 1em'><b>Not comparable:</b><ul>" + "".join(
            f"<li>{esc(w)}</li>" for w in warnings) + "</ul></div>"
    if slow:
        body += "<div style='background:#fff3cd;padding:0.5em 1em'><b>Speed not trusted:</b><ul>" + "".join(
            f"<li>{esc(w)}</li>" for w in slow) + "</ul></div>"
    body += "<h2>Summary</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in summary) + "</ul>"
    body += "<ul>" + "".join(
        f"<li><b>{esc(lbl)}</b>: <code>{esc(p)}</code> — {len(m.models) - 1} model(s), {m.samples} samples, "
        f"{m.settings.steps} steps, {m.settings.width}×{m.settings.height}, {esc(m.settings.device)}"
        + (f", FID features <code>{esc(m.fid_extractor.name)}</code>" if m.fid_extractor else "") + "</li>"
        for (lbl, m), p in zip(runs, paths)) + "</ul>"
    table_rows = [[esc(lbl)] + model_row(e) for lbl, e in rows]
    body += table(["run"] + HEADER, table_rows)
    body += "<h2>Quality vs parameters</h2>" + img_tag(quality_png, "quality vs parameters")
    body += "<h2>Latency vs parameters</h2>" + img_tag(latency_png, "latency vs parameters")
    for (lbl, _), p in zip(runs, paths):
        grid = p.parent / "grid.png"
        if grid.is_file():
            body += f"<h2>Samples: {esc(lbl)}</h2>" + img_tag(grid.read_bytes(), f"grid {lbl}")
    report = out / "report.html"
    write_bytes(out / SUMMARY_FILE, ("\n".join(summary) + "\n").encode())
    with atomic_path(report) as tmp:
        tmp.write_text(page(title, body), encoding="utf-8")
    return ReportResult(out, report, plots, rows, warnings + slow, summary)


#: the closing summary, one line per evaluated model (``ppcl demo`` prints it at the end)
SUMMARY_FILE = "summary.txt"


def summary_line(model: ModelMetrics, teacher: ModelMetrics) -> str:
    """``keep 0.58 (asked 0.6): 0.58 of the parameters (0.90 M of 1.56 M), speedup 1.85x, judge accuracy 0.931 vs
    the teacher's 0.994``: what was kept, what it bought, what it cost, on one line."""
    line = (f"{model.name}: {model.parameters_ratio:.2f} of the parameters ({model.parameters / 1e6:.2f} M of "
            f"{teacher.parameters / 1e6:.2f} M), speedup {model.speedup:.2f}x")
    st = model.speedup_stats
    if st is not None:
        line += f" (paired median, interquartile {st.q25:.2f}-{st.q75:.2f}{'' if st.reliable else ', UNRELIABLE'})"
    if model.judge_accuracy is not None and teacher.judge_accuracy is not None:
        line += f", judge accuracy {model.judge_accuracy:.3f} vs the teacher's {teacher.judge_accuracy:.3f}"
        if model.judge_fid is not None and teacher.judge_fid is not None:
            line += f", judge-FID {model.judge_fid:.1f} vs {teacher.judge_fid:.1f}"
    elif model.fid is not None and teacher.fid is not None:
        line += f", FID {model.fid:.2f} vs the teacher's {teacher.fid:.2f}"
    elif model.clip_score is not None and teacher.clip_score is not None:
        line += f", CLIP score {model.clip_score:.2f} vs the teacher's {teacher.clip_score:.2f}"
    elif model.fidelity is not None and model.fidelity.latent_psnr_db is not None:
        line += f", latent PSNR {model.fidelity.latent_psnr_db:.1f} dB vs the teacher"
    return line


def summary_lines(runs: list[tuple[str, EvalMetrics]]) -> list[str]:
    """One :func:`summary_line` per model of every run (each against its own run's teacher), most parameters
    first."""
    pairs = [(e, next(t for t in m.models if t.role == "teacher")) for _, m in runs for e in m.models
             if e.role != "teacher"]
    return [summary_line(e, t) for e, t in sorted(pairs, key=lambda p: -p[0].parameters)]
