"""The export's model card follows the Hub's conventions (issue 17 item 4): parseable YAML front matter with the
Hub's field names, the teacher as base model, the teacher's license and its terms verbatim, the block map and the
LoRA warning in the body; only the student's own records in the export."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch
import yaml

from ppcl.arch import get_adapter, load_pipeline
from ppcl.cli import main
from ppcl.distill import distill
from ppcl.errors import PPCLError
from ppcl.export import export
from ppcl.modelcard import EVAL_BEGIN, EVAL_END, front_matter, set_evaluation, split_front_matter
from ppcl.plan import make_plan, save_plan

torch.set_num_threads(1)

#: the Hub's relation values (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model)
HUB_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
TEACHER_README = """---
language:
- en
license: other
license_name: flux-1-dev-non-commercial-license
license_link: LICENSE.md
tags:
- text-to-image
- flux
---

# FLUX.1 [dev]

A rectified flow transformer.

## License

This model falls under the FLUX.1 [dev] Non-Commercial License.
Outputs may be used as the license allows.

## Usage

pip install diffusers
"""
LICENSE_TEXT = "FLUX.1 [dev] Non-Commercial License\n\n1. Definitions ...\n"


def _hub_fields() -> set[str]:
    from huggingface_hub import ModelCardData

    names = set(inspect.signature(ModelCardData.__init__).parameters) - {"self", "kwargs", "ignore_metadata_errors"}
    # base_model_relation is a Hub field (model tree) that huggingface_hub passes through as an extra key
    return names | {"base_model_relation"}


@pytest.fixture(scope="module")
def exported(tiny_pipe_dir, tmp_path_factory):
    """A width export of a tiny FLUX dressed as a Hub snapshot of FLUX.1-dev (README, LICENSE.md, the reference
    teacher's own training record)."""
    root = tmp_path_factory.mktemp("card")
    teacher = root / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "0123abc"
    shutil.copytree(tiny_pipe_dir["flux"], teacher)
    (teacher / "README.md").write_text(TEACHER_README)
    (teacher / "LICENSE.md").write_text(LICENSE_TEXT)
    (teacher / "ppcl_reference.json").write_text(json.dumps({"version": 1, "judge": {"accuracy": 0.9}}))
    adapter = get_adapter(load_pipeline(teacher))
    plan = make_plan(adapter, [[5, 8]], width=[{"op": "ffn_linear", "block": 3, "stream": "text"}])
    plan_path = save_plan(plan, root / "plan.json")
    run = root / "run"
    distill(str(teacher), plan_path, run, steps=2, warmup_steps=1, n_samples=2, progress=False)
    out = root / "pruned"
    result = export(teacher, plan_path, run, out, all_intervals=True)
    return teacher, out, result


def test_front_matter_is_hub_metadata_with_teacher_license(exported):
    teacher, out, result = exported
    text = (out / "README.md").read_text()
    meta, body = split_front_matter(text)
    assert set(meta) <= _hub_fields(), set(meta) - _hub_fields()
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert meta["base_model_relation"] in HUB_RELATIONS
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "flux-1-dev-non-commercial-license", "LICENSE.md")
    assert meta["language"] == ["en"]
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"ppcl", "pruned", "distilled", "flux"} <= set(meta["tags"])
    # huggingface_hub reads the same metadata from the card
    from huggingface_hub import ModelCard

    assert ModelCard(text).data.to_dict()["base_model"] == "black-forest-labs/FLUX.1-dev"
    # the terms: the license file byte for byte, the README's license section verbatim in the body
    assert (out / "LICENSE.md").read_bytes() == (teacher / "LICENSE.md").read_bytes()
    assert ("## License\n\nThis model falls under the FLUX.1 [dev] Non-Commercial License.\n"
            "Outputs may be used as the license allows.") in body
    assert "pip install diffusers" not in body  # the next section of the teacher's card is not carried


def test_body_has_counts_block_map_lora_warning_and_only_student_records(exported):
    teacher, out, result = exported
    _, body = split_front_matter((out / "README.md").read_text())
    assert f"{result.parameters:,}" in body and f"{result.teacher_parameters:,}" in body
    assert "| student block | is |" in body
    assert "ppcl lora remap --lora" in body and "trust_remote_code=True" in body
    assert EVAL_BEGIN in body and EVAL_END in body
    assert not (out / "ppcl_reference.json").exists()  # the teacher's training record, not the student's
    assert json.loads((out / "ppcl_export.json").read_text())["parameters"] == result.parameters


def test_teacher_without_card_gets_its_path_and_no_license(tmp_path):
    teacher = tmp_path / "my-teacher"
    teacher.mkdir()
    lines, data = front_matter(teacher, "sd3")
    parsed = yaml.safe_load("\n".join(lines[1:-1]))
    assert parsed == data and data["base_model"] == str(teacher) and "license" not in data
    assert any(line.startswith("# ") and "Hub id" in line for line in lines)  # says to replace the path
    (teacher / "model_index.json").write_text(json.dumps({"_name_or_path": "stabilityai/stable-diffusion-3.5-medium"}))
    assert front_matter(teacher, "sd3")[1]["base_model"] == "stabilityai/stable-diffusion-3.5-medium"


def _metrics(model_path: str, teacher_path: str) -> dict:
    latency = {"median_s": 0.02, "min_s": 0.019, "max_s": 0.021, "spread": 0.1, "repeats": 3, "warmup": 1,
               "calls_per_step": 1, "per_step_s": 0.02}
    memory = {"kind": "cpu_peak_rss", "peak_bytes": 10, "baseline_bytes": 5, "model_bytes": 5}
    teacher = {"name": "teacher", "path": teacher_path, "role": "teacher", "parameters": 200, "parameters_ratio": 1.0,
               "latency": latency, "speedup": 1.0, "memory": memory, "generation_s": 1.0}
    model = {**teacher, "name": "pruned", "path": model_path, "role": "model", "parameters": 150,
             "parameters_ratio": 0.75, "speedup": 1.31, "fid": 12.345,
             "fidelity": {"latent_psnr_db": 21.5, "latent_cosine": 0.9, "latent_cosine_min": 0.8,
                          "image_psnr_db": 25.0, "identical": False, "samples": 4}}
    return {"version": 1, "created": "2026-11-27T21:00:00Z", "settings": {"steps": 2, "height": 64, "width": 64},
            "prompts": ["a", "b"], "samples": 4, "teacher": teacher_path, "models": [teacher, model]}


def test_card_command_fills_the_evaluation_table(exported, tmp_path, capsys):
    teacher, out, _ = exported
    card = tmp_path / "pruned"
    shutil.copytree(out, card)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(_metrics(str(card), str(teacher))))
    assert main(["card", "--model", str(card), "--metrics", str(metrics)]) == 0
    _, body = split_front_matter((card / "README.md").read_text())
    section = body.split(EVAL_BEGIN)[1].split(EVAL_END)[0]
    assert "| pruned (model) | 150 (75.00%) | 1.31x | 21.50 | 12.35 | — |" in section
    assert "| teacher (teacher) | 200 (100.00%) | 1.00x | — | — | — |" in section
    assert "Not evaluated yet" not in section
    # metrics of another model: one line naming the file, the card untouched
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_metrics(str(tmp_path / "elsewhere"), str(teacher))))
    before = (card / "README.md").read_text()
    assert main(["card", "--model", str(card), "--metrics", str(other)]) == 2
    assert "other.json: no entry for" in capsys.readouterr().err
    assert (card / "README.md").read_text() == before
    with pytest.raises(PPCLError, match="no model card"):
        set_evaluation(tmp_path, metrics)
