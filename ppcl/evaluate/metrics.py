"""The ``metrics.json`` schema (version 1): what ``ppcl evaluate`` writes and ``ppcl report`` reads.

One file per evaluation run: the settings that produced the numbers, the identity of every measuring model
(FID feature extractor, CLIP), the reference set, and one :class:`ModelMetrics` entry per evaluated model, the
teacher first (``role == "teacher"``).

JSON has no infinity. A PSNR is infinite exactly when the compared tensors are identical; we then store
``null`` for the PSNR and ``"identical": true`` (never a cap such as 100 dB, which could be mistaken for a
measurement). :attr:`Fidelity.latent_psnr_db` is ``None`` if and only if every latent pair was bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ppcl.errors import PPCLError, first_field_error

METRICS_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalSettings(_Strict):
    """Everything that changes the numbers. Stored verbatim in metrics.json.

    The one definition of the evaluation settings: ``ppcl evaluate``'s flags and the run config's ``evaluate``
    section are generated from these fields (:mod:`ppcl.settings`). Sample (prompt i, seed j) uses
    ``torch.Generator("cpu").manual_seed(seed_offset + j)`` for every model, so the initial noise is identical
    across models and runs.
    """

    steps: int | None = Field(None, ge=1, description="denoising steps per image (none: the teacher folder's "
                              "ppcl.json default, else 20); metrics.json stores the value used")
    height: int | None = Field(None, ge=8, description="generation height in pixels (none: the teacher folder's "
                               "ppcl.json default, else 512)")
    width: int | None = Field(None, ge=8, description="generation width in pixels (none: the teacher folder's "
                              "ppcl.json default, else 512)")
    guidance: float | None = Field(None, description="guidance scale passed through the family adapter (none: the "
                                   "teacher folder's ppcl.json default, else the pipeline's); metrics.json stores "
                                   "the value used")
    max_sequence_length: int | None = Field(None, ge=1, description="text tokens per prompt (none: the teacher "
                                            "folder's ppcl.json default, else the pipeline's, e.g. 512 for FLUX)")
    seeds: int = Field(1, ge=1, description="images per prompt")
    seed_offset: int = Field(0, ge=0, description="first seed")
    batch_size: int = Field(4, ge=1, description="images per pipeline call (same batches for every model)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ... (none: cuda when available)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="model dtype (none: float32 on CPU, bfloat16 on CUDA)")
    clip: str | None = Field(None, description="CLIP model directory (or hub id) for the CLIP score (none: no CLIP "
                             "score)")
    reference: str | None = Field(None, description="folder of reference images for FID (none: no FID)")
    fid_features: str | None = Field(None, description="FID feature extractor: clip | inception:WEIGHTS.pth | "
                                     "pkg.module:factory (none with a reference and a CLIP: clip)")
    fid_cache_dir: str | None = Field(None, description="where reference statistics are cached (none: "
                                      "$PPCL_CACHE_DIR/fid or ~/.cache/ppcl/fid)")
    judge: bool | None = Field(None, description="judge attribute accuracy and judge-FID with the shipped synth "
                               "judge (ppcl.bench.judge; for the reference teacher): none = when every prompt is a "
                               "synth caption, true = required (an error otherwise), false = off")
    latency_warmup: int = Field(2, ge=0, description="untimed transformer forwards of each model before timing")
    latency_repeats: int = Field(10, ge=1, description="timed pairs: teacher and model forwards interleaved "
                                 "(ABAB...) in one process, speedup = median of the pairs' ratios")
    grid_samples: int = Field(4, ge=1, description="rows of grid.png: the first samples in sample order (every "
                              "prompt with the first seed, then the next seed)")


class Latency(_Strict):
    """Latency of one denoising step: ``calls_per_step`` transformer forwards at the generation resolution.

    ``median_s``/``min_s``/``max_s`` are over ``repeats`` timed single forwards (batch of one image, after
    ``warmup`` untimed ones, device synchronised; on CUDA timed with CUDA events, ``timer``);
    ``per_step_s = median_s * calls_per_step``. In an evaluation the teacher's forwards are the ones timed
    interleaved with every model's (:class:`Speedup`).
    """

    median_s: float
    min_s: float
    max_s: float
    spread: float = Field(description="(max - min) / median")
    repeats: int
    warmup: int
    calls_per_step: int
    per_step_s: float
    timer: Literal["perf_counter", "cuda_events"] = "perf_counter"


class Speedup(_Strict):
    """A paired speed measurement: teacher and model timed alternately in one process (ABAB..., ``pairs``
    pairs, same captured inputs), the speedup of pair i = teacher time_i x calls / model time_i x calls.

    ``median`` is the reported speedup; ``q25``/``q75``/``min``/``max`` describe the pairs' ratios; ``spread``
    = (q75 - q25) / median, the interquartile range relative to the median (robust to one stalled forward, which a
    min-max spread is not). ``reliable`` is False when ``spread`` exceeds ``spread_limit``: the machine was too
    busy (or the model too small) for the number to be trusted, and the report says so.
    """

    median: float
    q25: float
    q75: float
    min: float
    max: float
    spread: float
    pairs: int
    spread_limit: float
    reliable: bool


class Memory(_Strict):
    """Peak memory while this model was loaded and generating.

    kind: ``cuda_max_allocated`` (torch.cuda.max_memory_allocated, bytes) or ``cpu_peak_rss`` (the process's
    peak resident set, reset before this model was loaded). ``baseline_bytes`` is the same measure just before loading;
    ``model_bytes = peak_bytes - baseline_bytes`` is what this model added. The first pipeline of a run (the
    teacher) also pays the process's one-time costs (lazy imports, allocator pools), so its ``model_bytes`` is
    an upper bound; evaluate the teacher as a ``--model`` too for a like-for-like figure.
    """

    kind: Literal["cuda_max_allocated", "cpu_peak_rss"]
    peak_bytes: int
    baseline_bytes: int
    model_bytes: int


class Fidelity(_Strict):
    """Agreement with the teacher on the same prompt and seed (no reference set needed).

    latent_psnr_db: ``10 log10(R^2 / MSE)`` with the MSE pooled over every element of every sample's final
        latent and R the teacher latents' range (max - min over all samples); None when identical (infinite).
    latent_cosine: mean over samples of the cosine between flattened final latents; latent_cosine_min: worst one.
    image_psnr_db: ``10 log10(1 / MSE)`` over decoded images in [0, 1], both quantised to 8 bits as saved
        (pooled MSE); None when identical.
    identical: every latent of every sample is bit-identical to the teacher's.
    """

    latent_psnr_db: float | None
    latent_cosine: float
    latent_cosine_min: float
    image_psnr_db: float | None
    identical: bool
    samples: int


class ModelMetrics(_Strict):
    """One evaluated pipeline. ``fid``/``clip_score``/``judge_*`` are None when not measured."""

    name: str
    path: str
    role: Literal["teacher", "model"]
    parameters: int = Field(description="transformer parameters (exact count)")
    parameters_ratio: float = Field(description="parameters / teacher parameters")
    latency: Latency
    speedup: float = Field(description="teacher per-step latency / this model's, the median of paired timings "
                           "(1.0 for the teacher)")
    speedup_stats: Speedup | None = Field(None, description="the paired timing behind ``speedup`` (None: the teacher)")
    memory: Memory
    generation_s: float = Field(description="wall time to generate all samples (pipeline calls + decoding)")
    fid: float | None = None
    clip_score: float | None = None
    judge_accuracy: float | None = Field(None, description="judge attribute accuracy: stated attributes the judge "
                                         "finds / all stated attributes (None: no judge)")
    judge_image_accuracy: float | None = Field(None, description="images with every stated attribute right")
    judge_fid: float | None = Field(None, description="FID on the judge's 128-d features against synth renders "
                                    "of the prompts' captions")
    fidelity: Fidelity | None = Field(None, description="None for the teacher entry itself")


class ExtractorInfo(_Strict):
    """A measuring network: numbers are comparable only between runs with the same ``name`` and ``sha256``."""

    name: str
    sha256: str
    num_features: int | None = None


class ReferenceInfo(_Strict):
    path: str
    sha256: str = Field(description="checksum of the set: sorted relative paths and file contents")
    num_images: int
    statistics_cached: bool = Field(description="statistics were read from the cache instead of recomputed")


class EvalMetrics(_Strict):
    version: Literal[1] = METRICS_VERSION
    created: str
    settings: EvalSettings
    prompts: list[str]
    samples: int
    teacher: str
    fid_extractor: ExtractorInfo | None = None
    clip_model: ExtractorInfo | None = None
    reference: ReferenceInfo | None = None
    judge: ExtractorInfo | None = Field(None, description="the judge behind judge_accuracy / judge_fid")
    judge_reference: ReferenceInfo | None = Field(None, description="the judge-FID reference set (synth renders)")
    models: list[ModelMetrics]

    def entry(self, name: str) -> ModelMetrics:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def load_metrics(path: str | Path) -> EvalMetrics:
    """Read and validate a metrics.json; a bad file raises PPCLError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise PPCLError(f"metrics file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PPCLError(f"unreadable metrics file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("version") != METRICS_VERSION:
        got = data.get("version") if isinstance(data, dict) else None
        raise PPCLError(f"{path}: field 'version' is {got!r}, expected {METRICS_VERSION}")
    try:
        return EvalMetrics.model_validate(data)
    except ValidationError as e:
        where, msg = first_field_error(e)
        raise PPCLError(f"{path}: field '{where}': {msg}") from None
