"""report.html of one evaluation: the metrics table and the grid, images embedded (base64), readable offline.

The small page helpers (:func:`page`, :func:`table`, :func:`img_tag`) are shared with :mod:`ppcl.report`.
"""

from __future__ import annotations

import base64
import html
import math

from ppcl.evaluate.metrics import EvalMetrics, ModelMetrics

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
code, .small { font-size: 0.85em; color: #555; }
img { max-width: 100%; image-rendering: pixelated; }
"""


def esc(x) -> str:
    return html.escape(str(x))


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>\n")


def fmt(x, digits: int = 3) -> str:
    """A number for a table cell; None -> an em dash."""
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isinf(x):
            return "∞"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.{digits}f}"
    return esc(x)


def _psnr(x: float | None, identical: bool) -> str:
    return "∞ (identical)" if x is None and identical else fmt(x, 2)


def speedup_cell(m: ModelMetrics) -> str:
    """The speedup with its paired spread; flagged when the pairs disagree too much to trust it."""
    st = m.speedup_stats
    if st is None:
        return fmt(m.speedup, 2)
    cell = f"{m.speedup:.2f} <span class=small>[{st.q25:.2f}–{st.q75:.2f}], {st.pairs} pairs</span>"
    if not st.reliable:
        cell += (f" <b title='interquartile spread {st.spread:.0%} of the median, above {st.spread_limit:.0%}'>"
                 "⚠ unreliable</b>")
    return cell


def model_row(m: ModelMetrics) -> list[str]:
    f = m.fidelity
    lat = m.latency
    return [
        esc(m.name) + (" <span class=small>(teacher)</span>" if m.role == "teacher" else ""),
        f"{m.parameters:,}", fmt(m.parameters_ratio),
        f"{lat.per_step_s * 1e3:.3f} <span class=small>[{lat.min_s * 1e3:.3f}–{lat.max_s * 1e3:.3f}] ×{lat.calls_per_step}</span>",
        speedup_cell(m),
        f"{m.memory.peak_bytes / 2**20:,.1f} <span class=small>(+{m.memory.model_bytes / 2**20:,.1f})</span>",
        fmt(m.judge_accuracy, 4), fmt(m.judge_fid, 2),
        fmt(m.fid), fmt(m.clip_score),
        _psnr(f.latent_psnr_db, f.identical) if f else "—",
        fmt(f.latent_cosine, 4) if f else "—",
        _psnr(f.image_psnr_db, f.identical) if f else "—",
    ]


HEADER = ["model", "parameters", "ratio", "latency/step ms [min–max]", "speedup [q25–q75]", "peak MiB (+model)",
          "judge acc.", "judge-FID", "FID", "CLIP score", "latent PSNR dB", "latent cosine", "image PSNR dB"]


def speed_warnings(models: list[ModelMetrics]) -> list[str]:
    """One line per model whose paired speedup is too spread to trust."""
    return [f"{m.name}: speedup {m.speedup:.2f} is not reliable: the paired timings' interquartile spread is "
            f"{m.speedup_stats.spread:.0%} of the median (limit {m.speedup_stats.spread_limit:.0%}); the machine "
            "was busy or the model too small to time; rerun the evaluation on a quiet machine"
            for m in models if m.speedup_stats is not None and not m.speedup_stats.reliable]


def render_report(metrics: EvalMetrics, grid_png: bytes | None) -> str:
    s = metrics.settings
    ex = metrics.fid_extractor
    facts = [
        f"{len(metrics.prompts)} prompts × {s.seeds} seeds = {metrics.samples} samples; {s.steps} steps; "
        f"{s.width}×{s.height}; guidance {fmt(s.guidance)}; batch {s.batch_size}; device {esc(s.device)}, "
        f"{esc(s.dtype)}",
        f"teacher: <code>{esc(metrics.teacher)}</code>",
        f"FID features: <code>{esc(ex.name)}</code> sha256 <code>{esc(ex.sha256[:16])}</code>" if ex else "FID: not computed",
        (f"reference: <code>{esc(metrics.reference.path)}</code> ({metrics.reference.num_images} images, sha256 "
         f"<code>{esc(metrics.reference.sha256[:16])}</code>)") if metrics.reference else "",
        f"CLIP: <code>{esc(metrics.clip_model.name)}</code>" if metrics.clip_model else "CLIP score: not computed",
        (f"judge: <code>{esc(metrics.judge.name)}</code> sha256 <code>{esc(metrics.judge.sha256[:16])}</code>; "
         "judge acc. = stated caption attributes the judge finds in the image; judge-FID on its "
         f"{metrics.judge.num_features}-d features against {esc(metrics.judge_reference.path)}")
        if metrics.judge and metrics.judge_reference else "judge: not computed (prompts are not synth captions)",
        f"memory: {esc(metrics.models[0].memory.kind)}; latency: median of {s.latency_repeats} transformer forwards "
        f"after {s.latency_warmup} warm-up, × calls per step ({esc(metrics.models[0].latency.timer)}); speedup: "
        "median of the teacher/model ratios of forwards timed in alternating pairs on the same inputs",
    ]
    body = "<ul>" + "".join(f"<li>{x}</li>" for x in facts if x) + "</ul>"
    warnings = speed_warnings(metrics.models)
    if warnings:
        body += ("<div style='background:#fff3cd;padding:0.5em 1em'><b>Speed not trusted:</b><ul>"
                 + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul></div>")
    body += table(HEADER, [model_row(m) for m in metrics.models])
    if grid_png:
        body += "<h2>Samples (same prompts and seeds)</h2>" + img_tag(grid_png, "grid")
    body += f"<p class=small>metrics.json version {metrics.version}, created {esc(metrics.created)}</p>"
    return page("ppcl evaluation", body)
