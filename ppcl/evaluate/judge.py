"""Judge scores inside ``ppcl evaluate``: attribute accuracy and judge-FID of generated synth-caption images.

The reference teacher (``ppcl/bench/assets/reference-teacher``) draws the captions of :mod:`ppcl.data.synth`, and
the shipped judge (:mod:`ppcl.bench.judge`) reads what an image shows. That gives the evaluation of a model
pruned from the reference teacher an alignment score and a FID that mean something at 32 px, where CLIP and
Inception do not: the same two numbers the quality benchmark reports (:mod:`ppcl.bench.quality`), computed by
the same functions (:func:`ppcl.bench.judge.judge_scores`, :func:`ppcl.bench.judge.judge_fid`).

- Applies when every prompt is a canonical synth caption (:func:`ppcl.data.synth.parse_caption`); ``auto``
  (``EvalSettings.judge`` None) turns it on exactly then, so real prompts never get a meaningless judge score.
- Judge-FID reference: one synth image per prompt, of that prompt's caption, rendered at the judge's 32 px.
  Prompt i's geometry comes from ``default_rng([EVAL_SEED, i])``: for the benchmark's evaluation prompts
  (:func:`ppcl.bench.teacher.eval_prompts`, captions of exactly those draws) the references are the benchmark's
  own real images, so the two FIDs agree; for any other caption the first draw of the same scene kind (and
  arrangement, where the caption states it) is re-coloured and re-shaped to match it.
- Memory: generated images are kept resized to the judge's 32 x 32 (12 KiB per image whatever the resolution).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ppcl.errors import PPCLError

#: the seed of the benchmark's evaluation set (ppcl.bench.teacher.EVAL_SEED): references reproduce its images
REFERENCE_SEED = 2000
#: draws tried per caption for a scene of the right kind before giving up (a kind has probability >= 1/6)
_MAX_DRAWS = 1000


def synth_attributes(prompts: list[str]) -> list[dict] | None:
    """The stated attributes of every prompt, or None if one of them is not a synth caption."""
    from ppcl.data.synth import parse_caption

    out = []
    for p in prompts:
        try:
            out.append(parse_caption(p))
        except PPCLError:
            return None
    return out


def _scene_for(text: str, index: int) -> dict:
    """Full synth attributes (with geometry) of caption ``text``, deterministic in (caption, index): the first draw
    of ``default_rng([REFERENCE_SEED, index])`` of the caption's kind (and relation), given its shapes and colours.
    When that draw is the caption's own scene (the benchmark's prompts), the restyling changes nothing."""
    from ppcl.data import synth

    stated = synth.parse_caption(text)
    rng = np.random.default_rng([REFERENCE_SEED, index])
    for _ in range(_MAX_DRAWS):
        a = synth.sample_attributes(rng)
        if a["kind"] == stated["kind"] and a["relation"] == stated["relation"]:
            return {**a, "shapes": list(stated["shapes"]), "colours": list(stated["colours"]),
                    "objects": _restyle(a["objects"], stated)}
    raise AssertionError(f"no synth scene of kind {stated['kind']} in {_MAX_DRAWS} draws")


def _restyle(objects: list[dict], stated: dict) -> list[dict]:
    return [{**o, "shape": s, "colour": c} for o, s, c in zip(objects, stated["shapes"], stated["colours"])]


def reference_images(prompts: list[str], size: int = 32) -> torch.Tensor:
    """One synth render per prompt of its caption: float (N, 3, size, size) in [0, 1]."""
    from ppcl.data.synth import render

    arr = np.stack([np.asarray(render(_scene_for(p, i), size)) for i, p in enumerate(prompts)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


class JudgeScorer:
    """Streams one model's generated images; :meth:`compute` scores them against the captions.

    ``sample_prompts``: the prompt of every sample, in sample order (seeds repeat prompts). The judge-FID
    reference has one render per sample, so both sets have the same size.
    """

    def __init__(self, sample_prompts: list[str]):
        from ppcl.bench.judge import INPUT_SIZE, load_judge
        from ppcl.evaluate.fid import state_dict_sha256

        attrs = synth_attributes(sample_prompts)
        if attrs is None:
            raise PPCLError("the judge reads synth captions only (ppcl synth): not every prompt is one")
        self.attributes = attrs
        self.size = INPUT_SIZE
        self.judge = load_judge()
        self.sha256 = state_dict_sha256(self.judge)
        self.reference = reference_images(sample_prompts, INPUT_SIZE)
        ref_bytes = (self.reference * 255).round().to(torch.uint8).numpy().tobytes()
        self.reference_sha256 = hashlib.sha256(ref_bytes).hexdigest()
        self._images: list[torch.Tensor] = []

    @property
    def num_features(self) -> int:
        return self.judge.num_features

    def reset(self) -> None:
        self._images = []

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """Add float images (B, 3, H, W) in [0, 1], in sample order."""
        x = images.detach().float().cpu()
        if x.shape[-2:] != (self.size, self.size):  # the judge's own resize (Judge.prepare), done once here
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        self._images.append(x)

    def compute(self) -> dict[str, float]:
        """``attribute_accuracy``, ``image_accuracy``, ``judge_fid`` of the images added since :meth:`reset`."""
        from ppcl.bench.judge import judge_fid, judge_scores

        images = torch.cat(self._images) if self._images else torch.zeros(0, 3, self.size, self.size)
        if len(images) != len(self.attributes):
            raise PPCLError(f"judge: {len(images)} images for {len(self.attributes)} samples")
        scores = judge_scores(images, self.attributes, self.judge)
        fid = judge_fid(images, self.reference, self.judge) if len(images) >= 2 else None
        return {"attribute_accuracy": scores["attribute_accuracy"], "image_accuracy": scores["image_accuracy"],
                "judge_fid": fid}


def judge_weights_path() -> Path:
    from ppcl.bench.judge import ASSETS

    return ASSETS / "judge.safetensors"
