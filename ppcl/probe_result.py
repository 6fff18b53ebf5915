"""``probe.json``: the result of the similarity probe (:mod:`ppcl.probe`), its schema and its reader.

Its own module, below both the probe that writes it and :mod:`ppcl.plots` that draws it, so neither imports the
other's module to know the format. Block indices are 0-based execution order (method.md vocabulary); the meaning
of every statistic is in :mod:`ppcl.probe`'s docstring.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ppcl.arch import FAMILIES
from ppcl.errors import PPCLError, first_field_error

PROBE_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamStats(_Model):
    """One block's statistics on one stream (None where undefined, e.g. a constant state)."""

    cka: float | None
    r2: float | None
    probe_cka: float | None
    cosine: float | None
    trend: float | None


class BlockProbe(_Model):
    """One teacher block. Top-level numbers are the mean over the streams the block maps (``streams``)."""

    index: int
    kind: str
    list_name: str
    params: int
    streams: list[str]
    cka: float | None
    r2: float | None
    probe_cka: float | None
    cosine: float | None
    trend: float | None
    per_stream: dict[str, StreamStats]


class IntervalProbe(_Model):
    """The probe ``h_{end+1} ~ h_start + W h_start + b`` over blocks ``start..end`` (inclusive, ``start < end``)."""

    start: int
    end: int
    r2: float | None
    probe_cka: float | None
    cka: float | None
    per_stream: dict[str, dict[str, float | None]]


class Calibration(_Model):
    source: str  # "synthetic" or "cache"
    data: str | None = None
    samples: int
    batch_size: int
    resolution: int | None = None
    timesteps: int
    sigmas: list[float]  # the (shifted) noise levels of the first batch; one per timestep
    seed: int
    forwards: int
    tokens: dict[str, int]  # rows accumulated per stream


class Projection(_Model):
    exact: bool
    dim: int  # the feature width the moments live in (== model width when exact)
    model_dim: int
    seed: int
    kind: str = "gaussian_jl"


class CKAMatrix(_Model):
    estimator: str
    description: str
    states: str  # which states the rows/columns are
    tokens_per_forward: int
    matrices: dict[str, list[list[float | None]]]


class TrainedInterval(_Model):
    """The trained-plug score of interval ``[start, end]`` (:mod:`ppcl.probe_trained`): held-out loss D summed over
    the plug's streams, for the trained plug (``trained_loss``), the untrained copy of block ``source``
    (``initial_loss``) and the identity map, i.e. the interval simply skipped (``identity_loss``);
    ``trained_quality = trained_loss / max(identity_loss, identity_floor)`` (0 = the plug reproduces the interval)."""

    start: int
    end: int
    source: int
    trained_loss: float
    initial_loss: float
    identity_loss: float
    trained_quality: float
    #: stream -> ``{"trained", "initial", "identity"}`` loss D on that stream
    per_stream: dict[str, dict[str, float]]
    #: relative squared error of the (guided) model output with only this trained plug in place (None: written
    #: before the field existed)
    output_error: float | None = None


class TrainedProbe(_Model):
    """probe.json's optional ``trained`` field: the settings of the short trained-plug probe and every candidate's
    score (:func:`ppcl.probe_trained.trained_interval_scores`)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    timesteps: str
    max_grad_norm: float | None
    seed: int
    eval_batches: int
    init: str
    identity_floor: float
    #: what it trained on: ``"cache"``, ``"synthetic"`` or ``"in-memory"``
    data: str
    #: ``"batches"``: the held-out batches were never trained on; ``"noise"``: fixed batches the run also trained
    #: on, scored with noise and timesteps no training step drew
    heldout: str
    #: wall seconds of the whole trained probe (teacher load, scoring before and after, training)
    seconds: float
    intervals: list[TrainedInterval]
    #: share of training samples on the negative prompt
    uncond_ratio: float = 0.0
    #: the guidance scale of each interval's ``output_error`` (1: the conditional output)
    output_guidance: float = 1.0

    def interval(self, start: int, end: int) -> TrainedInterval | None:
        for iv in self.intervals:
            if iv.start == start and iv.end == end:
                return iv
        return None


class ProbeResult(_Model):
    """``probe.json``. Block indices are 0-based execution order (method.md vocabulary)."""

    version: int = PROBE_VERSION
    family: str
    model: str
    total_params: int
    calibration: Calibration
    projection: Projection
    ridge: float
    max_interval: int
    blocks: list[BlockProbe]
    cka_matrix: CKAMatrix
    #: per stream, ``(L+1) x (L+1)`` mean angular distance ``arccos(cos)/pi`` between states h_i, h_j.
    angular: dict[str, list[list[float | None]]]
    #: per stream, ``(L+1) x (L+1)`` mean token cosine between states h_i, h_j.
    cosine_matrix: dict[str, list[list[float | None]]]
    intervals: list[IntervalProbe]
    #: ``[start, end, mode, source]`` where the family's plug source differs from the generic middle/first/last
    #: rule (SD3: an interval reaching the last block is initialised from it), so selection is exact without a model.
    plug_source_exceptions: list[list[int | str]] = Field(default_factory=list)
    #: the short trained-plug probe (``ppcl probe --trained-steps N``); None when it was not run (older files too)
    trained: TrainedProbe | None = None

    def interval(self, start: int, end: int) -> IntervalProbe | None:
        for iv in self.intervals:
            if iv.start == start and iv.end == end:
                return iv
        return None


def load_probe(path: str | Path) -> ProbeResult:
    """Read and validate a probe.json; a bad file -> PPCLError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise PPCLError(f"probe file not found: {path}")
    try:
        result = ProbeResult.model_validate_json(path.read_text())
    except ValidationError as e:
        where, msg = first_field_error(e)
        raise PPCLError(f"invalid probe file {path}: field {where}: {msg}") from None
    except ValueError as e:
        raise PPCLError(f"invalid probe file {path}: {e}") from None
    if result.family not in FAMILIES:
        raise PPCLError(f"invalid probe file {path}: field family: unknown family '{result.family}' "
                        f"(expected one of {', '.join(FAMILIES)})")
    if result.version != PROBE_VERSION:
        raise PPCLError(f"invalid probe file {path}: version {result.version}, expected {PROBE_VERSION}")
    if len(result.blocks) < 2:
        raise PPCLError(f"invalid probe file {path}: field blocks: needs at least 2 blocks")
    return result
