"""Teacher LoRAs on pruned models: ``ppcl lora remap`` and ``ppcl lora transfer`` (issue 17).

Why this exists. diffusers attaches a LoRA by module path (``transformer.single_transformer_blocks.9.attn.to_q``),
i.e. by list INDEX. In a pruned model the indices moved: a teacher LoRA loaded directly lands on the wrong blocks
(a LoRA on a removed teacher block attaches to whatever block now holds its index) or fails to load. The export's
block map (:mod:`ppcl.lineage`) says which teacher block every student block is; both commands read it.

**remap** (:func:`remap`) renames the LoRA keys of kept blocks to their student positions and drops the keys of
removed blocks, reporting each dropped module and the share of the LoRA's weight delta it carried::

    share = sum over dropped modules of ||s B A||_F^2  /  sum over all modules of ||s B A||_F^2

with ``s`` the module's scale (``alpha / r``; ``alpha / sqrt(r)`` with rsLoRA; 1 without alpha). Plugs (one
student block standing for a teacher interval) get no LoRA: no teacher block's delta is theirs. Keys of modules
outside the blocks (embedders, output head, text encoders) pass through unchanged. The output keeps the input's
key format, and alpha entries (``.alpha`` tensors, diffusers' ``lora_adapter_metadata`` with its
``rank_pattern`` / ``alpha_pattern`` / ``target_modules`` module paths) are renamed or dropped with their module.

Formats (what the stock loaders of diffusers 0.42 accept for the three families):

- diffusers / peft keys ``[transformer.|diffusion_model.]<list>.<i>.<module>.lora_A|lora_B.weight`` (also
  ``lora_down`` / ``lora_up`` / ``.alpha``, as the Qwen-Image loader accepts), every family;
- kohya-style keys named by the adapter's :attr:`ppcl.arch.common.Adapter.lora_kohya_blocks`: FLUX
  ``lora_unet_double_blocks_<i>_...`` / ``lora_unet_single_blocks_<i>_...`` (sd-scripts) and
  ``lora_transformer_[single_]transformer_blocks_<i>_...``; Qwen-Image ``lora_unet_transformer_blocks_<i>_...``.
  SD3's loader takes diffusers keys only.

Checks (one-line :class:`PPCLError`): a dotted key must name a module the pruned transformer has (in a kept block,
the plug standing for a removed one, or outside the blocks) with matching in/out features, so a LoRA of another
family or size is refused; a block index beyond the lineage's teacher list is a block-count mismatch.

**transfer** (:func:`transfer`) distils teacher+LoRA into a LoRA on the pruned model with the plug machinery of
:mod:`ppcl.distill.losses`: the frozen teacher is the teacher with the LoRA FUSED; the student is the pruned model
with LoRA adapters (diffusers' peft integration) on its plugs and kept blocks, the kept ones initialised with the
remapped teacher LoRA and the plugs' with ``B = 0`` (so step 0 is exactly the remap). Loss: the method's per-block
D (:func:`ppcl.plugs.plug_loss`) of each trained student block, fed the teacher+LoRA's call entering the teacher
block(s) it stands for and compared with the teacher+LoRA's streams leaving them (non-sequential, teacher-forced,
as :func:`ppcl.distill.losses.nonsequential_losses`), plus ``output_loss_weight`` (default 1) x the MSE of the
model outputs (:func:`ppcl.distill.losses.output_loss`), which also trains every kept block's adapter and the
non-block ones, so they can make up for what the plugs cannot. With weight 0 only the plugs (and width-modified
blocks) train: a kept block with no width ops is the teacher block with the same LoRA, its D is 0 by
construction, so it is not run (its adapter stays the remapped one). Data and noise are the distill
stage's (:func:`ppcl.distill.streams.training_stream`, :func:`ppcl.distill.streams.step_inputs`): a latent cache
from ``ppcl encode`` or the built-in synthetic set. Output: diffusers keys ``transformer.<module>.lora_A|B.weight``
with the adapter config as ``lora_adapter_metadata``, which the stock ``load_lora_weights`` reads.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppcl.errors import PPCLError

#: diffusers' safetensors metadata key holding the adapter's LoraConfig (``diffusers.loaders.lora_base``)
LORA_METADATA_KEY = "lora_adapter_metadata"
#: our metadata key: ``{"command": "lora remap" | "lora transfer", ...}`` (how ``ppcl.outputs`` recognises the file)
PPCL_METADATA_KEY = "ppcl"
_PART = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|alpha|lora_magnitude_vector|"
                   r"dora_scale)(?:\.(?P<tail>.+))?$")
_DOTTED_PREFIXES = ("transformer.", "diffusion_model.", "")
#: key prefixes of the pipeline's other components: passed through by remap (their modules are the teacher's)
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te_", "lora_te1_", "lora_te2_",
                     "lora_te3_")
_KOHYA = ("lora_unet_", "lora_transformer_")


# --------------------------------------------------------------------------------------------- reading a LoRA
def read_lora(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a LoRA safetensors file; one-line PPCLError for a missing or unreadable one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise PPCLError(f"--lora {path}: not found")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PPCLError(f"--lora {path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if not tensors:
        raise PPCLError(f"--lora {path}: holds no tensors")
    return tensors, metadata


def module_of(key: str) -> tuple[str, str]:
    """``(module key, part)`` of a LoRA tensor key: ``a.b.lora_A.weight`` -> ``("a.b", "lora_A")``; a key with no
    LoRA part is its own module (part ``""``)."""
    m = _PART.match(key)
    return (m["module"], m["part"]) if m else (key, "")


@dataclass(frozen=True)
class BlockKey:
    """Where a LoRA module key names a block: ``head + str(index) + tail`` == the key."""

    list_name: str
    index: int
    head: str
    tail: str
    style: str  # "dotted" (diffusers / peft module paths) or "kohya"

    def renamed(self, index: int) -> str:
        return f"{self.head}{index}{self.tail}"

    @property
    def inner(self) -> str:
        """Dotted keys: the module path inside the block (``attn.to_q``)."""
        return self.tail[1:]


def parse_block(key: str, lists: tuple[str, ...], kohya: dict[str, str]) -> BlockKey | None:
    """The block a module key names, for a family with block ``lists`` and kohya prefixes ``kohya``; None for a
    key outside the blocks."""
    for pre in _DOTTED_PREFIXES:
        for name in lists:
            head = f"{pre}{name}."
            if key.startswith(head):
                m = re.match(r"(\d+)(\..+)$", key[len(head):])
                if m:
                    return BlockKey(name, int(m[1]), head, m[2], "dotted")
    for head, name in kohya.items():
        if key.startswith(head):
            m = re.match(r"(\d+)([_.].+)$", key[len(head):])
            if m:
                return BlockKey(name, int(m[1]), head, m[2], "kohya")
    return None


def _dotted_module(key: str) -> str | None:
    """A non-block dotted module key without its component prefix, or None for another component / kohya."""
    if key.startswith(_OTHER_COMPONENTS) or key.startswith(_KOHYA):
        return None
    for pre in ("transformer.", "diffusion_model."):
        if key.startswith(pre):
            return key[len(pre):]
    return key


# ------------------------------------------------------------------------------------------------- scales
def _adapter_config(metadata: dict[str, str], component: str = "transformer") -> dict[str, Any]:
    """The LoraConfig fields diffusers stored for ``component`` in the file's metadata ({} when none)."""
    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise PPCLError(f"LoRA metadata {LORA_METADATA_KEY!r} is not JSON") from None
    pre = f"{component}."
    return {k[len(pre):]: v for k, v in meta.items() if k.startswith(pre)}


def _pattern_value(patterns: dict[str, Any] | None, module: str) -> Any:
    """peft's rank/alpha pattern lookup: a key matching the end of the module path (``(.*\\.)?key$``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def module_scale(tensors: dict[str, Any], module: str, rank: int, config: dict[str, Any]) -> float:
    """The factor peft applies to ``B A`` of ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

    ``alpha``: the module's ``.alpha`` tensor (kohya, diffusers network alphas), else the metadata's
    ``alpha_pattern`` / ``lora_alpha``, else ``r`` (diffusers' convention for a file with no alpha: scale 1)."""
    if f"{module}.alpha" in tensors:
        alpha = float(tensors[f"{module}.alpha"])
    elif config:
        path = _dotted_module(module) or module
        alpha = _pattern_value(config.get("alpha_pattern"), path)
        alpha = float(config.get("lora_alpha", rank) if alpha is None else alpha)
    else:
        return 1.0
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def delta_norm2(a, b, scale: float) -> float:
    """``||scale * B A||_F^2`` without forming ``B A``: ``scale^2 * sum((B^T B) * (A A^T))`` in float64."""
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    return float(scale * scale * ((b.T @ b) * (a @ a.T)).sum())


def _pair(tensors: dict[str, Any], module: str):
    for down, up in (("lora_A", "lora_B"), ("lora_down", "lora_up")):
        a, b = tensors.get(f"{module}.{down}.weight"), tensors.get(f"{module}.{up}.weight")
        if a is not None and b is not None:
            return a, b
    return None


# ------------------------------------------------------------------------------------------------- remap
@dataclass
class Dropped:
    module: str  # module key in the teacher LoRA
    teacher_block: str  # "single_transformer_blocks.1 (block 7)"
    reason: str
    norm2: float
    keys: list[str]


@dataclass
class RemapReport:
    """What :func:`remap_state_dict` did, module by module."""

    family: str
    formats: list[str]
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (teacher module key, student module key)
    dropped: list[Dropped] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)  # module keys outside the blocks, unchanged
    plugs: list[str] = field(default_factory=list)  # "single_transformer_blocks.1 = plug of teacher blocks [1, 8]"
    total_norm2: float = 0.0

    @property
    def dropped_norm2(self) -> float:
        return sum(d.norm2 for d in self.dropped)

    @property
    def dropped_share(self) -> float:
        """Share of the LoRA's ``||s B A||_F^2`` (summed over modules) the dropped modules carried, in [0, 1]."""
        return self.dropped_norm2 / self.total_norm2 if self.total_norm2 > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "formats": self.formats, "renamed": len(self.renamed),
                "passed_through": self.passed, "plugs_without_lora": self.plugs,
                "dropped_share_of_norm": self.dropped_share,
                "dropped": [{"module": d.module, "teacher_block": d.teacher_block, "reason": d.reason,
                             "share_of_norm": d.norm2 / self.total_norm2 if self.total_norm2 > 0 else 0.0}
                            for d in self.dropped]}

    def text(self) -> str:
        lines = [f"{self.family} LoRA ({', '.join(self.formats)}): {len(self.renamed)} block modules moved to their "
                 f"student positions, {len(self.passed)} outside the blocks unchanged, {len(self.dropped)} dropped "
                 f"({self.dropped_share:.1%} of the LoRA's ||s B A||_F^2)"]
        moved = [(a, b) for a, b in self.renamed if a != b]
        if moved:
            lines.append(f"  renamed, e.g. {moved[0][0]} -> {moved[0][1]}" + (f" (+{len(moved) - 1} more)"
                                                                              if len(moved) > 1 else ""))
        by_block: dict[tuple[str, str], list[Dropped]] = {}
        for d in self.dropped:
            by_block.setdefault((d.teacher_block, d.reason), []).append(d)
        for (block, reason), ds in by_block.items():
            share = sum(d.norm2 for d in ds) / self.total_norm2 if self.total_norm2 > 0 else 0.0
            names = ", ".join(d.module for d in ds)
            lines.append(f"  dropped {block}: {len(ds)} module(s), {share:.2%} of the norm ({reason}): {names}")
        for p in self.plugs:
            lines.append(f"  no LoRA on {p} (a plug: `ppcl lora transfer` trains one)")
        return "\n".join(lines)


def transformer_shapes(model: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the export's transformer, read from the safetensors headers only."""
    from safetensors import safe_open

    files = sorted((Path(model) / "transformer").glob("*.safetensors"))
    if not files:
        raise PPCLError(f"--model {model}: no transformer/*.safetensors (not a pruned pipeline folder)")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                shapes[k] = tuple(h.get_slice(k).get_shape())
    return shapes


def _check_shapes(tensors: dict[str, Any], keys: list[str], weight: tuple[int, ...] | None, where: str) -> None:
    """A LoRA pair on a linear layer of weight ``(out, in)``: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``."""
    if weight is None or len(weight) != 2:
        return
    for k in keys:
        part = module_of(k)[1]
        t = tensors[k]
        if t.ndim != 2 or not k.endswith(".weight"):
            continue
        if part in ("lora_A", "lora_down") and t.shape[1] != weight[1]:
            raise PPCLError(f"LoRA key {k}: {t.shape[1]} input features where {where} has {weight[1]}: a LoRA of "
                            f"another model (family or size)")
        if part in ("lora_B", "lora_up") and t.shape[0] != weight[0]:
            raise PPCLError(f"LoRA key {k}: {t.shape[0]} output features where {where} has {weight[0]}: a LoRA "
                            f"of another model (family or size)")


def remap_state_dict(tensors: dict[str, Any], metadata: dict[str, str], lineage, shapes: dict[str, tuple[int, ...]]
                     ) -> tuple[dict[str, Any], dict[str, str], RemapReport]:
    """The remapped ``(tensors, metadata)`` of a teacher LoRA for the export ``lineage`` (its transformer's
    tensor ``shapes``), and the report. See the module doc for the rules."""
    from ppcl.arch import adapter_for

    cls = adapter_for(lineage.family)
    lists = tuple(name for name, _ in cls.block_lists)
    kohya = dict(cls.lora_kohya_blocks)
    teacher_counts = {bl.name: bl.num_blocks for bl in lineage.teacher.lists}
    kept = {(b.teacher_list, b.teacher_index): b for b in lineage.blocks if b.kind == "kept"}
    plug_of: dict[int, Any] = {}
    for b in lineage.blocks:
        if b.kind == "plug":
            plug_of.update({t: b for t in range(b.interval[0], b.interval[1] + 1)})
    offsets, n = {}, 0
    for bl in lineage.teacher.lists:
        offsets[bl.name] = n
        n += bl.num_blocks
    config = _adapter_config(metadata)

    modules: dict[str, list[str]] = {}
    for k in tensors:
        modules.setdefault(module_of(k)[0], []).append(k)
    out: dict[str, Any] = {}
    report = RemapReport(lineage.family, [])
    formats: set[str] = set()
    rename: dict[str, str | None] = {}  # dotted module path (no component prefix) -> new path / None (dropped)
    for module, keys in modules.items():
        pair = _pair(tensors, module)
        norm2 = delta_norm2(*pair, module_scale(tensors, module, pair[0].shape[0], config)) if pair else 0.0
        report.total_norm2 += norm2
        ref = parse_block(module, lists, kohya)
        if ref is None:
            dotted = _dotted_module(module)
            if dotted is not None:
                formats.add("diffusers")
                weight = shapes.get(f"{dotted}.weight")
                if weight is None:
                    raise PPCLError(f"LoRA key {keys[0]}: the {lineage.family} transformer of this model has no module "
                                    f"{dotted!r}: a LoRA of another model family?")
                _check_shapes(tensors, keys, weight, f"module {dotted}")
            elif module.startswith(_KOHYA):
                formats.add("kohya")
                if re.search(r"blocks_\d+", module):
                    raise PPCLError(f"LoRA key {keys[0]}: not a block key of a {lineage.family} LoRA (kohya block "
                                    f"prefixes: {', '.join(kohya) or 'none'}): a LoRA of another model family?")
            report.passed.append(module)
            out.update({k: tensors[k] for k in keys})
            continue
        formats.add("diffusers" if ref.style == "dotted" else "kohya")
        count = teacher_counts.get(ref.list_name, 0)
        if ref.index >= count:
            raise PPCLError(f"LoRA key {keys[0]}: block {ref.list_name}.{ref.index}, but the export's teacher has "
                            f"{count} {ref.list_name} (ppcl_lineage.json): a LoRA of another model (block count)")
        teacher_block = offsets[ref.list_name] + ref.index
        label = f"{ref.list_name}.{ref.index} (teacher block {teacher_block})"
        entry = kept.get((ref.list_name, ref.index))
        if entry is None:
            plug = plug_of[teacher_block]
            if ref.style == "dotted":
                # the removed block is gone: its module must exist in SOME block of that list (blocks of one list
                # may differ, e.g. SD3.5's dual-attention first blocks), with the LoRA's shapes
                pat = re.compile(rf"{re.escape(ref.list_name)}\.\d+\.{re.escape(ref.inner)}\.weight")
                same = [k for k in shapes if pat.fullmatch(k)]
                if not same:
                    raise PPCLError(f"LoRA key {keys[0]}: a {lineage.family} block of this model has no module "
                                    f"{ref.inner!r}: a LoRA of another model family?")
                errors = []
                for k in same:
                    try:
                        _check_shapes(tensors, keys, shapes[k], f"module {k[:-len('.weight')]}")
                        break
                    except PPCLError as e:
                        errors.append(e)
                else:
                    raise errors[0]
            report.dropped.append(Dropped(module, label, f"teacher block removed: inside interval "
                                          f"[{plug.interval[0]}, {plug.interval[1]}], replaced by the plug "
                                          f"{plug.student_list}.{plug.student_index}", norm2, keys))
            if ref.style == "dotted":
                rename[_strip_component(module)] = None
            continue
        new = ref.renamed(entry.student_index)
        if ref.style == "dotted":
            where = f"{entry.student_list}.{entry.student_index}.{ref.inner}"
            if f"{where}.weight" not in shapes:
                if not entry.width_ops:
                    raise PPCLError(f"LoRA key {keys[0]}: a {lineage.family} block of this model has no module "
                                    f"{ref.inner!r}: a LoRA of another model family?")
                report.dropped.append(Dropped(module, label, f"module replaced by the width op(s) of student block "
                                              f"{entry.student_list}.{entry.student_index}", norm2, keys))
                rename[_strip_component(module)] = None
                continue
            _check_shapes(tensors, keys, shapes[f"{where}.weight"], f"module {where}")
            rename[_strip_component(module)] = _strip_component(new)
        elif entry.width_ops:
            report.dropped.append(Dropped(module, label, "kohya key on a block with width ops: which of its "
                                          "modules remain cannot be checked", norm2, keys))
            continue
        report.renamed.append((module, new))
        out.update({new + k[len(module):]: tensors[k] for k in keys})
    if not report.renamed and not report.passed:
        raise PPCLError(f"no key of this LoRA lands on the pruned model: every module is on a removed block "
                        f"({len(report.dropped)} dropped)")
    report.formats = sorted(formats)
    report.plugs = [f"{b.student_list}.{b.student_index} (plug of teacher blocks [{b.interval[0]}, "
                    f"{b.interval[1]}])" for b in lineage.blocks if b.kind == "plug"]
    targets = sorted({_strip_component(module_of(k)[0]) for k in out if _dotted_module(module_of(k)[0]) is not None})
    return out, _remap_metadata(metadata, rename, lists, kohya, targets), report


def _strip_component(module: str) -> str:
    for pre in ("transformer.", "diffusion_model."):
        if module.startswith(pre):
            return module[len(pre):]
    return module


def _remap_metadata(metadata: dict[str, str], rename: dict[str, str | None], lists, kohya,
                    targets: list[str]) -> dict[str, str]:
    """diffusers' ``lora_adapter_metadata`` with every module path that names a block renamed or dropped like its
    tensors (``exclude_modules``, ``rank_pattern``, ``alpha_pattern``; a path naming a block whose module is not in
    the LoRA is refused: it would match a different block of the student), and the transformer's
    ``target_modules`` replaced by the exact paths of the modules the remapped LoRA holds (``targets``).

    Why exact paths: diffusers builds the adapter from this config, and a suffix list (``["to_q", ...]``) would
    also put adapters on the plugs, initialised by the config's ``init_lora_weights`` (random when the LoRA was
    trained with ``init_lora_weights=False``), i.e. a LoRA where remap promises none."""

    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return dict(metadata)
    meta = json.loads(raw)

    def new_path(path: str, field_name: str) -> str | None:
        ref = parse_block(path, lists, kohya)
        if ref is None:
            return path
        if path not in rename:
            raise PPCLError(f"LoRA metadata {field_name}: module {path!r} names a block but no tensor of the LoRA: "
                            f"cannot be placed on the pruned model")
        return rename[path]

    for key, value in list(meta.items()):
        field_name = key.split(".", 1)[-1]
        if field_name in ("layers_to_transform", "layers_pattern") and value:
            raise PPCLError(f"LoRA metadata {key}: layer indices cannot be remapped; convert the LoRA to plain "
                            f"module paths first")
        if key == "transformer.target_modules" and targets:
            meta[key] = exact_targets(targets)
        elif field_name in ("target_modules", "exclude_modules") and isinstance(value, list):
            meta[key] = [p for p in (new_path(v, key) for v in value) if p is not None]
        elif field_name in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):
            meta[key] = {p: v for p, v in ((new_path(k, key), v) for k, v in value.items()) if p is not None}
    return {**metadata, LORA_METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


def exact_targets(paths: list[str]) -> str:
    """peft ``target_modules`` matching exactly ``paths`` and nothing else. A list would not do: peft matches list
    entries as suffixes, so the top-level ``proj_out`` would also adapt every single block's ``proj_out``; a
    string is matched with ``re.fullmatch``."""
    return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def save_lora(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    """Write a LoRA safetensors file atomically (complete or not at all)."""
    from safetensors.torch import save_file

    from ppcl.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def _sha256(path: str | Path) -> str:
    from ppcl.storage import sha256_file

    return sha256_file(Path(path))


def remap(lora: str | Path, model: str | Path, out: str | Path) -> RemapReport:
    """``ppcl lora remap``: the teacher LoRA ``lora`` placed on the pruned export ``model``, written to ``out``."""
    from ppcl.lineage import read_lineage

    lineage = read_lineage(model)
    tensors, metadata = read_lora(lora)
    new, meta, report = remap_state_dict(tensors, metadata, lineage, transformer_shapes(model))
    meta[PPCL_METADATA_KEY] = json.dumps({"command": "lora remap", "lora": str(lora), "lora_sha256": _sha256(lora),
                                          "plan_hash": lineage.plan_hash, **report.as_dict()})
    save_lora(out, new, meta)
    return report


# ----------------------------------------------------------------------------------------------- transfer
@dataclass
class TransferSettings:
    """Knobs of :func:`transfer` (the CLI's flags and defaults come from here)."""

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 8
    warmup_steps: int = 10
    #: weight of the output-level MSE term (0: per-block D only, kept blocks keep the remapped LoRA). On by
    #: default: on the reference teacher the per-block term alone moved the judged colour shift but not the latent
    #: PSNR to teacher+LoRA, the output term moved both (tests/test_lora.py, the slow benchmark there)
    output_loss_weight: float = 1.0
    seed: int = 0
    #: built-in synthetic set (used only without ``data``)
    n_samples: int = 64
    resolution: int | None = None
    timesteps: str = "logit_normal"
    max_grad_norm: float = 1.0


@dataclass
class TransferResult:
    out: Path
    report: RemapReport
    trained_blocks: list[str]
    first_loss: float
    final_loss: float
    steps: int


def canonical_lora(pipe, lora: str | Path) -> dict[str, tuple[Any, Any]]:
    """The transformer part of a LoRA as diffusers' own loader reads it for ``pipe``'s family (kohya converted),
    with every module's scale folded into ``B``: ``module path -> (A (r, in), s * B (out, r))``."""
    import inspect

    # FLUX's loader returns the network alphas separately (and only when asked); the others keep them inline
    alphas_kw = ({"return_alphas": True}
                 if "return_alphas" in inspect.signature(type(pipe).lora_state_dict).parameters else {})
    loaded = type(pipe).lora_state_dict(str(lora), return_lora_metadata=True, **alphas_kw)
    state, metadata = loaded[0], loaded[-1] or {}
    alphas = loaded[1] if len(loaded) == 3 else None
    config = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    if any(not k.startswith("transformer.") for k in state):
        other = next(k for k in state if not k.startswith("transformer."))
        raise PPCLError(f"--lora {lora}: key {other} is not a transformer LoRA key: transfer moves transformer LoRAs "
                        f"(text-encoder parts: keep them with `ppcl lora remap`)")
    out = {}
    tensors = {**state, **(alphas or {})}
    for k in state:
        module, part = module_of(k)
        if part != "lora_A":
            continue
        pair = _pair(tensors, module)
        if pair is None:
            raise PPCLError(f"--lora {lora}: module {module} has lora_A but no lora_B")
        a, b = pair
        scale = module_scale(tensors, module, a.shape[0], config)
        out[module.removeprefix("transformer.")] = (a.float(), b.float() * scale)
    if not out:
        raise PPCLError(f"--lora {lora}: no transformer LoRA module (lora_A / lora_B pairs)")
    return out


def transfer(lora: str | Path, model: str | Path, out: str | Path, *, teacher: str | Path | None = None,
             data: Any = None, settings: TransferSettings | None = None, progress: bool = True) -> TransferResult:
    """``ppcl lora transfer``: train a LoRA on the pruned ``model`` so that it behaves like ``teacher`` + ``lora``
    (module doc); write it to ``out``. ``teacher`` defaults to the path the export's lineage records; ``data``: a
    latent cache folder, a list of cache-shaped batches, or None for the built-in synthetic set."""
    import torch

    from ppcl.lineage import read_lineage

    s = settings or TransferSettings()
    lineage = read_lineage(model)
    if any(op.get("op") == "text_freeze" for b in lineage.blocks for op in b.width_ops) or \
            any(b.text_freeze is not None for b in lineage.blocks):
        raise PPCLError(f"--model {model}: transfer does not support exports with text_freeze width ops")
    teacher = teacher or lineage.teacher.path
    if not teacher:
        raise PPCLError(f"--model {model}: its lineage records no teacher path: pass --teacher")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tpipe, tadapter, canon = _teacher_with_lora(teacher, lineage, lora, device)
    st = _student_with_adapters(model, lineage, canon, s, device)
    history = _train_transfer(tpipe, tadapter, st, data, s, teacher, device, progress)

    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(st.pipe.transformer)
    tensors = {f"transformer.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}
    cfg = {f"transformer.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in st.config.to_dict().items()}
    tail = history[-10:]
    meta = {"format": "pt", LORA_METADATA_KEY: json.dumps(cfg, indent=2, sort_keys=True, default=str),
            PPCL_METADATA_KEY: json.dumps({"command": "lora transfer", "lora": str(lora), "lora_sha256": _sha256(lora),
                                           "teacher": str(teacher), "plan_hash": lineage.plan_hash,
                                           "settings": s.__dict__, "first_loss": history[0],
                                           "final_loss": sum(tail) / len(tail)})}
    save_lora(out, tensors, meta)
    return TransferResult(Path(out), st.report, sorted(u.name for u in st.units), history[0], sum(tail) / len(tail),
                          s.steps)


def _teacher_with_lora(teacher, lineage, lora, device):
    """The frozen teacher: the teacher pipeline (checked against the export's lineage) with ``lora`` fused by
    diffusers' own loader, on ``device``. Returns the pipeline, its adapter and the LoRA in canonical form."""
    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.plugs import freeze

    tpipe = load_pipeline(teacher)
    tadapter = get_adapter(tpipe)
    have = {name: len(getattr(tpipe.transformer, name)) for name, _ in tadapter.block_lists}
    want = {bl.name: bl.num_blocks for bl in lineage.teacher.lists}
    if tadapter.family != lineage.family or have != want:
        raise PPCLError(f"--teacher {teacher}: {tadapter.family} with blocks {have}, but the export was pruned from a "
                        f"{lineage.family} teacher with {want} (ppcl_lineage.json)")
    canon = canonical_lora(tpipe, lora)
    try:
        tpipe.load_lora_weights(str(lora), adapter_name="teacher_lora")
    except (ValueError, KeyError, RuntimeError) as e:
        raise PPCLError(f"--lora {lora}: diffusers cannot load it on the teacher: {str(e).splitlines()[0]}") from None
    tpipe.fuse_lora()
    tpipe.unload_lora_weights()
    freeze(tpipe.transformer).to(device)
    return tpipe, tadapter, canon


@dataclass
class _TransferStudent:
    """The pruned pipeline with LoRA adapters in place, what is trained of it, and the remap report."""

    pipe: Any
    adapter: Any
    config: Any  # peft LoraConfig
    report: Any
    units: list  # ppcl.distill.units.Unit: the trained blocks
    params: list  # the trained LoRA tensors


def _student_with_adapters(model, lineage, canon, s: TransferSettings, device) -> _TransferStudent:
    """The student: the pruned model with adapters on the modules the teacher LoRA remaps to (initialised from it)
    and, at the most common rank, on the adapted modules of every plug and width-modified block (every block when
    the output-level term trains the whole student)."""
    import torch
    from peft import LoraConfig
    from torch import nn

    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.distill.units import Unit
    from ppcl.plugs import freeze

    spipe = load_pipeline(model)
    sadapter = get_adapter(spipe)
    freeze(spipe.transformer)
    canon_sd = {f"transformer.{m}.{p}.weight": t for m, (a, b) in canon.items() for p, t in (("lora_A", a),
                                                                                             ("lora_B", b))}
    placed, _, report = remap_state_dict(canon_sd, {}, lineage, transformer_shapes(model))
    init = {module_of(k)[0].removeprefix("transformer."): None for k in placed}
    init = {m: (placed[f"transformer.{m}.lora_A.weight"], placed[f"transformer.{m}.lora_B.weight"]) for m in init}
    lists = tuple(name for name, _ in sadapter.block_lists)
    inner: dict[str, set[str]] = {}  # list -> module paths inside its blocks that the teacher LoRA adapts
    for m in canon:
        ref = parse_block(m, lists, {})
        if ref is not None:
            inner.setdefault(ref.list_name, set()).add(ref.inner)
    ranks = Counter(a.shape[0] for a, _ in canon.values())
    r0 = ranks.most_common(1)[0][0]
    trained_blocks = [b for b in lineage.blocks if b.kind == "plug" or b.width_ops or s.output_loss_weight > 0]
    targets: dict[str, int] = {m: a.shape[0] for m, (a, _) in init.items()}
    for b in trained_blocks:
        block = getattr(spipe.transformer, b.student_list)[b.student_index]
        for rel in sorted(inner.get(b.student_list, ())):
            path = f"{b.student_list}.{b.student_index}.{rel}"
            if path not in targets and isinstance(_get(block, rel), nn.Linear):
                targets[path] = r0
    pattern = {m: r for m, r in targets.items() if r != r0}
    config = LoraConfig(r=r0, lora_alpha=r0, target_modules=exact_targets(list(targets)), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), init_lora_weights=True)
    spipe.transformer.add_adapter(config)
    with torch.no_grad():
        for m, (a, b) in init.items():
            layer = spipe.transformer.get_submodule(m)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    spipe.transformer.to(device)

    units = [Unit(name=f"{b.student_list}.{b.student_index}", kind="interval",
                  start=b.teacher_block if b.kind == "kept" else b.interval[0],
                  end=b.teacher_block if b.kind == "kept" else b.interval[1],
                  source=b.teacher_block if b.kind == "kept" else b.initialised_from.teacher_block,
                  module=getattr(spipe.transformer, b.student_list)[b.student_index]) for b in trained_blocks]
    trained = {u.name for u in units}
    params = [p for n, p in spipe.transformer.named_parameters() if "lora_" in n and
              (s.output_loss_weight > 0 or any(n.startswith(t + ".") for t in trained))]
    for n, p in spipe.transformer.named_parameters():
        p.requires_grad_(any(p is q for q in params))
    if not params:
        raise PPCLError(f"--model {model}: no plug or width-modified block to train and output_loss_weight is 0: the "
                        f"remapped LoRA is already exact (use `ppcl lora remap`)")
    return _TransferStudent(spipe, sadapter, config, report, units, params)


def _train_transfer(tpipe, tadapter, st: _TransferStudent, data, s: TransferSettings, teacher, device,
                    progress: bool) -> list[float]:
    """The training loop: per step, one teacher+LoRA pass, the teacher-forced D of every trained block and the
    optional output-level MSE, one AdamW step. Returns the total loss of every step."""
    import torch

    from ppcl.distill.losses import output_loss, teacher_pass, unit_step_losses
    from ppcl.distill.optim import make_optimizer, make_scheduler
    from ppcl.distill.settings import resolve_settings
    from ppcl.distill.streams import step_inputs, training_stream
    from ppcl.plugs import LOSS_EPS

    dset = resolve_settings(None, dict(
        steps=s.steps, lr=s.lr, batch_size=s.batch_size, warmup_steps=min(s.warmup_steps, s.steps - 1),
        seed=s.seed, n_samples=s.n_samples, timesteps=s.timesteps, mixed_precision="no", use_8bit_adam=False,
        max_grad_norm=s.max_grad_norm, output_loss_weight=s.output_loss_weight,
        **({"resolution": s.resolution} if s.resolution else _default_resolution(teacher))))
    _, stream = training_stream(tpipe, data, dset)
    noised = step_inputs(tpipe, tadapter, dset, device, torch.float32, 0)
    optimizer = make_optimizer(st.params, dset, device)
    scheduler = make_scheduler(optimizer, dset)
    history: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, desc="lora transfer", unit="step")
    for step in range(s.steps):
        # batch -> inputs; teacher+LoRA pass (calls entering / streams leaving every trained block's interval)
        inputs = noised(next(stream), step)
        calls, outs, t_out = teacher_pass(tadapter, inputs, st.units, full=s.output_loss_weight > 0)
        # per-block D of every trained student block, teacher-forced; optionally the output-level MSE
        total = sum(v for u in st.units for v in unit_step_losses(u, calls, outs, LOSS_EPS).values())
        if s.output_loss_weight > 0:
            total = total + s.output_loss_weight * output_loss(st.adapter.forward(inputs), t_out)
        if not torch.isfinite(total):
            raise PPCLError(f"lora transfer: loss is not finite at step {step + 1}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(st.params, s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        history.append(float(total.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    if bar is not None:
        bar.close()
    return history


def _get(module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _default_resolution(teacher: str | Path) -> dict[str, int]:
    from ppcl.arch import generation_defaults

    h = generation_defaults(teacher).get("height")
    return {"resolution": h} if h else {}
