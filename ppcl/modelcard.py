"""The model card (README.md) of an export, per the Hugging Face Hub's conventions (issue 17, item 4).

Front matter (YAML; field names as the Hub's model-card metadata spells them, ``huggingface_hub.ModelCardData``):

- ``base_model``: the teacher's Hub id when it can be known from the folder: a Hub cache snapshot path
  (``.../models--<org>--<name>/snapshots/<rev>``), or a ``_name_or_path`` shaped like ``org/name`` in the
  teacher's model_index.json / transformer config. The teacher's README front matter has no field for the repo's
  own id (its ``base_model`` is the teacher's own parent), so it is not used for this. Otherwise the teacher's path,
  with a comment to replace it with the Hub id before uploading (the Hub links only ids).
- ``base_model_relation: finetune``: the Hub allows adapter, merge, quantized and finetune. A PPCL student is a
  complete model whose weights are the teacher's, some blocks removed and the plugs trained by distillation from
  the teacher: trained weights derived from the base is what ``finetune`` means; it is not an adapter on top of
  the teacher, not a merge of several models, and its weights are not a lower-precision copy.
- ``license`` / ``license_name`` / ``license_link`` (and ``language``): copied from the teacher's README front
  matter. The teacher's terms travel verbatim: every ``LICENSE*`` file of the teacher root is copied into the
  export by ``ppcl export`` (so a relative ``license_link`` such as FLUX.1-dev's ``LICENSE.md`` still resolves),
  and the license sections of the teacher's README are quoted unchanged in the card. A teacher without a license
  in its README gets no ``license`` field (the Hub would reject a guess) and a body line saying so.
- ``library_name: diffusers``, ``pipeline_tag: text-to-image``, ``tags``: ppcl, pruned, distilled, the family.

Body: how to load it (width exports need ``trust_remote_code=True``), parameter counts, the plan (intervals,
width ops, plan hash), the block map (:func:`ppcl.lineage.markdown_block_map`), the teacher-LoRA warning, the
evaluation table (between markers; ``ppcl evaluate`` results are filled in by :func:`set_evaluation`), training
settings and final losses, the full plan.

Only the student's own records. A teacher folder may hold records that describe the TEACHER: ppcl's reference
teacher has ``ppcl_reference.json`` (its own training run and judge scores, :mod:`ppcl.bench.teacher`). Copied
into the export, it would read as the student's. It is not copied (:data:`TEACHER_ONLY_FILES`); the student's
record is ``ppcl_export.json`` and the card, and the teacher is named in ``base_model`` and ``ppcl_lineage.json``,
where its record can be read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from ppcl.atomic import atomic_path
from ppcl.errors import PPCLError

#: teacher files ``ppcl export`` does not copy: the teacher's card (the export writes its own) and records of the
#: teacher's own training that would read as the student's
TEACHER_ONLY_FILES: tuple[str, ...] = ("README.md", "ppcl_reference.json")
#: why ``base_model_relation`` is ``finetune`` (also written into the card as a YAML comment)
RELATION_NOTE = ("finetune: the nearest of the Hub's adapter/merge/quantized/finetune for a pruned and distilled "
                 "derivative (the teacher's weights, blocks removed, plugs trained against it; a whole model)")
EVAL_BEGIN = "<!-- ppcl:evaluation -->"
EVAL_END = "<!-- /ppcl:evaluation -->"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CACHE_DIR = re.compile(r"^models--([^/]+?)--(.+)$")


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(metadata, body)`` of a README with optional YAML front matter (``---`` lines around it).

    Raises PPCLError when the front matter is not a YAML mapping."""
    if not text.startswith("---"):
        return {}, text
    lines = text.splitlines(keepends=True)
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
    if end is None:
        return {}, text
    try:
        data = yaml.safe_load("".join(lines[1:end])) or {}
    except yaml.YAMLError as e:
        raise PPCLError(f"README front matter is not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PPCLError("README front matter is not a mapping")
    return data, "".join(lines[end + 1:])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def teacher_hub_id(teacher: str | Path) -> str | None:
    """The teacher's Hub id when the folder tells it (module doc), else None."""
    teacher = Path(teacher)
    for part in reversed(teacher.resolve().parts):
        m = _CACHE_DIR.match(part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    for cfg in (teacher / "model_index.json", teacher / "transformer" / "config.json"):
        name = _read_json(cfg).get("_name_or_path")
        if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
            return name
    return None


def license_sections(body: str) -> list[str]:
    """The README sections whose heading names a licence, verbatim (heading to the next heading of the same or a
    higher level)."""
    lines = body.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(#{1,6})\s+(.*)$", lines[i])
        if m and re.search(r"licen[cs]e", m.group(2), re.I):
            level, j = len(m.group(1)), i + 1
            while j < len(lines):
                n = re.match(r"^(#{1,6})\s", lines[j])
                if n and len(n.group(1)) <= level:
                    break
                j += 1
            out.append("\n".join(lines[i:j]).strip())
            i = j
        else:
            i += 1
    return out


def license_files(teacher: str | Path) -> list[str]:
    """Names of the teacher root's ``LICENSE*`` files (copied verbatim into the export)."""
    return sorted(p.name for p in Path(teacher).iterdir() if p.is_file() and p.name.upper().startswith("LICENSE"))


def front_matter(teacher: str | Path, family: str) -> tuple[list[str], dict[str, Any]]:
    """The card's YAML front matter lines (with ``---``) and the metadata dict they encode."""
    teacher = Path(teacher)
    readme = teacher / "README.md"
    meta, _ = split_front_matter(readme.read_text()) if readme.is_file() else ({}, "")
    hub_id = teacher_hub_id(teacher)
    data: dict[str, Any] = {"base_model": hub_id or str(teacher), "base_model_relation": "finetune"}
    for key in ("license", "license_name", "license_link", "language"):
        if meta.get(key) is not None:
            data[key] = meta[key]
    data.update({"library_name": "diffusers", "pipeline_tag": "text-to-image",
                 "tags": ["ppcl", "pruned", "distilled", family]})
    comments = {"base_model_relation": f"# {RELATION_NOTE}"}
    if hub_id is None:
        comments["base_model"] = ("# the teacher's local path: replace it with the teacher's Hub id before uploading "
                                  "(the Hub links base models by id)")
    lines = ["---"]
    for key, value in data.items():
        if key in comments:
            lines.append(comments[key])
        lines.extend(yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True, width=1000).splitlines())
    lines.append("---")
    return lines, data


def _license_body(teacher: Path, data: dict[str, Any]) -> list[str]:
    readme = teacher / "README.md"
    _, body = split_front_matter(readme.read_text()) if readme.is_file() else ({}, "")
    files = license_files(teacher)
    lines = ["## License", ""]
    if "license" in data:
        name = data.get("license_name") or data["license"]
        link = f" ({data['license_link']})" if data.get("license_link") else ""
        lines.append(f"This model is derived from the teacher and is under the teacher's license: **{name}**{link}.")
    else:
        lines.append("The teacher's README states no license: check the teacher's terms before using or sharing "
                     "this model.")
    if files:
        lines += ["", "The teacher's license files are included unchanged: " + ", ".join(f"`{f}`" for f in files)
                  + "."]
    sections = license_sections(body)
    if sections:
        lines += ["", "The license section of the teacher's model card, verbatim:", ""]
        for s in sections:
            lines += [s, ""]
    return lines


def evaluation_table(metrics: Any, model: str | Path | None = None) -> list[str]:
    """Markdown table of a ``metrics.json`` (:class:`ppcl.evaluate.metrics.EvalMetrics`): the teacher and every
    evaluated model (``model``: only that one, matched by path or name), with the settings that produced it."""
    rows = []
    for m in metrics.models:
        if m.role != "teacher" and model is not None and str(model) not in (m.path, m.name) \
                and Path(m.path).resolve() != Path(model).resolve():
            continue
        fid = "—" if m.fid is None else f"{m.fid:.2f}"
        clip = "—" if m.clip_score is None else f"{m.clip_score:.2f}"
        if m.fidelity is None:
            psnr = "—"
        elif m.fidelity.identical:
            psnr = "identical"
        else:
            psnr = f"{m.fidelity.latent_psnr_db:.2f}"
        rows.append(f"| {m.name} ({m.role}) | {m.parameters:,} ({m.parameters_ratio:.2%}) | {m.speedup:.2f}x | "
                    f"{psnr} | {fid} | {clip} |")
    s = metrics.settings
    return [
        "| model | transformer parameters | speed-up per step | latent PSNR vs teacher (dB) | FID | CLIP score |",
        "|---|---|---|---|---|---|", *rows, "",
        f"{metrics.samples} samples ({len(metrics.prompts)} prompts x {s.seeds} seeds), {s.steps} steps, "
        f"{s.height}x{s.width}, guidance {s.guidance}; `ppcl evaluate`, metrics.json of {metrics.created}.",
    ]


def model_card(plan_d: dict, run: dict, chosen: list[int], result: Any, teacher: str | Path,
               lineage: dict, evaluation: Any = None) -> str:
    """README.md of an export (module doc). ``result``: the :class:`ppcl.export.ExportResult`; ``evaluation``: an
    optional ``EvalMetrics`` for the evaluation table."""
    from ppcl.lineage import LINEAGE_FILE, PLAN_FILE, markdown_block_map

    teacher = Path(teacher)
    family = plan_d.get("family") or lineage.get("family", "")
    head, data = front_matter(teacher, family)
    width = result.transformer_class.startswith("PPCL")
    ivs = [plan_d["intervals"][k] for k in chosen]
    if width:
        load = ["This transformer is width-pruned: its class is not in diffusers, its code ships in `transformer/` "
                "(it imports only torch and diffusers). Load it with `trust_remote_code=True`; the stock "
                f"`{result.transformer_class.removeprefix('PPCL')}` refuses this folder (the weights width pruning "
                "removed are stored as empty tensors).", "",
                "```python", "from diffusers import DiffusionPipeline", "",
                'pipe = DiffusionPipeline.from_pretrained("<this folder or repo>", trust_remote_code=True)', "```"]
    else:
        load = ["Depth-pruned: the stock diffusers classes load it.", "",
                "```python", "from diffusers import DiffusionPipeline", "",
                'pipe = DiffusionPipeline.from_pretrained("<this folder or repo>")', "```"]
    evaluation_lines = (evaluation_table(evaluation) if evaluation is not None else
                        ["Not evaluated yet: `ppcl evaluate --teacher TEACHER --model <this folder> --out EVAL` "
                         "measures it; `ppcl card --model <this folder> --metrics EVAL/metrics.json` puts the table "
                         "here."])
    lines = [
        *head, "",
        f"# PPCL-pruned {family} transformer", "",
        f"Pruned from `{data['base_model']}` with PPCL (pluggable pruning with contiguous layer distillation, "
        "arXiv 2511.16156): contiguous runs of transformer blocks replaced by single trained blocks (plugs), "
        "distilled from the teacher.", "",
        *load, "",
        "> **Teacher LoRAs do not fit this model as they are.** diffusers matches LoRA weights to blocks by their "
        "position, and blocks have moved: a LoRA trained on the teacher loads onto the wrong blocks (or fails) "
        "without saying so. Remap it first: `ppcl lora remap --lora teacher_lora.safetensors --model <this folder> "
        "--out student_lora.safetensors` (it reports the LoRA weights of removed blocks it had to drop), or "
        "`ppcl lora transfer` to re-train what sat on removed blocks; then `pipe.load_lora_weights(...)`.", "",
        "| | parameters |", "|---|---|",
        f"| teacher transformer | {result.teacher_parameters:,} |",
        f"| pruned transformer | {result.parameters:,} ({result.parameters / result.teacher_parameters:.2%}) |", "",
        f"- Transformer class: `{result.transformer_class}`",
        f"- Intervals replaced (0-based, inclusive; plan indices {chosen}): {ivs}",
        f"- Width ops: {json.dumps(plan_d.get('width') or [])}",
        f"- Plug init: {plan_d.get('init', 'middle')}",
        f"- Plan hash: `{run.get('plan_hash')}`", "",
        "## Block map", "",
        f"What each block of this model is (0-based; machine-readable in `{LINEAGE_FILE}`, the plan in "
        f"`{PLAN_FILE}`; `ppcl plan show --model <this folder>` prints it):", "",
        *markdown_block_map(lineage), "",
        "## Evaluation", "", EVAL_BEGIN, *evaluation_lines, EVAL_END, "",
        *_license_body(teacher, data), "",
        "## Training", "",
        "```json", json.dumps(run.get("settings", {}), indent=2), "```", "",
        "Final losses (D per plug and stream, mean of the last steps):", "",
        "```json", json.dumps(run.get("final_losses", {}), indent=2), "```", "",
        "## Full plan", "", "```json", json.dumps(plan_d, indent=2), "```", "",
    ]
    return "\n".join(lines)


def set_evaluation(model: str | Path, metrics_path: str | Path) -> Path:
    """Fill the evaluation section of an export's README.md from a ``metrics.json`` (the teacher's row and this
    model's). Rewrites the file atomically; returns its path."""
    from ppcl.evaluate.metrics import load_metrics

    readme = Path(model) / "README.md"
    if not readme.is_file():
        raise PPCLError(f"no model card: {readme}")
    metrics = load_metrics(metrics_path)
    if not any(m.role != "teacher" and (Path(m.path).resolve() == Path(model).resolve() or m.path == str(model))
               for m in metrics.models):
        raise PPCLError(f"{metrics_path}: no entry for {model} (evaluated: "
                        f"{', '.join(m.path for m in metrics.models)})")
    text = readme.read_text()
    if text.count(EVAL_BEGIN) != 1 or text.count(EVAL_END) != 1:
        raise PPCLError(f"{readme}: no evaluation section (the {EVAL_BEGIN} markers of a ppcl model card)")
    before, rest = text.split(EVAL_BEGIN)
    _, after = rest.split(EVAL_END)
    new = before + EVAL_BEGIN + "\n" + "\n".join(evaluation_table(metrics, model)) + "\n" + EVAL_END + after
    with atomic_path(readme) as tmp:
        Path(tmp).write_text(new)
    return readme
