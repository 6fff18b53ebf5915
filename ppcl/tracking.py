"""MLflow runs for every stage of a compression run, large artifacts to S3, the exported models registered.

Run structure (the same locally and on Kubeflow)::

    <pipeline run id>              parent run, tag ppcl.kind=pipeline (config params, plan, report.html)
      shard, encode, probe, select, distill, report       one nested run per stage (tag ppcl.stage)
      ratio-0.8                    one nested run per ratio branch (tag ppcl.ratio; evaluation metrics)
        export, evaluate           the branch's stage runs

Every run carries the tag ``ppcl.pipeline_run_id``. Each stage runs in its own process (a KFP component), so the
parent and the branch runs are found by their tags, or created (find-or-create; when two processes race, every
process picks the oldest run and a loser deletes its own duplicate).

Where things come from (environment only, never a config field; design choices, system.md is silent):
- ``MLFLOW_TRACKING_URI``: no URI, or ``PPCL_TRACKING=0``: tracking is off and every call here is a no-op that
  imports nothing. ``ppcl pipeline run --local`` / ``ppcl demo`` set a sqlite URI (:func:`local_uri`); the
  file store is never used.
- Kubeflow's own MLflow integration injects ``MLFLOW_RUN_ID`` (the task's run, already nested under the
  pipeline's run) and ``MLFLOW_EXPERIMENT_ID``: we log into that run and create nothing.
- The pipeline run id: ``PPCL_RUN_ID`` (set by the local runner), else read from the stage's output path
  (KFP lays artifacts out as ``.../<run id>/[for-loop-*/]<task>/[<execution id>/]<output>`` on a cluster and
  locally). Without one, a stage logs a single top-level run.
- Experiment: ``MLFLOW_EXPERIMENT_ID`` or ``MLFLOW_EXPERIMENT_NAME`` (default ``ppcl``).
- Large artifacts (shards, cache, plugs and checkpoints, exported models) go to ``PPCL_ARTIFACT_ROOT``
  (``s3://bucket/prefix``; default ``s3://$PPCL_BUCKET/ppcl-artifacts`` when ``PPCL_BUCKET`` is set) through
  :mod:`ppcl.storage` (multipart, checksums verified, retries, no partial object under a final key), under
  ``<root>/<experiment>/<pipeline run id>/<stage>[-<ratio>]/``. Without a root the exported model is logged as
  an MLflow artifact instead (MLflow's artifact store may itself be S3) and small artifacts always are.
- Registered model name: ``PPCL_MODEL_NAME`` (default ``ppcl-pruned``).

Security: parameters and tags pass through :func:`scrub`: a key that looks like a credential
(secret/password/token/...key) has its value replaced, and any occurrence of a credential value from the
environment (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, ...) or of user:password in a URI is masked.

Dead servers fail fast (design choice): MLflow's HTTP client retries 7 times with backoff factor 2 and a 120 s
timeout by default, so a stalled server held a stage silently for minutes. :func:`configure_http` (called before
every client is made) sets ``MLFLOW_HTTP_REQUEST_TIMEOUT`` from ``PPCL_MLFLOW_TIMEOUT`` (whole seconds per connect
and read, default 10), ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` from ``PPCL_MLFLOW_MAX_RETRIES`` (default 2),
backoff factor 1 and jitter 0.5 s: a dead or stalled server is reported, naming the URI, within
3 x 10 s + 2.5 s of backoff = 33 s. A value the user set for one of MLflow's own variables is kept.

Failures: a failed upload or MLflow call raises :class:`PPCLError` (one line naming the bucket/key or the
tracking URI). Each stage's run is closed FINISHED or FAILED on its own, so the runs of stages that completed
before a failure stay intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ppcl.errors import PPCLError

TAG_PIPELINE = "ppcl.pipeline_run_id"
TAG_KIND = "ppcl.kind"  # pipeline | ratio | stage
TAG_STAGE = "ppcl.stage"
TAG_RATIO = "ppcl.ratio"
TAG_ARTIFACTS = "ppcl.artifacts_uri"
TAG_MODEL_VERSION = "ppcl.model_version"
PARENT_TAG = "mlflow.parentRunId"
DEFAULT_EXPERIMENT = "ppcl"
DEFAULT_MODEL_NAME = "ppcl-pruned"
MASK = "***"

#: Stage outputs worth keeping in S3 when an artifact root is configured (the big ones).
LARGE_STAGES = ("shard", "encode", "distill", "export")
#: The evaluation numbers compared across ratios: metrics.json field -> metric name.
EVAL_METRICS = ("parameters", "parameters_ratio", "ms_per_step", "speedup", "peak_memory_mb", "fid", "clip_score",
                "latent_psnr_db", "latent_cosine", "keep_params", "speedup_spread", "speedup_unreliable",
                "judge_accuracy", "judge_image_accuracy", "judge_fid", "teacher_judge_accuracy",
                "teacher_judge_fid")  # fmt: skip

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


# --------------------------------------------------------------------------------------------- settings
def tracking_uri() -> str | None:
    """The MLflow tracking URI in force, or None when tracking is off."""
    if os.environ.get("PPCL_TRACKING", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def enabled() -> bool:
    return tracking_uri() is not None


def local_uri(run_root: str | os.PathLike = "ppcl-runs") -> str:
    """``sqlite:///<abs run_root>/mlflow.db``: the local default (one database for every run of a folder,
    so ``ppcl compare`` sees them side by side)."""
    root = Path(run_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


#: The local store standalone commands share with ``ppcl demo`` / ``ppcl pipeline run --local`` (``ppcl compare``'s
#: default): ``./ppcl-runs/mlflow.db``.
LOCAL_RUN_ROOT = "ppcl-runs"

_STANDALONE: list[bool] = []  # inside command_tracking(): a command run by hand, not a pipeline step


def _off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "off", "no")


@contextlib.contextmanager
def command_tracking(enabled: bool = True) -> Iterator[str | None]:
    """Tracking for one command run by hand (``ppcl probe``, ``ppcl evaluate`` ...); yields the URI or None.

    The command logs one top-level run per stage (tag ``ppcl.stage``; with ``PPCL_RUN_ID`` set, nested under that
    pipeline run like a pipeline step) through :func:`log_stage`, into ``MLFLOW_TRACKING_URI`` when set, else the
    local store ``./ppcl-runs/mlflow.db`` that the demo and ``ppcl compare`` use. Off with ``enabled=False`` (the
    commands' ``--no-tracking``), ``PPCL_TRACKING=0``, on ranks other than 0 of a torchrun launch (rank 0 logs
    for all), and ``PPCL_LOCAL_TRACKING=0`` turns off only the local default (the test suite sets it, so tests
    never write a database into the checkout). The environment is restored on exit (commands also run
    in-process: tests, the demo).

    Design choice: an exported model is registered by its folder (``file://`` source) instead of being copied
    into the local artifact store: a 12B teacher's export must not be written twice on a workstation. With
    ``PPCL_ARTIFACT_ROOT`` set it is uploaded there, as in the pipeline.
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "PPCL_TRACKING")}
    rank = os.environ.get("RANK", "0").strip() or "0"
    if not enabled or rank != "0":
        os.environ["PPCL_TRACKING"] = "0"
    elif tracking_uri() is None and not _off("PPCL_TRACKING") and not _off("PPCL_LOCAL_TRACKING"):
        os.environ["MLFLOW_TRACKING_URI"] = local_uri(LOCAL_RUN_ROOT)
    _STANDALONE.append(True)
    try:
        yield tracking_uri()
    finally:
        _STANDALONE.pop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_command(stage: str, metrics: Mapping[str, Any], out: str | os.PathLike,
                settings: Mapping[str, Any] | None = None) -> str | None:
    """:func:`log_stage` for a command run by hand: non-finite and non-numeric metrics dropped, one line on
    stderr saying where the run went (nothing when tracking is off). Returns the run id."""
    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    run_id = log_stage(stage=stage, metrics=clean, artifacts=out, settings=settings)
    if run_id:
        import sys

        print(f"[mlflow] {stage}: run {run_id} in {scrub('', tracking_uri() or '')} (ppcl compare, mlflow ui; "
              "--no-tracking to skip)", file=sys.stderr)
    return run_id


def artifact_root() -> str | None:
    """Where large artifacts go (``s3://...`` or a local folder), or None."""
    root = os.environ.get("PPCL_ARTIFACT_ROOT")
    if root:
        return root.rstrip("/")
    bucket = os.environ.get("PPCL_BUCKET")
    return f"s3://{bucket}/ppcl-artifacts" if bucket else None


def model_name() -> str:
    return os.environ.get("PPCL_MODEL_NAME") or DEFAULT_MODEL_NAME


def pipeline_run_id(out: str | os.PathLike | None = None, stage: str | None = None) -> str | None:
    """The id shared by every stage of one pipeline run: ``$PPCL_RUN_ID``, else read from a KFP output path."""
    env = os.environ.get("PPCL_RUN_ID")
    if env:
        return env
    if out is None or stage is None:
        return None
    parts = Path(str(out).replace("s3://", "/")).parts
    # .../<run id>/[for-loop-*-iteration-*/]<stage>/[<execution id>/]<output>: the task folder is one of the
    # last three segments (the earliest match: an output is often named like its task, probe/probe); the run
    # id is the segment before it, skipping ParallelFor folders.
    for i in range(max(len(parts) - 3, 1), len(parts)):
        if parts[i] == stage:
            j = i - 1
            while j > 0 and parts[j].startswith("for-loop-"):
                j -= 1
            return parts[j] if j > 0 else None
    return None


# ------------------------------------------------------------------------------------------- HTTP limits
#: MLflow's variables we fill in, and the value we last gave each (a value that differs is the user's: kept).
_HTTP_SET: dict[str, str] = {}


def _positive_int(name: str, default: int, *, zero_ok: bool = False) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or (value == 0 and not zero_ok):
        raise PPCLError(f"{name}={raw!r} must be a {'non-negative' if zero_ok else 'positive'} whole number")
    return value


def http_limits() -> tuple[int, int]:
    """``(timeout s per connect / read, retries)`` for MLflow HTTP calls: ``PPCL_MLFLOW_TIMEOUT`` (default 10),
    ``PPCL_MLFLOW_MAX_RETRIES`` (default 2), unless MLflow's own variables were set by the user."""
    timeout = _positive_int("PPCL_MLFLOW_TIMEOUT", 10)
    retries = _positive_int("PPCL_MLFLOW_MAX_RETRIES", 2, zero_ok=True)
    return timeout, retries


def configure_http() -> None:
    """Put :func:`http_limits` into MLflow's environment variables (it reads them per request), leaving any
    value the user gave those variables alone. Called before any MLflow client is made."""
    timeout, retries = http_limits()
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    }
    for name, value in wanted.items():
        current = os.environ.get(name)
        if current is None or current == _HTTP_SET.get(name):
            os.environ[name] = _HTTP_SET[name] = value


def failure_reason(exc: BaseException, uri: str) -> str:
    """One line for a failed MLflow call: a timeout or refused connection names the server and the setting to
    check; anything else is the exception's first line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "?")
    tries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0") or 0) + 1
    hint = "check --tracking-uri / MLFLOW_TRACKING_URI"
    if re.search(r"timed? ?out|ReadTimeout|ConnectTimeout", text, re.I):
        return (f"MLflow server {uri} did not answer within {timeout} s ({tries} attempt{'s' * (tries != 1)}; {hint}, "
                "or raise PPCL_MLFLOW_TIMEOUT)")
    if re.search(r"Connection refused|Failed to establish|NewConnectionError|Name or service not known", text):
        return f"MLflow server {uri} is unreachable (connection refused after {tries} attempt{'s' * (tries != 1)}; {hint})"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------------------------- security
_SECRET_KEY = re.compile(
    r"(secret|passw(or)?d|token|credential|private|(^|[._-])(api|access|auth|secret)?[_-]?key(_id)?$)", re.I
)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]+):(?P<pw>[^/@\s]+)@", re.I)


def _environ() -> dict[str, str]:
    """A snapshot of the environment, retried when another thread (a library's background thread) removes a
    variable while it is being copied (``KeyError`` / ``RuntimeError`` from ``os.environ``'s iterator)."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def credential_values() -> list[str]:
    """Values of credential-like environment variables (long enough to be worth masking), longest first."""
    vals = {v for k, v in _environ().items() if _SECRET_KEY.search(k) and v and len(v) >= 4}
    return sorted(vals, key=len, reverse=True)


def scrub(key: str, value: Any) -> str:
    """``value`` as a string safe to log under ``key``: masked if the key names a credential; any credential
    value from the environment and any ``user:password@`` in a URI are masked inside it."""
    if _SECRET_KEY.search(key):
        return MASK
    text = str(value)
    for secret in credential_values():
        text = text.replace(secret, MASK)
    return _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": value}``; lists stay whole (as their JSON)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


def _metric_key(name: str) -> str:
    return _METRIC_NAME.sub("_", name)


# --------------------------------------------------------------------------------------------- runs
class NullRun:
    """What every call yields when tracking is off: each method does nothing."""

    run_id: str | None = None
    active = False

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None: ...
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...
    def log_series(self, name: str, values: Iterable[tuple[int, float]]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...


NULL_RUN = NullRun()


class Run:
    """One MLflow run, logged through an ``MlflowClient`` (no global fluent state: safe in any process)."""

    active = True

    def __init__(self, client, run_id: str, uri: str):
        self.client, self.run_id, self.uri = client, run_id, uri

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PPCLError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the user needs one line
            first = failure_reason(e, self.uri)
            raise PPCLError(scrub("", f"tracking: cannot {what} (run {self.run_id} at {self.uri}): {first}")) from e

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        """Flattened, scrubbed, truncated to MLflow's limit; ``None`` values are skipped."""
        from mlflow.entities import Param

        flat = flatten(params, prefix)
        items = [Param(k[:250], scrub(k, v)[:_MAX_PARAM_LEN]) for k, v in flat.items() if v is not None]
        for i in range(0, len(items), 100):
            self._call("log params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Finite numbers only (None, NaN, inf and non-numbers are skipped)."""
        from mlflow.entities import Metric

        ts = _now_ms()
        items = [Metric(_metric_key(k), float(v), ts, step or 0) for k, v in metrics.items() if _finite(v)]
        self._batch(items)

    def log_series(self, name: str, values: Iterable[tuple[int, float]]) -> None:
        """A stepped metric ``name`` from ``(step, value)`` pairs (non-finite values skipped)."""
        from mlflow.entities import Metric

        ts = _now_ms()
        self._batch([Metric(_metric_key(name), float(v), ts, int(s)) for s, v in values if _finite(v)])

    def _batch(self, items: list) -> None:
        for i in range(0, len(items), _BATCH):
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, scrub(k, v)[:_MAX_PARAM_LEN]) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), 100):
            self._call("set tags", self.client.log_batch, self.run_id, tags=items[i : i + 100])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call(f"log artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call(f"log artifacts {path}", self.client.log_artifacts, self.run_id, str(path), artifact_path)


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _client(uri: str):
    from mlflow import MlflowClient

    configure_http()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client, uri: str) -> str:
    eid = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if eid:
        return eid
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=_local_artifact_location(uri))
        except Exception:  # noqa: BLE001 - created meanwhile by another stage process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id
    except Exception as e:  # noqa: BLE001
        first = failure_reason(e, uri)
        raise PPCLError(scrub("", f"tracking: cannot open experiment '{name}' at {uri}: {first}")) from e


def _local_artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite-tracked experiment live beside the database (MLflow's default is ./mlruns in
    whatever folder the process happens to run in); None (the server's choice) for every other URI."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


def _find_or_create(client, experiment_id: str, tags: dict[str, str], name: str) -> tuple[str, bool]:
    """The oldest live run of ``experiment_id`` carrying every tag of ``tags``, created if none."""
    from mlflow.entities import ViewType

    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())

    def search():
        runs = client.search_runs([experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = search()
    if found:
        return found[0].info.run_id, False
    mine = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
    found = search()
    if found and found[0].info.run_id != mine:  # another process won the race: use its run, drop ours
        client.delete_run(mine)
        return found[0].info.run_id, False
    return mine, True


def _ratio_label(ratio: float) -> str:
    return f"{float(ratio):g}"


class _Context:
    """Where a stage's run goes: client, experiment, the parent and the ratio branch."""

    def __init__(self, uri: str, pipeline_id: str | None, ratio: float | None):
        self.uri, self.pipeline_id, self.ratio = uri, pipeline_id, ratio
        self.client = _client(uri)
        self.injected = os.environ.get("MLFLOW_RUN_ID") or None
        self.experiment_id = None if self.injected else _experiment_id(self.client, uri)
        self.parent: str | None = None
        self.branch: str | None = None
        if self.injected or not pipeline_id:
            return
        try:
            self.parent, created = _find_or_create(
                self.client, self.experiment_id, {TAG_PIPELINE: pipeline_id, TAG_KIND: "pipeline"}, pipeline_id
            )
            if created:
                self._log_config(self.parent)
            if ratio is not None:
                self.branch, _ = _find_or_create(
                    self.client, self.experiment_id,
                    {TAG_PIPELINE: pipeline_id, TAG_KIND: "ratio", TAG_RATIO: _ratio_label(ratio),
                     PARENT_TAG: self.parent},
                    f"ratio-{_ratio_label(ratio)}",
                )  # fmt: skip
        except PPCLError:
            raise
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PPCLError(scrub("", f"tracking: cannot find or create the runs of {pipeline_id} at {uri}: {first}")) from e

    def _log_config(self, parent: str) -> None:
        """The validated config of a local run (``$PPCL_RUN_DIR/config.yaml``) as the parent's params."""
        run_dir = os.environ.get("PPCL_RUN_DIR")
        path = Path(run_dir) / "config.yaml" if run_dir else None
        if path is None or not path.is_file():
            return
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        Run(self.client, parent, self.uri).log_params(data, prefix="config.")

    def run(self, run_id: str) -> Run:
        return Run(self.client, run_id, self.uri)


@contextlib.contextmanager
def stage_run(stage: str, *, ratio: float | None = None, pipeline_id: str | None = None,
              out: str | os.PathLike | None = None) -> Iterator[Run | NullRun]:
    """The nested MLflow run of one stage; closed FINISHED, or FAILED when the block raises.

    Args:
        stage: the DAG stage name (``probe``, ``export`` ...).
        ratio: the keep-params ratio of a ParallelFor branch (export, evaluate), else None.
        pipeline_id: the pipeline run id (default :func:`pipeline_run_id` from the env or ``out``).
        out: the stage's output folder (used to find the pipeline run id on a cluster).

    Yields a :class:`Run` (``.parent`` / ``.branch`` attributes give the pipeline and ratio runs, or None), or
    :data:`NULL_RUN` when tracking is off.
    """
    uri = tracking_uri()
    if uri is None:
        yield NULL_RUN
        return
    pid = pipeline_id or pipeline_run_id(out, stage)
    ctx = _Context(uri, pid, ratio)
    tags = {TAG_STAGE: stage, TAG_KIND: "stage"}
    if pid:
        tags[TAG_PIPELINE] = pid
    if ratio is not None:
        tags[TAG_RATIO] = _ratio_label(ratio)
    if ctx.injected:
        run = ctx.run(ctx.injected)
        run.set_tags(tags)
        owned = False
    else:
        if ctx.branch or ctx.parent:
            tags[PARENT_TAG] = ctx.branch or ctx.parent
        name = stage if ratio is None else f"{stage}-{_ratio_label(ratio)}"
        try:
            run_id = ctx.client.create_run(ctx.experiment_id, tags=tags, run_name=name).info.run_id
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PPCLError(scrub("", f"tracking: cannot create the run of stage {stage} at {uri}: {first}")) from e
        run = ctx.run(run_id)
        owned = True
    run.context = ctx  # type: ignore[attr-defined]
    run.parent = ctx.parent  # type: ignore[attr-defined]
    run.branch = ctx.branch  # type: ignore[attr-defined]
    try:
        yield run
    except BaseException:
        if owned:
            with contextlib.suppress(Exception):
                ctx.client.set_terminated(run.run_id, "FAILED")
            if ctx.parent:
                with contextlib.suppress(Exception):
                    ctx.client.set_terminated(ctx.parent, "FAILED")
        raise
    if owned:
        run._call("close the run", ctx.client.set_terminated, run.run_id, "FINISHED")


# --------------------------------------------------------------------------------------------- stages
def distill_callback(run: Run | NullRun, *, every: int = 10) -> Callable[[int, dict[str, Any]], None] | None:
    """An ``on_step(step, record)`` hook for :func:`ppcl.distill.distill` that logs its losses live.

    Logs ``loss``, ``lr``, ``step_time_s`` (and ``output_loss``) and ``loss/<plug>/<stream>`` at ``step``,
    buffered and sent every ``every`` steps (call the hook's ``flush()`` at the end; a final partial buffer is
    also sent by the next call or garbage-collected unsent). None when tracking is off, so distill skips it.
    The steps it saw are remembered on ``run`` (``run.live_steps``): :func:`log_stage` given the same run then
    logs from metrics.jsonl only the steps not logged live (those before a resume), so no point is doubled.
    """
    if not getattr(run, "active", False):
        return None
    buf: list[tuple[int, dict[str, float]]] = []
    # Steps logged live: log_stage's post-hoc pass over metrics.jsonl skips them (no duplicate points).
    live: set[int] = run.__dict__.setdefault("live_steps", set())

    def flush() -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        items = [Metric(_metric_key(k), float(v), ts, s) for s, rec in buf for k, v in rec.items() if _finite(v)]
        buf.clear()
        run._batch(items)  # type: ignore[union-attr]

    def on_step(step: int, record: dict[str, Any]) -> None:
        buf.append((step, _distill_record(record)))
        live.add(step)
        if len(buf) >= every:
            flush()

    on_step.flush = flush  # type: ignore[attr-defined]
    return on_step


def _distill_record(record: Mapping[str, Any]) -> dict[str, float]:
    flat = {k: record[k] for k in ("loss", "lr", "step_time_s", "output_loss") if k in record}
    flat.update({f"loss/{k}": v for k, v in (record.get("losses") or {}).items()})
    return flat


def _ratio_of(stage: str, out: Path, settings: Mapping[str, Any]) -> float | None:
    """The ParallelFor branch a stage belongs to: export's keep_params; evaluate reads it from the export."""
    if stage == "export":
        return settings.get("keep_params")
    if stage != "evaluate":
        return None
    try:
        data = json.loads((out / "metrics.json").read_text())
        model = next(m for m in data["models"] if m.get("role") != "teacher")
        for name in ("stage.json", "ppcl_export.json"):
            p = Path(model["path"]) / name
            if p.is_file():
                info = json.loads(p.read_text())
                r = (info.get("metrics") or {}).get("keep_params", info.get("settings", {}).get("keep_params"))
                if r is not None:
                    return float(r)
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        pass
    return None


def _pngs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.png"))


def _log_probe(run: Run, out: Path) -> None:
    path = out / "probe.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    series: dict[str, list[tuple[int, float]]] = {}
    for block in data.get("blocks", []):
        i = block["index"]
        for stat in ("cka", "r2", "probe_cka", "cosine", "trend"):
            series.setdefault(f"probe.{stat}", []).append((i, block.get(stat)))
        for stream, stats in (block.get("per_stream") or {}).items():
            for stat in ("cka", "r2", "probe_cka", "cosine", "trend"):
                series.setdefault(f"probe.{stream}.{stat}", []).append((i, stats.get(stat)))
    for name, values in series.items():
        run.log_series(name, values)
    run.log_artifact(path)
    for p in _pngs(out):
        run.log_artifact(p, "plots")


def plan_params(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The plan as params: intervals, width ops, predicted parameter counts, selection method and budget."""
    params = plan.get("params") or {}
    sel = plan.get("selection") or {}
    out = {
        "plan.intervals": json.dumps(plan.get("intervals")),
        "plan.width": json.dumps(plan.get("width") or []),
        "plan.plug_sources": json.dumps(plan.get("plug_sources") or []),
        "plan.init": plan.get("init"),
        "plan.teacher_params": params.get("teacher"),
        "plan.student_params": params.get("student"),
        "plan.method": sel.get("method"),
        "plan.keep_params": sel.get("keep_params", sel.get("budget")),
    }
    if params.get("teacher"):
        out["plan.predicted_keep"] = params.get("student", 0) / params["teacher"]
    return out


def _log_select(run: Run, out: Path) -> None:
    # the stage writes a folder; `ppcl select --out FILE` a plan file, its trend plot beside it
    path = out if out.is_file() else out / "plan.json"
    if not path.is_file():
        return
    plan = json.loads(path.read_text())
    pp = plan_params(plan)
    run.log_params(pp)
    run.log_artifact(path)
    pngs = _pngs(out) if out.is_dir() else [p for p in [out.with_name(f"{out.stem}_trend.png")] if p.is_file()]
    for p in pngs:
        run.log_artifact(p, "plots")
    if run.parent:  # the plan belongs to the whole pipeline run: compare reads it there
        parent = run.context.run(run.parent)
        with contextlib.suppress(PPCLError):  # already logged by an earlier attempt of this stage
            parent.log_params(pp)
        parent.log_artifact(path)


def _log_distill(run: Run, out: Path) -> None:
    path = out / "metrics.jsonl"
    live = getattr(run, "live_steps", set())
    if path.is_file():  # post hoc: the loss curve not logged live, each plug and stream (step = training step)
        series: dict[str, list[tuple[int, float]]] = {}
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if int(rec["step"]) in live:
                continue
            for k, v in _distill_record(rec).items():
                series.setdefault(k, []).append((int(rec["step"]), v))
        for name, values in series.items():
            run.log_series(name, values)
    if (out / "run.json").is_file():
        run.log_artifact(out / "run.json")


def _upload_large(run: Run, stage: str, out: Path, ratio: float | None) -> str | None:
    """Upload ``out`` under the artifact root (see the module doc); returns its URI (None: no root)."""
    root = artifact_root()
    if root is None or not out.is_dir():
        return None
    from ppcl import storage

    exp = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    pid = run.context.pipeline_id or run.run_id
    leaf = stage if ratio is None else f"{stage}-{_ratio_label(ratio)}"
    uri = storage.join(root, exp, pid, leaf)
    storage.check_bucket(uri)
    checksums = storage.upload_dir(out, uri)
    run.set_tags({TAG_ARTIFACTS: uri})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the sha256 of every uploaded file, for readers to verify
        manifest = Path(tmp) / "uploaded.json"
        manifest.write_text(json.dumps({"uri": uri, "sha256": checksums}, indent=2) + "\n")
        run.log_artifact(manifest)
    return uri


def _register(run: Run, out: Path, ratio: float | None, source: str | None) -> None:
    """Register the exported pipeline folder as a model version (source: its S3 copy or the run's artifacts)."""
    if source is None and _STANDALONE and not run.context.pipeline_id:
        source = out.resolve().as_uri()  # by hand: registered where it is, not copied (command_tracking)
    if source is None:
        run.log_artifacts(out, "model")
        source = f"{run._call('read the run', run.client.get_run, run.run_id).info.artifact_uri}/model"
    info = {}
    if (out / "ppcl_export.json").is_file():
        info = json.loads((out / "ppcl_export.json").read_text())
    name = model_name()
    tags = {TAG_PIPELINE: run.context.pipeline_id, TAG_RATIO: None if ratio is None else _ratio_label(ratio),
            "ppcl.intervals": json.dumps(info.get("intervals")), "ppcl.parameters": info.get("parameters"),
            "ppcl.teacher_parameters": info.get("teacher_parameters"), "ppcl.plan_hash": info.get("plan_hash")}
    tags = {k: scrub(k, v) for k, v in tags.items() if v is not None}
    desc = (f"ppcl export at keep_params {ratio}: {info.get('parameters')} of {info.get('teacher_parameters')} "
            f"transformer parameters; plan intervals {info.get('intervals')} (pipeline run "
            f"{run.context.pipeline_id})")  # fmt: skip
    client = run.client

    def create():
        with contextlib.suppress(Exception):  # exists already (another ratio registered it first)
            client.create_registered_model(name)
        return client.create_model_version(name, source, run_id=run.run_id, tags=tags, description=scrub("", desc))

    mv = run._call(f"register model {name}", create)
    run.set_tags({TAG_MODEL_VERSION: f"{name}/{mv.version}"})
    if run.branch:
        run.context.run(run.branch).set_tags({TAG_MODEL_VERSION: f"{name}/{mv.version}"})


def _log_evaluate(run: Run, out: Path) -> None:
    path = out / "metrics.json"
    if path.is_file():
        run.log_artifact(path)
    for p in _pngs(out):
        run.log_artifact(p, "grids")
    if (out / "report.html").is_file():
        run.log_artifact(out / "report.html")


def _annotate_model(run: Run, metrics: Mapping[str, float]) -> None:
    """Headline evaluation metrics onto the ratio's registered model version (tags + description)."""
    if not run.branch:
        return
    branch = run._call("read the ratio run", run.client.get_run, run.branch)
    ref = branch.data.tags.get(TAG_MODEL_VERSION)
    if not ref:
        return
    name, version = ref.rsplit("/", 1)
    headline = {k: metrics[k] for k in ("fid", "clip_score", "speedup", "ms_per_step", "parameters_ratio",
                                        "latent_psnr_db", "judge_accuracy", "judge_fid") if k in metrics}  # fmt: skip
    for k, v in headline.items():
        run._call("tag the model version", run.client.set_model_version_tag, name, version, f"metric.{k}", f"{v:.6g}")
    mv = run._call("read the model version", run.client.get_model_version, name, version)
    text = ", ".join(f"{k} {v:.4g}" for k, v in headline.items())
    run._call("describe the model version", run.client.update_model_version, name, version,
              description=f"{mv.description or ''}\nEvaluation: {text}".strip())  # fmt: skip


def log_stage(*, stage: str, metrics: Mapping[str, float], artifacts: str | os.PathLike,
              settings: Mapping[str, Any] | None = None, run: Run | NullRun | None = None) -> str | None:
    """Everything tracking does for one finished stage (the seam ``ppcl.stages`` calls); returns the run id.

    Args:
        stage: the DAG stage.
        metrics: the stage's finite numbers (logged as they are; evaluate's also onto its ratio run).
        artifacts: the stage's output folder (probe.json, plan.json, metrics.jsonl, metrics.json, plots ...).
        settings: the stage's validated settings (logged as params, scrubbed).
        run: the stage's run when the stage opened it itself (:func:`stage_run`, e.g. distill, to log its losses
            live): everything goes into it and the caller closes it; None opens and closes a new one.
    """
    if not enabled() or (run is not None and not getattr(run, "active", False)):
        return None
    out = Path(artifacts)
    settings = dict(settings or {})
    ratio = _ratio_of(stage, out, settings)
    with (contextlib.nullcontext(run) if run is not None else stage_run(stage, ratio=ratio, out=out)) as run:
        run.log_params(settings, prefix=f"{stage}.")
        run.log_metrics(metrics)
        source = _upload_large(run, stage, out, ratio) if stage in LARGE_STAGES else None
        if stage == "probe":
            _log_probe(run, out)
        elif stage == "select":
            _log_select(run, out)
        elif stage == "distill":
            _log_distill(run, out)
        elif stage == "export":
            _register(run, out, ratio, source)
        elif stage == "evaluate":
            _log_evaluate(run, out)
            if run.branch:
                branch = run.context.run(run.branch)
                branch.log_metrics({k: v for k, v in metrics.items() if k in EVAL_METRICS})
            _annotate_model(run, metrics)
        elif stage == "report":
            for p in [*sorted(out.glob("*.html")), *_pngs(out)]:
                run.log_artifact(p)
                if run.parent:
                    run.context.run(run.parent).log_artifact(p)
        elif stage in ("shard", "encode"):
            for name in ("manifest.json",):
                if (out / name).is_file():
                    run.log_artifact(out / name)
        if stage == "evaluate" and run.branch:
            run._call("close the ratio run", run.client.set_terminated, run.branch, "FINISHED")
        if stage == "report" and run.parent:
            run._call("close the pipeline run", run.client.set_terminated, run.parent, "FINISHED")
        return run.run_id
