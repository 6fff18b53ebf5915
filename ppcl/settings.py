"""One pydantic model per stage's settings: the CLI flags, the YAML config and the component defaults all come
from here, so ``ppcl distill`` by hand and the pipeline's distill step train the same model from the same words.

- Every field has a type, a default chosen for real use and a description; every constraint (range, choice,
  cross-field rule) lives on the model, so the CLI and the YAML refuse the same values with the same message.
- :func:`add_settings_arguments` generates a stage's flags (``lr`` -> ``--lr``, ``batch_size`` ->
  ``--batch-size``, bools as ``--x/--no-x``, an optional field takes ``none``); :func:`settings_from_args`
  builds the model back from the parsed flags; :func:`settings_cli_args` is the reverse (settings -> the flags
  that reproduce them: what a multi-node TrainJob's ``ppcl distill`` receives).
- :func:`markdown_table` writes ``docs/settings.md`` (``python -m ppcl.settings > docs/settings.md``; a test
  fails when the committed file is stale).

The name lists (selectors, distill modes, plug inits, timestep samplers, mixed precision) are defined once
here as ``Literal`` aliases; ``ppcl.config``, ``ppcl.select`` and ``ppcl.plan`` import them.

Arguments that say WHICH files a run reads and writes (``--model``, ``--data``, ``--out``, ``--resume``) or
describe the machine (``--device``) are not settings: each CLI module writes those by hand.
"""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_serializer, field_validator
from pydantic_core import PydanticUndefined

from ppcl.errors import PPCLError, first_field_error
from ppcl.evaluate.metrics import EvalSettings

# ------------------------------------------------------------------------------------------------- name lists

SelectMethod = Literal["ppcl", "shortgpt", "angular", "uniform", "random"]
IntervalScore = Literal["r2", "trained", "output"]
ServeSubsets = Literal["size_rule", "joint"]
DistillMode = Literal["nonsequential", "sequential"]
PlugInit = Literal["middle", "first", "last"]
TimestepSampler = Literal["uniform", "logit_normal"]
OutputLossSchedule = Literal["turns", "every_step"]
MixedPrecision = Literal["auto", "no", "bf16"]
SourceFormat = Literal["auto", "imagefolder", "parquet", "webdataset"]
DType = Literal["float32", "bfloat16", "float16"]

SELECT_METHODS: tuple[str, ...] = get_args(SelectMethod)
INTERVAL_SCORES: tuple[str, ...] = get_args(IntervalScore)
SERVE_SUBSETS: tuple[str, ...] = get_args(ServeSubsets)
DISTILL_MODES: tuple[str, ...] = get_args(DistillMode)
PLUG_INITS: tuple[str, ...] = get_args(PlugInit)
TIMESTEP_SAMPLERS: tuple[str, ...] = get_args(TimestepSampler)
MIXED_PRECISION: tuple[str, ...] = get_args(MixedPrecision)



#: ``--max-shard-size`` units, as diffusers' ``save_pretrained`` takes them (decimal KB..TB; binary KiB..TiB too)
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of ``"10GB"`` / ``"500MB"`` / ``"1.5GiB"`` / ``"123"``; ValueError for anything else."""
    t = str(text).strip().upper()
    if t.isdigit():
        return int(t)
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)].strip()) * _SIZE_UNITS[unit])
    raise ValueError(f"not a size: {text!r}")

class StageSettings(BaseModel):
    """Base of every stage's settings: unknown names are refused (a typo never silently does nothing)."""

    model_config = ConfigDict(extra="forbid")
    stage: ClassVar[str] = ""


# ---------------------------------------------------------------------------------------------------- models


class ShardSettings(StageSettings):
    """``ppcl shard`` / the shard step: raw image-text source -> deterministic Parquet shards."""

    stage: ClassVar[str] = "shard"

    source: str | None = Field(None, description="folder, file or s3:// prefix of the raw data (none: the pipeline "
                               "synthesises synth_samples captioned images, as the demo does)")
    shards: int = Field(4, ge=1, description="number of output shards")
    format: SourceFormat = Field("auto", description="source format (auto: detected from the files)")
    caption_column: str | None = Field(None, description="caption field/column (none: the first of caption, text, "
                                       "prompt); for WebDataset the caption member's extension or JSON field")
    image_column: str | None = Field(None, description="Parquet image column (none: image)")
    key_column: str | None = Field(None, description="Parquet key column (none: key if present)")
    min_size: int = Field(0, ge=0, description="reject images whose smaller side is below this many pixels")
    synth_samples: int = Field(32, ge=1, description="images synthesised when there is no source")
    synth_size: int = Field(64, ge=8, description="side in pixels of the synthesised images")


class EncodeSettings(StageSettings):
    """``ppcl encode`` / the encode step: shards -> latent and prompt-embedding cache."""

    stage: ClassVar[str] = "encode"

    resolution: int | None = Field(None, ge=8, description="square training resolution in pixels: shorter side "
                                   "resized, centre-cropped (none: the teacher folder's ppcl.json height, else the "
                                   "pipeline's default sample size)")
    max_sequence_length: int | None = Field(None, ge=1, description="text tokens per prompt (none: the teacher "
                                            "folder's ppcl.json default, else the pipeline's); evaluation has the "
                                            "same setting")
    batch_size: int = Field(8, ge=1, description="samples per encoder call")
    dtype: DType | None = Field(None, description="encoder precision (none: as saved)")
    negative_prompt: str | None = Field(None, description="prompt of classifier-free guidance's unconditional "
                                        "branch, encoded once into the cache for distill's uncond_ratio (none: the "
                                        "family's: empty, Qwen-Image a blank)")


class ProbeSettings(StageSettings):
    """``ppcl probe`` / the probe step (:func:`ppcl.probe.run_probe`): ``samples`` calibration samples, each
    noised at ``timesteps`` noise levels. ``device`` is a setting here (not a hand-written flag) because with
    ``dtype`` it decides the teacher's precision, and the pipeline's GPU step relies on ``auto``."""

    stage: ClassVar[str] = "probe"

    samples: int = Field(256, ge=1, description="calibration samples N (the pipeline's real-use size; the CLI used "
                         "32 before the settings were unified, the demo sets 16)")
    timesteps: int = Field(4, ge=1, description="noise levels K per sample: stratified, shifted like the scheduler")
    batch_size: int = Field(4, ge=1, description="samples per forward")
    resolution: int = Field(256, ge=8, description="side in pixels of the built-in synthetic images (used only "
                            "without a latent cache)")
    probe_dim: int | Literal["auto"] = Field("auto", description="moment width: auto (exact if the moments fit "
                                             "4 GiB), 0 (exact) or a projection width")
    max_interval: int = Field(12, ge=2, description="longest interval probed, in blocks (an interval removes at "
                              "least one block between two kept ones, so at least 2)")
    ridge: float = Field(1e-4, ge=0, description="relative ridge of the linear probes")
    hsic_tokens: int = Field(256, ge=4, description="tokens per forward for the CKA matrix")
    seed: int = Field(0, description="calibration, noise and projection seed")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the teacher runs (auto: cuda when a "
                                                  "GPU is present, else cpu)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="teacher precision (auto: bfloat16 "
                                                          "on cuda, float32 on cpu); the statistics accumulate in "
                                                          "float32/float64 whatever it is")
    trained_steps: int = Field(0, ge=0, description="steps of the trained-plug probe (ppcl.probe_trained: one plug "
                               "per interval, all trained in one teacher pass per step on the CPU, scored on "
                               "held-out batches -> probe.json's trained, for select --score trained/output); 0: off")
    trained_uncond_ratio: float = Field(0.0, ge=0, lt=1, description="trained-plug probe: share of its training "
                                        "samples on the negative prompt (distill's uncond_ratio)")
    trained_output_guidance: float = Field(1.0, ge=1, description="trained-plug probe: guidance scale of each "
                                           "interval's output_error (1: the conditional output; the sampler's true "
                                           "CFG scale otherwise, which needs a latent cache's negative prompt)")

    @field_validator("probe_dim")
    @classmethod
    def _probe_dim(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be 'auto', 0 (exact) or a positive width")
        return v


class SelectSettings(StageSettings):
    """``ppcl select`` / the select step (:func:`ppcl.select.select`): contiguous intervals under a budget."""

    stage: ClassVar[str] = "select"

    method: SelectMethod = Field("ppcl", description="selector")
    score: IntervalScore = Field("r2", description="ppcl selector: interval quality term, r2 (1 - R^2 of the "
                                 "linear probe), trained (the trained-plug probe's trained_quality) or output (its "
                                 "output_error: what the plug alone does to the model's output); trained and "
                                 "output need ppcl probe --trained-steps N")
    serve: list[float] = Field(default_factory=list, description="ppcl selector: keep ratios above keep_params "
                               "that subsets of the plan must also serve, e.g. 0.7: the plan and each subset are "
                               "chosen together (least summed cost over all the models)")
    serve_subsets: ServeSubsets = Field("size_rule", description="ppcl selector with serve: size_rule (each "
                                        "served ratio is exported and trained with the subset the export's size "
                                        "rule picks from the plan; measured better on the reference benchmark) or "
                                        "joint (the subsets chosen with the plan, recorded in plan.json as serves, "
                                        "which export and distill's output_loss_ratios then use)")
    keep_params: float | None = Field(None, gt=0, le=1, description="fraction of transformer parameters to keep "
                                      "(none in the run config: the smallest ratio)")
    protect: list[int] = Field(default_factory=list, description="blocks never removed, e.g. 0,5,7")
    allow_ends: bool = Field(False, description="allow removing the first/last block")
    init: PlugInit = Field("middle", description="teacher block each plug starts from")
    seed: int = Field(0, description="seed of the random selector")
    min_cka: float | None = Field(None, description="ppcl selector: CKA threshold of flat runs (none: its default)")
    max_jump: float | None = Field(None, ge=0, description="ppcl selector: largest |trend| inside a run (none: its "
                                   "default)")
    break_cost: float | None = Field(None, ge=0, description="ppcl selector: cost of each place an interval leaves "
                                     "a flat run (none: 1.0 = an unpredictable interval; 0 with score output, "
                                     "which measures what flat runs stand in for)")

    @field_validator("protect")
    @classmethod
    def _protect(cls, v: list[int]) -> list[int]:
        if any(b < 0 for b in v):
            raise ValueError(f"block indices must be >= 0, got {v}")
        return v


class DistillSettings(StageSettings):
    """``ppcl distill`` / the distill step: plug training against the frozen teacher.

    Defaults are those the pipeline used before the settings were unified, which follow the paper's released
    Qwen-Image settings (PPCL arXiv 2511.16156; method.md section 2) where it states them: lr 1e-5, batch 1, a
    short warm-up, logit-normal timesteps; 2000 steps and a checkpoint every 500 (the paper's run is ~20k). This
    is the model the training loop takes (:func:`ppcl.distill.distill` ``settings=``, re-exported as
    ``ppcl.distill.DistillSettings``).
    """

    stage: ClassVar[str] = "distill"

    steps: int = Field(2000, ge=1, description="optimizer steps (the pipeline's default before the settings were "
                       "unified; the paper's released Qwen-Image run is about 20k at 1328 px; the CLI had 200)")
    batch_size: int = Field(1, ge=1, description="batch size per process (the paper's released Qwen-Image setting)")
    lr: float = Field(1e-5, gt=0, allow_inf_nan=False, description="peak learning rate of AdamW (the paper's "
                      "released Qwen-Image setting; the CLI had 1e-4)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps, then cosine decay to 0 at steps (the "
                              "released settings: a short warm-up)",
                              json_schema_extra={"constraint": "< steps"})
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (none or 0: no clipping)")
    mode: DistillMode = Field("nonsequential", description="nonsequential: each plug fed the teacher's input "
                              "(the paper's teacher-student alternating distillation); sequential: the ablation")
    init: PlugInit | None = Field(None, description="teacher block each plug starts from (none: the plan's)")
    timesteps: TimestepSampler = Field("logit_normal", description="timestep sampling (logit_normal: mean 0, "
                                       "std 1, as in SD3 training and the pipeline before; the CLI had uniform)")
    seed: int = Field(0, description="seed of data order and noise")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (500: a lost node costs at "
                                  "most a quarter of the default run; the CLI had 50)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    output_loss_weight: float = Field(0.0, ge=0, description="weight of the output-level (velocity) loss; 0: off")
    output_loss_keep: float = Field(1.0, gt=0, le=1, description="probability each plug is in place for the "
                                    "output-level loss (1: all; < 1: a random subset per step, so plugs also "
                                    "learn to work alone)")
    output_loss_sequential: float = Field(0.0, ge=0, description="weight of loss D at each plug's end inside "
                                          "the output-level term's whole-plan student, each plug fed what the "
                                          "plugs before it made (the sequential ablation's loss, added to the "
                                          "teacher-forced one; 0: off; needs output_loss_weight > 0)")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="exponential moving average of the plug weights, "
                             "written as the run's plugs (0: off, the last weights; e.g. 0.999, warmed up as "
                             "min(decay, (1+t)/(10+t)))")
    output_loss_ratios: list[float] = Field(default_factory=list, description="keep-params ratios the run will "
                                            "also be exported at, e.g. 0.7: the output-level term takes turns, one "
                                            "step each, between every plug in place and the plugs export picks at "
                                            "each ratio, so each exported model is trained as it will run (empty: "
                                            "every plug, every step)")
    output_loss_schedule: OutputLossSchedule = Field("turns", description="with output_loss_ratios: turns (one "
                                                     "student per step, in turn) or every_step (every student each "
                                                     "step, their terms summed; costs one student forward and "
                                                     "backward more per ratio, from its first plug on)")
    uncond_ratio: float = Field(0.0, ge=0, lt=1, description="share of training samples whose text is replaced "
                                "by the family's negative prompt (a latent cache's uncond.safetensors), so the "
                                "student learns the unconditional branch classifier-free guidance runs (0: off, "
                                "every sample keeps its caption; e.g. 0.1 for a teacher sampled with true CFG)")
    gradient_checkpointing: bool = Field(False, description="recompute plug activations in the backward pass")
    mixed_precision: MixedPrecision = Field("auto", description="auto: bf16 autocast on CUDA, none on CPU")
    n_samples: int = Field(16, ge=1, description="size of the built-in synthetic set (used only without a cache)")
    resolution: int = Field(64, ge=8, description="image side of the built-in synthetic set (only without a cache)")
    lsq_batches: int = Field(8, ge=1, description="batches of the least-squares init of width projections")
    ridge: float = Field(1e-4, ge=0, description="relative ridge of that least-squares fit")
    guidance: float | None = Field(None, description="guidance value for guidance-distilled teachers (none: the "
                                   "teacher's default)")
    # Off by default: AdamW8bit steps plain tensors, not FSDP2's sharded DTensor parameters, so it exists for ONE
    # process per run only; every multi-GPU run shards fp32 AdamW instead (1/N of 8 bytes per parameter, less than
    # 8-bit's 2 bytes from 4 GPUs on). The planner (ppcl plan resources) says when one GPU needs it to fit.
    use_8bit_adam: bool = Field(False, description="bitsandbytes' 8-bit AdamW on CUDA, one process only (needs "
                               "ppcl[cuda]; missing there, or asked with several processes, is an error, never a "
                               "silent fallback); on CPU plain AdamW runs. run.json's optimizer records what ran")

    @field_validator("max_grad_norm", mode="before")
    @classmethod
    def _no_clipping(cls, v: Any) -> Any:
        return None if v == 0 else v  # "0 = off" is what users of the old --max-grad-norm typed

    @field_serializer("max_grad_norm", when_used="json")
    def _off_as_zero(self, v: float | None) -> float:
        # JSON settings drop nulls (KFP Struct parameters cannot hold them), which would bring back the default
        # 1.0: "no clipping" travels as 0, which the validator above reads back as None
        return 0.0 if v is None else v

    @field_validator("output_loss_ratios")
    @classmethod
    def _export_ratios(cls, v: list[float], info: ValidationInfo) -> list[float]:
        if any(not 0 < r <= 1 for r in v):
            raise ValueError(f"every ratio must be in (0, 1], got {v}")
        if v and info.data.get("output_loss_weight", 0.0) == 0:
            raise ValueError("needs output_loss_weight > 0: it chooses what the output-level term runs with, and "
                             "that term is off")
        if v and info.data.get("output_loss_keep", 1.0) < 1:
            raise ValueError("give either output_loss_ratios (the exported subsets take turns) or output_loss_keep "
                             "< 1 (random subsets), not both")
        return v

    @field_validator("output_loss_sequential")
    @classmethod
    def _sequential_in_output_term(cls, v: float, info: ValidationInfo) -> float:
        if v > 0 and info.data.get("output_loss_weight", 0.0) == 0:
            raise ValueError("needs output_loss_weight > 0: its loss is taken inside the output-level term's "
                             "student, and that term is off")
        if v > 0 and info.data.get("mode") == "sequential":
            raise ValueError("is for mode nonsequential: in sequential mode every plug already trains on what the "
                             "plugs before it made")
        return v

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_below_steps(cls, v: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and v >= steps:
            raise ValueError(f"must be less than steps ({steps}): the learning rate would never reach its peak")
        return v


class ExportSettings(StageSettings):
    """``ppcl export`` / the export step: which intervals of the plan become the pruned model. At most one of
    the three is given; the pipeline gives ``keep_params`` per ratio."""

    stage: ClassVar[str] = "export"

    keep_params: float | None = Field(None, gt=0, le=1, description="fraction of teacher parameters to keep: the "
                                      "subset of plugs with the most parameters not above it")
    intervals: list[int] | None = Field(None, description="plan indices of the intervals to replace, e.g. 0,2,5")
    all_intervals: bool = Field(False, description="replace every interval of the plan")
    dtype: DType | None = Field(None, description="dtype of the exported weights (none: the teacher's, e.g. "
                                "bfloat16 for a bf16 teacher; the fp32 plugs are cast to it)")
    max_shard_size: str = Field("10GB", description="largest weight file of the exported transformer: bytes or "
                                "a size such as 10GB or 500MB (diffusers' save_pretrained default)")

    # one budget: each later field refuses itself when an earlier one is given (the error names the field)
    @field_validator("intervals")
    @classmethod
    def _intervals_alone(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if v is not None and info.data.get("keep_params") is not None:
            raise ValueError("cannot be given with keep_params: give one of keep_params, intervals, all_intervals")
        return v

    @field_validator("all_intervals")
    @classmethod
    def _all_alone(cls, v: bool, info: ValidationInfo) -> bool:
        if v and any(info.data.get(n) is not None for n in ("keep_params", "intervals")):
            raise ValueError("cannot be given with keep_params or intervals: give one of the three")
        return v

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        text = v.strip()
        try:
            n = parse_size(text)
        except ValueError:
            raise ValueError(f"{v!r} is not a size: expected bytes or a number with KB, MB, GB or TB") from None
        if n < 1:
            raise ValueError("must be at least 1 byte")
        return text


class EvaluateSettings(StageSettings, EvalSettings):
    """``ppcl evaluate`` / the evaluate step: every field of :class:`ppcl.evaluate.metrics.EvalSettings` (one
    definition, so the two cannot drift) plus the prompts of the run config (the CLI reads them from a file)."""

    stage: ClassVar[str] = "evaluate"

    prompts: list[str] = Field(
        default_factory=lambda: [
            "a red circle on a blue background",
            "two yellow squares above a green triangle",
            "a white star in the center of a black background",
            "a purple heart next to an orange ring",
        ],
        min_length=1,
        description="prompts generated by every model (the CLI: --prompts FILE)",
    )

    def eval_settings(self) -> EvalSettings:
        """The :class:`EvalSettings` stored in metrics.json (everything but the prompts)."""
        return EvalSettings(**self.model_dump(exclude={"prompts"}))


#: Every stage's settings model, in DAG order.
STAGE_SETTINGS: dict[str, type[StageSettings]] = {
    m.stage: m for m in (ShardSettings, EncodeSettings, ProbeSettings, SelectSettings, DistillSettings,
                         ExportSettings, EvaluateSettings)
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- errors


def flag(name: str) -> str:
    """The CLI flag of field ``name``: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def validate_settings(model: type[StageSettings], data: dict[str, Any], *, cli: bool = False) -> StageSettings:
    """``model`` validated from ``data``; bad input -> one-line :class:`PPCLError`
    ``"<stage> settings: field '<name>' [(--flag)] <message>"`` (the flag named when ``cli``). The message after the
    field name is pydantic's, the same whether the value came from a flag, a YAML file or a component."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PPCLError(f"{model.stage} settings: {field_error(e, cli=cli)}") from None


def field_error(error: ValidationError, *, cli: bool = False) -> str:
    """``"field '<dotted.name>' [(--flag)] <message>"`` for the first error of ``error`` (the run config's
    messages too, so a YAML and a flag read alike)."""
    err = error.errors()[0]
    where, msg = first_field_error(error)
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] == "extra_forbidden":
        msg = "is not a known setting"
    loc = err["loc"]
    shown = f" ({flag(str(loc[0]))})" if cli and loc and isinstance(loc[0], str) else ""
    return f"field '{where}'{shown} {msg}"


# ------------------------------------------------------------------------------------------------- CLI flags


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``(the annotation without None, whether None is allowed)``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        inner = args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
        return inner, optional
    return annotation, False


def _parts(annotation: Any) -> list[Any]:
    return list(get_args(annotation)) if get_origin(annotation) in (Union, types.UnionType) else [annotation]


def _converter(annotation: Any, optional: bool):
    """A string -> value function for ``annotation`` (argparse ``type=``); ``none`` -> None when ``optional``."""
    parts = _parts(annotation)

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        for part in parts:
            if get_origin(part) is Literal:
                if text in get_args(part):
                    return text
                continue
            if get_origin(part) is list:
                (item,) = get_args(part)
                try:
                    return [item(x) for x in text.split(",") if x.strip()]
                except ValueError:
                    continue
            try:
                return part(text)
            except (TypeError, ValueError):
                continue
        raise argparse.ArgumentTypeError(f"invalid value {text!r}")

    convert.__name__ = getattr(annotation, "__name__", "value")  # argparse names it in "invalid <name> value"
    return convert


def _default(info: Any) -> Any:
    return info.default_factory() if info.default is PydanticUndefined else info.default


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "(empty)"
    return str(value)


def _mark_given(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, "settings_given", set(getattr(namespace, "settings_given", set())) | {dest})


class _Given(argparse.Action):
    """Stores the value and records which setting flags were typed (``args.settings_given``): a CLI's convenience
    flag (``ppcl evaluate --resolution``) fills a setting only where that setting's own flag was not given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest)


class _GivenBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _mark_given(namespace, self.dest)


def add_settings_arguments(parser: Any, model: type[StageSettings], *, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``model`` (minus ``exclude``) to ``parser``: ``--kebab-case`` name, the field's
    type (``none`` for an optional one), its default, its description as help, its ``Literal`` as choices, a
    bool as ``--x/--no-x``, a list as comma-separated values."""
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        default = _default(info)
        inner, optional = _unwrap(info.annotation)
        help_text = f"{info.description or name} (default: {_show(default)})".replace("%", "%%")
        if inner is bool:
            action = parser.add_argument(flag(name), dest=name, action=_GivenBool, default=default, help=help_text)
            # some Python versions' BooleanOptionalAction append "(default: %(default)s)" themselves
            action.help = action.help.replace(" (default: %(default)s)", "")
            continue
        kw: dict[str, Any] = {}
        if get_origin(inner) is Literal:
            values = list(get_args(inner))
            kw["choices"] = values + ([None] if optional else [])
            kw["metavar"] = "{" + ",".join(values + (["none"] if optional else [])) + "}"
        elif get_origin(inner) is list:
            kw["metavar"] = "A,B,..."
        parser.add_argument(flag(name), dest=name, action=_Given, type=_converter(inner, optional), default=default,
                            help=help_text, **kw)  # fmt: skip


def settings_from_args(model: type[StageSettings], args: argparse.Namespace, *, exclude: tuple[str, ...] = (),
                       **extra: Any) -> StageSettings:
    """The ``model`` the parsed flags describe (``exclude``: as given to :func:`add_settings_arguments`; ``extra``:
    values the CLI computed itself, e.g. from a convenience flag); a bad value -> the one-line
    :class:`PPCLError` of :func:`validate_settings`, naming field and flag."""
    data = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name) and name not in exclude}
    return validate_settings(model, {**data, **extra}, cli=True)


def settings_cli_args(settings: StageSettings, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """The flags that make the stage's CLI rebuild ``settings`` exactly: every field of its model (not only the
    changed ones, so a job reproduces the settings even where a later release changes a default)."""
    out: list[str] = []
    for name in type(settings).model_fields:
        if name in exclude:
            continue
        value = getattr(settings, name)
        if isinstance(value, bool):
            out.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            text = repr(value) if isinstance(value, float) else _show(value)
            out += [flag(name), "" if value == [] else text]
    return out


# ---------------------------------------------------------------------------------------------- docs table


def _type_name(annotation: Any) -> str:
    inner, optional = _unwrap(annotation)
    names = []
    for part in _parts(inner):
        if get_origin(part) is Literal:
            names.append(" | ".join(f"`{v}`" for v in get_args(part)))
        elif get_origin(part) is list:
            names.append(f"list[{get_args(part)[0].__name__}]")
        else:
            names.append(getattr(part, "__name__", str(part)))
    return " \\| ".join(names).replace("` | `", "` \\| `") + (" or none" if optional else "")


def _constraint(info: Any) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}
    parts = []
    for meta in info.metadata:
        for attr, sym in symbols.items():
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sym} {getattr(meta, attr)}")
    extra = info.json_schema_extra or {}
    if isinstance(extra, dict) and extra.get("constraint"):
        parts.append(str(extra["constraint"]))
    return ", ".join(parts)


def markdown_table() -> str:
    """``docs/settings.md``: every stage's settings (name, flag, type, default, constraint, description)."""
    lines = [
        "# Settings of every stage",
        "",
        "Generated from `ppcl/settings.py` by `python -m ppcl.settings > docs/settings.md` (a test fails when this "
        "file is stale). The same fields are the flags of `ppcl <stage>` (`batch_size` -> `--batch-size`; `none` "
        "for an optional value, `--x/--no-x` for a switch) and the keys of the stage's section in the run config "
        "(`data:` for shard). One set of defaults: `ppcl distill` by hand and the pipeline train the same run.",
    ]
    for stage, model in STAGE_SETTINGS.items():
        doc = " ".join((model.__doc__ or "").split())
        lines += ["", f"## {stage}", "", doc, "", "| name | flag | type | default | constraint | description |",
                  "|---|---|---|---|---|---|"]
        for name, info in model.model_fields.items():
            desc = " ".join((info.description or "").split()).replace("|", "\\|")
            default = _show(_default(info)).replace("|", "\\|")
            lines.append(f"| `{name}` | `{flag(name)}` | {_type_name(info.annotation)} | `{default}` | "
                         f"{_constraint(info)} | {desc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(markdown_table())
