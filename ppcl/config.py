"""The one configuration of a compression run: a typed YAML file, validated before any stage runs.

``ppcl pipeline compile|run --local|submit`` and ``ppcl demo`` all read a :class:`RunConfig`. A file names only
what it changes; everything else takes the defaults below. Example (every section optional except ``teacher``)::

    version: 1
    teacher: s3://models/flux-dev        # diffusers pipeline folder, s3:// prefix or hub id
    family: flux                         # optional: checked against the teacher when given
    data: {source: s3://data/cc12m-subset, shards: 16}
    ratios: [0.75, 0.5]                  # keep-params ratios, one exported + evaluated model each
    distill: {steps: 20000, lr: 1.0e-5}
    evaluate: {steps: 28, height: 1024, width: 1024, prompts: [a red cube on a table]}
    resources: {gpu: {type: nvidia.com/gpu, count: 8}}

Design choices (system.md is silent on them):
- Credentials never appear here: the schema has no field for them, and ``extra="forbid"`` rejects a stray
  ``aws_secret_access_key:`` with a line naming it rather than silently carrying it into a compiled pipeline.
- The plan is selected once, for the SMALLEST ratio (``select.keep_params`` defaults to ``min(ratios)``), and
  distillation trains every plug of that plan; each ratio then exports a subset of the same plugs (method.md
  section 2: one training run serves several ratios).
- Sections mirror the DAG stages and ARE the stages' settings models (:mod:`ppcl.settings`, from which the
  CLI flags are generated too: one set of defaults, one message for a bad value). Each stage receives its own
  section as a plain dict (a KFP ``Struct`` parameter) and re-validates it with the same model, so a component
  fed by hand gets the same checks.
- Resources (CPU/memory requests, GPU type/count) are compile-time settings of the pipeline: KFP bakes them
  into the pod specs. The committed ``pipelines/ppcl_pipeline.yaml`` uses the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ppcl.errors import PPCLError
from ppcl.settings import (  # SELECT_METHODS: re-exported, the one list of selectors
    SELECT_METHODS,  # noqa: F401
    DistillSettings,
    EncodeSettings,
    EvaluateSettings,
    ExportSettings,
    ProbeSettings,
    SelectSettings,
    ShardSettings,
    field_error,
)

CONFIG_VERSION = 1
from ppcl.arch import FAMILIES  # names only; importing it loads no model code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The run config's sections ARE the stages' settings models (ppcl.settings): one definition of every field,
# default and constraint for the CLI, the YAML and the components. The old names stay as aliases.
DataConfig = ShardSettings
EncodeConfig = EncodeSettings
ProbeConfig = ProbeSettings
SelectConfig = SelectSettings
EvaluateConfig = EvaluateSettings


class DistillConfig(DistillSettings):
    """The distill section: every :class:`ppcl.settings.DistillSettings` field plus the cluster-only shape of
    the job (no ``ppcl distill`` flag: the CLI is one process of that job).

    ``nodes`` > 1: multi-node mode. The distill step does not train in its own pod; it submits a Kubeflow Trainer
    TrainJob of ``nodes`` x ``gpus_per_node`` processes (:mod:`ppcl.trainjob`), waits for it and collects its
    outputs; teacher and cache must then be on S3 (see :func:`ppcl.stages.distill`)."""

    nodes: int = Field(1, ge=1, description="nodes of the multi-node TrainJob (1: train in the step's own pod)")
    gpus_per_node: int = Field(default_factory=lambda: _gpu_pool().accelerator_count, ge=1,
                               description="GPUs = training processes per node: of the distill step's pod "
                                           "(nodes 1) or of each TrainJob node; default resources.gpu.count")


class GpuConfig(_Strict):
    """GPUs of one GPU stage pod (distill, evaluate; the probe takes one of this type). Defaults:
    :data:`ppcl.cluster.GPU_POOL`."""

    type: str = Field(default_factory=lambda: _gpu_pool().accelerator_type)
    count: int = Field(default_factory=lambda: _gpu_pool().accelerator_count, ge=1)


class StageResources(_Strict):
    """Kubernetes requests of one stage's pod (``"2"``, ``"500m"`` CPUs; ``"8G"``, ``"16Gi"`` memory)."""

    cpu: str = "2"
    memory: str = "8G"


def _default_resources() -> dict[str, StageResources]:
    small, big = StageResources(cpu="2", memory="8G"), StageResources(cpu="8", memory="64G")
    return {
        "shard": small, "encode": big, "probe": big, "select": small,
        "distill": big, "export": big, "evaluate": big, "report": small,
    }  # fmt: skip


class ResourcesConfig(_Strict):
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    stages: dict[str, StageResources] = Field(default_factory=_default_resources)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: dict[str, StageResources]) -> dict[str, StageResources]:
        unknown = sorted(set(v) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
        return {**_default_resources(), **v}


class TrackingConfig(_Strict):
    """MLflow: ``mlflow_uri`` None means ``$MLFLOW_TRACKING_URI`` (cluster ConfigMap) or sqlite in the run folder."""

    mlflow_uri: str | None = None
    experiment: str = "ppcl"


STAGES: tuple[str, ...] = ("shard", "encode", "probe", "select", "distill", "export", "evaluate", "report")


class RunConfig(_Strict):
    """One compression run. ``teacher`` is required; every section has defaults."""

    version: Literal[1] = 1
    name: str = Field("ppcl", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    teacher: str = Field(min_length=1)
    family: str | None = None
    ratios: list[float] = Field(default_factory=lambda: [0.75, 0.5], min_length=1)
    data: ShardSettings = Field(default_factory=ShardSettings)
    encode: EncodeSettings = Field(default_factory=EncodeSettings)
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    select: SelectSettings = Field(default_factory=SelectSettings)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run_root: str = "ppcl-runs"

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        if value is not None and value not in FAMILIES:
            raise ValueError(f"unknown family {value!r} (expected one of {', '.join(FAMILIES)})")
        return value

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        for i, r in enumerate(v):
            if not 0 < r <= 1:
                raise ValueError(f"ratio #{i} = {r} is outside (0, 1]")
        if len(set(v)) != len(v):
            raise ValueError("ratios must be distinct")
        return v

    @model_validator(mode="after")
    def _distill_gpus(self) -> "RunConfig":
        # The distill step uses every GPU its pod gets: unless set, its process count is the GPU stages' count.
        if "gpus_per_node" not in self.distill.model_fields_set:
            self.distill.gpus_per_node = self.resources.gpu.count
        return self

    @property
    def keep_params(self) -> float:
        """The plan's budget: ``select.keep_params`` or the smallest ratio."""
        return self.select.keep_params if self.select.keep_params is not None else min(self.ratios)

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The plain-dict settings a component receives for ``stage`` (JSON, no nulls): its section, which is
        the stage's :mod:`ppcl.settings` model (export has no section: its budget is each ratio)."""
        section = {"shard": "data", "distill": "distill", "encode": "encode", "probe": "probe", "select": "select",
                   "evaluate": "evaluate"}.get(stage)  # fmt: skip
        # None means "the stage's default" everywhere, and KFP Struct parameters cannot hold null: drop them
        settings = getattr(self, section) if section else ExportSettings()
        out = settings.model_dump(mode="json", exclude_none=True)
        if stage == "select":
            out["keep_params"] = self.keep_params
        if stage in ("encode", "probe", "distill", "export", "evaluate") and self.family:
            out["family"] = self.family
        return out


def _gpu_pool():
    from ppcl.cluster import GPU_POOL

    return GPU_POOL


def validate_config(data: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a config mapping; a bad one raises PPCLError naming ``source`` and the first bad field."""
    if not isinstance(data, dict):
        raise PPCLError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    from ppcl.storage import refuse_uri_credentials

    refuse_uri_credentials(data, f"{source}: field")  # every URI-valued field (teacher, data.source, mlflow_uri)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        # the same wording as a stage's CLI flags (ppcl.settings.validate_settings), without the flag
        raise PPCLError(f"{source}: {field_error(e)}") from None
    if cfg.select.keep_params is not None and cfg.select.keep_params > min(cfg.ratios):
        raise PPCLError(
            f"{source}: field 'select.keep_params' {cfg.select.keep_params} is above the smallest ratio "
            f"{min(cfg.ratios)}: the plan must hold enough plugs for every ratio"
        )
    return cfg


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def demo_config_data(override: dict[str, Any] | None = None) -> dict[str, Any]:
    """``DEMO_DEFAULTS`` with ``override`` merged over it (``ppcl demo --config``). Unless the override names
    ``distill.output_loss_ratios``, the demo's one run also trains every ratio above the smallest in its
    output-level term (every step: ``output_loss_schedule`` every_step): it serves all its ratios
    (docs/benchmark.md, "The demo": without it the keep-0.8 model scored below the keep-0.6 one). The ratios
    are derived here, after the merge, so a config that changes
    ``ratios`` never inherits ratios of another run."""
    override = override or {}
    data = merge(DEMO_DEFAULTS, override)
    distill = dict(data.get("distill") or {})
    ratios = data.get("ratios") or []
    if "output_loss_ratios" not in (override.get("distill") or {}) and distill.get("output_loss_weight", 0) > 0 \
            and isinstance(ratios, list) and all(isinstance(r, (int, float)) for r in ratios) and ratios:
        distill["output_loss_ratios"] = sorted((r for r in ratios if r != min(ratios)), reverse=True)
    data["distill"] = distill
    return data


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML config file into a mapping (not validated yet)."""
    p = Path(path)
    if not p.is_file():
        raise PPCLError(f"--config {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise PPCLError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise PPCLError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    if not isinstance(data, dict):
        raise PPCLError(f"{p}: expected a mapping of settings at the top level")
    return data


def load_config(path: str | os.PathLike | None, *, defaults: dict[str, Any] | None = None,
                overrides: dict[str, Any] | None = None) -> RunConfig:
    """``defaults`` <- file at ``path`` <- ``overrides``, validated. Raises PPCLError naming file and field."""
    data = merge(defaults or {}, read_config_file(path) if path else {})
    data = merge(data, overrides or {})
    return validate_config(data, source=str(path) if path else "config")


def synth_eval_prompts(n: int) -> list[str]:
    """The captions of the first ``n`` images of the benchmark's evaluation set (:func:`ppcl.bench.teacher.
    eval_prompts`, seed 2000): synth captions the reference teacher draws and its judge reads."""
    import numpy as np

    from ppcl.data.synth import caption, sample_attributes

    return [caption(sample_attributes(np.random.default_rng([2000, i]))) for i in range(n)]


#: The laptop demo (``ppcl demo``): the reference teacher (else a tiny random FLUX built into the run folder),
#: synthetic data, CPU-sized settings chosen by measurement (issue 20; numbers in docs/benchmark.md, "The demo"):
#: the keep-0.6 branch must draw what the teacher draws (judge attribute accuracy >= 0.90 on 64 prompts, the
#: teacher ~0.99) within 5 minutes on 2 cores. Almost all of that budget goes to distillation, where it pays: the
#: benchmark's recipe (lr 1e-2, output-level loss weight 1, batch 16, 10% of the samples on the empty prompt so
#: the student learns the unconditional branch true CFG runs) on a cache of 2048 synth images (encoding them costs
#: seconds); evaluation is cheap at 32 px (64 prompts, 10 Euler steps; text length 16 and true CFG 3
#: come from the reference teacher's ``ppcl.json``, :func:`ppcl.arch.generation_defaults`).
#: tests/test_demo_quality.py holds these settings to the accuracy floor.
DEMO_DEFAULTS: dict[str, Any] = {
    "name": "ppcl-demo",
    "ratios": [0.8, 0.6],
    "data": {"shards": 2, "synth_samples": 2048, "synth_size": 32},
    "encode": {"resolution": 32, "batch_size": 64},
    "probe": {"samples": 64, "timesteps": 2, "batch_size": 16, "hsic_tokens": 16},
    "distill": {"steps": 800, "lr": 1e-2, "batch_size": 16, "warmup_steps": 20, "timesteps": "logit_normal",
                "output_loss_weight": 1.0, "output_loss_schedule": "every_step", "uncond_ratio": 0.1,
                "checkpoint_every": 400},
    "evaluate": {
        "steps": 10, "height": 32, "width": 32, "seeds": 1, "batch_size": 64,
        # pairs of teacher/model forwards (paired speedup); a forward of this model takes milliseconds
        "latency_warmup": 3, "latency_repeats": 20, "grid_samples": 6,
        "prompts": synth_eval_prompts(64),
    },
}  # fmt: skip
