"""``ppcl compare``: the runs of an MLflow experiment side by side, one row per (pipeline run, ratio).

Reads the run structure :mod:`ppcl.tracking` writes: every ratio-branch run (tag ``ppcl.kind=ratio``) carries
its evaluation metrics; a pipeline whose stages logged into Kubeflow-injected runs (no branch runs) is read from
its ``evaluate`` stage runs instead. Settings come from the same pipeline's stage runs (select method, distill
steps and learning rate) and the plan's intervals from the pipeline's parent run.

Writes ``compare.md``, ``compare.csv`` and ``quality_vs_size.png`` (quality metrics against the parameter ratio,
one line per pipeline run) into ``--out``, prints the Markdown table, and logs the three files to a run named
``compare`` (tag ``ppcl.kind=compare``) in the same experiment.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

HELP = "compare the runs of an MLflow experiment: a table of ratios (size, latency, FID, CLIP, fidelity) + plot"

#: (column header, where the value comes from: "metric:<name>" on the ratio run, "param:<name>" in the pipeline)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "param:select.method"),
    ("distill_steps", "param:distill.steps"),
    ("learning_rate", "param:distill.lr"),
    ("plan_intervals", "param:plan.intervals"),
    ("parameters", "metric:parameters"),
    ("parameters_ratio", "metric:parameters_ratio"),
    ("ms_per_step", "metric:ms_per_step"),
    ("speedup", "metric:speedup"),
    ("fid", "metric:fid"),
    ("clip_score", "metric:clip_score"),
    ("latent_psnr_db", "metric:latent_psnr_db"),
    ("latent_cosine", "metric:latent_cosine"),
)
QUALITY = (("fid", "FID (lower is better)"), ("clip_score", "CLIP score"), ("latent_psnr_db", "latent PSNR to teacher (dB)"),
           ("latent_cosine", "latent cosine to teacher"))  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (config tracking.experiment)")
    parser.add_argument("--out", default=None, help="output folder (default ./ppcl-runs/compare/<experiment>)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///ppcl-runs/mlflow.db)")
    parser.add_argument("--no-log", action="store_true", help="do not log the table and plot back to MLflow")


def _uri(arg: str | None) -> str:
    from ppcl.errors import PPCLError

    if arg:
        return arg
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path("ppcl-runs") / "mlflow.db"
    if db.is_file():
        return f"sqlite:///{db.resolve()}"
    raise PPCLError("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI (no ./ppcl-runs/mlflow.db here)")


def collect(client, experiment_id: str) -> list[dict[str, Any]]:
    """One dict per (pipeline run, ratio): ``pipeline``, ``ratio``, ``run_id`` and every column of COLUMNS."""
    from mlflow.entities import ViewType

    from ppcl import tracking

    def search(query: str):
        return client.search_runs([experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY, max_results=5000)

    branches = search(f"tags.`{tracking.TAG_KIND}` = 'ratio'")
    have = {r.data.tags.get(tracking.TAG_PIPELINE) for r in branches}
    evaluated = [r for r in search(f"tags.`{tracking.TAG_STAGE}` = 'evaluate'")
                 if r.data.tags.get(tracking.TAG_PIPELINE) not in have]  # fmt: skip
    params: dict[str | None, dict[str, str]] = {}
    rows = []
    for r in [*branches, *evaluated]:
        pid = r.data.tags.get(tracking.TAG_PIPELINE)
        if pid not in params:  # every param any run of this pipeline logged (stage-prefixed names)
            merged: dict[str, str] = {}
            if pid:
                for s in search(f"tags.`{tracking.TAG_PIPELINE}` = '{pid}'"):
                    merged.update(s.data.params)
            params[pid] = merged
        ratio = r.data.tags.get(tracking.TAG_RATIO)
        row: dict[str, Any] = {"pipeline": pid or r.info.run_name, "ratio": float(ratio) if ratio else None,
                               "run_id": r.info.run_id, "start_time": r.info.start_time}  # fmt: skip
        for col, src in COLUMNS:
            kind, name = src.split(":", 1)
            row[col] = r.data.metrics.get(name) if kind == "metric" else params[pid].get(name)
        rows.append(row)
    rows.sort(key=lambda x: (x["start_time"], -(x["ratio"] or 0)))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


HEADERS = ("pipeline", "ratio", *(c for c, _ in COLUMNS))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[h]).replace("|", "\\|") for h in HEADERS) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADERS)
    for r in rows:
        w.writerow(["" if r[h] is None else r[h] for h in HEADERS])
    return buf.getvalue()


def plot(rows: list[dict[str, Any]]) -> bytes:
    """Quality metrics (those present) against the transformer parameter ratio; one line per pipeline run."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in QUALITY if any(r.get(k) is not None for r in rows)] or [
        ("speedup", "speedup vs teacher")
    ]
    # constrained layout: side by side, a panel's y label otherwise overlapped the tick labels of the one before
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False, layout="constrained")
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for pid in dict.fromkeys(r["pipeline"] for r in rows):
            pts = sorted((r["parameters_ratio"], r[key]) for r in rows
                         if r["pipeline"] == pid and r.get(key) is not None and r.get("parameters_ratio") is not None)  # fmt: skip
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=str(pid))
        ax.set_xlabel("transformer parameters / teacher")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("quality vs size")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def compare(experiment: str, out: str | os.PathLike, *, tracking_uri: str, log: bool = True) -> list[dict[str, Any]]:
    """Build the table and plot of ``experiment`` into ``out``; returns the rows. See the module doc."""
    from mlflow import MlflowClient

    from ppcl import tracking
    from ppcl.atomic import atomic_path
    from ppcl.errors import PPCLError

    tracking.configure_http()  # a dead or stalled server: one line within PPCL_MLFLOW_TIMEOUT x attempts
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        rows = collect(client, exp.experiment_id) if exp is not None else None
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI: one line
        first = tracking.failure_reason(e, tracking_uri)
        raise PPCLError(tracking.scrub("", f"cannot read experiment '{experiment}' at {tracking_uri}: {first}")) from e
    if exp is None:
        raise PPCLError(tracking.scrub("", f"experiment '{experiment}' not found at {tracking_uri}"))
    if not rows:
        raise PPCLError(f"experiment '{experiment}' has no evaluated ratios yet (no ratio or evaluate runs)")
    with atomic_path(out, directory=True) as tmp:
        (tmp / "compare.md").write_text(f"# {experiment}: runs and ratios\n\n" + markdown(rows))
        (tmp / "compare.csv").write_text(csv_text(rows))
        (tmp / "quality_vs_size.png").write_bytes(plot(rows))
    if log:
        run_id = client.create_run(exp.experiment_id, run_name="compare", tags={tracking.TAG_KIND: "compare"}).info.run_id
        run = tracking.Run(client, run_id, tracking_uri)
        for name in ("compare.md", "compare.csv", "quality_vs_size.png"):
            run.log_artifact(Path(out) / name)
        run.log_metrics({"rows": len(rows)})
        client.set_terminated(run_id, "FINISHED")
    return rows


def run(args: argparse.Namespace) -> int:
    uri = _uri(args.tracking_uri)
    out = Path(args.out) if args.out else Path("ppcl-runs") / "compare" / args.experiment
    rows = compare(args.experiment, out, tracking_uri=uri, log=not args.no_log)
    print(markdown(rows), end="")
    print(f"\n{len(rows)} rows -> {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'quality_vs_size.png'}")
    return 0
