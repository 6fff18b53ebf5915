"""The judge: a small CNN that reads an image and predicts the synth attributes its caption states.

Heads (slot a = the single object, or the left / top one; slot b = the right / bottom one):
``count`` (1, 2), ``arrangement`` (horizontal, vertical), ``shape_a``, ``colour_a``, ``shape_b``,
``colour_b`` (over :data:`ppcl.data.synth.SHAPES` / ``COLOUR_NAMES``).

Which heads are scored for an image depends on what its caption states (see :mod:`ppcl.data.synth`):

- ``single`` ("a red circle"): count, shape_a, colour_a;
- ``relation`` ("a red circle above a blue square"): count, arrangement, shape_a, colour_a, shape_b, colour_b;
- ``pair`` ("two green triangles"): count, shape_a, colour_a, shape_b, colour_b (arrangement is not stated).

Attribute accuracy (:func:`judge_accuracy`) is correct checks / all checks over the batch (micro average), a
small GenEval-like score; :func:`judge_scores` adds per-head accuracy and image accuracy (every stated
attribute right). Judge-FID uses :func:`judge_features`, the 128-d penultimate layer.

Input convention: float (B, 3, H, W) in [0, 1], any H = W >= 16; images are resized to 32 px (bilinear with
antialias), the resolution the judge was trained at. Training renders synth images at 32 and 64 px (the 64 px
ones resized down) and augments with blur and noise so that the judge also reads VAE-decoded, slightly soft
generations; augmentation never changes what is drawn.

``python -m ppcl.bench.judge --out ppcl/bench/assets`` retrains it (seed 0, a few CPU minutes) and writes
``judge.safetensors`` + ``judge.json`` (settings and held-out accuracy on seed 1000 images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppcl.data import synth
from ppcl.errors import PPCLError

ASSETS = Path(__file__).parent / "assets"
HEADS: dict[str, int] = {
    "count": 2,
    "arrangement": 2,
    "shape_a": len(synth.SHAPES),
    "colour_a": len(synth.COLOUR_NAMES),
    "shape_b": len(synth.SHAPES),
    "colour_b": len(synth.COLOUR_NAMES),
}
STATED: dict[str, tuple[str, ...]] = {
    "single": ("count", "shape_a", "colour_a"),
    "relation": ("count", "arrangement", "shape_a", "colour_a", "shape_b", "colour_b"),
    "pair": ("count", "shape_a", "colour_a", "shape_b", "colour_b"),
}
INPUT_SIZE = 32
HELD_OUT_SEED = 1000


class Judge(nn.Module):
    """Conv net 32x32 -> 4x4x64 -> flatten -> 128 (features) -> one linear head per attribute.

    Flatten, not global pooling: the arrangement and which object is slot a are spatial facts.
    """

    num_features = 128

    def __init__(self):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 64))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(self.num_features, n) for k, n in HEADS.items()})

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 32, 32) normalised to [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise PPCLError(f"judge: images must be (B, 3, H, W), got {tuple(images.shape)}")
        images = images.float()
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.prepare(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: h(f) for k, h in self.heads.items()}


# ---------------------------------------------------------------- labels
def labels(attributes: dict[str, Any]) -> dict[str, int]:
    """Ground-truth class per head for one synth attribute dict; -1 where the image has no such fact."""
    shapes, colours = attributes["shapes"], attributes["colours"]
    two = attributes["count"] == 2
    arrangement = -1
    if two:
        # From the drawn positions when known (synth rows), else from the stated relation (parsed captions).
        first = (attributes.get("positions") or [None])[0]
        relation = attributes.get("relation")
        if first in ("left", "top"):
            arrangement = 0 if first == "left" else 1
        elif relation in ("left_of", "above"):
            arrangement = 0 if relation == "left_of" else 1
    return {
        "count": int(two),
        "arrangement": arrangement,
        "shape_a": synth.SHAPES.index(shapes[0]),
        "colour_a": synth.COLOUR_NAMES.index(colours[0]),
        "shape_b": synth.SHAPES.index(shapes[1]) if two else -1,
        "colour_b": synth.COLOUR_NAMES.index(colours[1]) if two else -1,
    }


def stated_labels(attributes: dict[str, Any]) -> dict[str, int]:
    """The heads a caption states, with their expected class (others are not scored)."""
    lab = labels(attributes)
    return {k: lab[k] for k in STATED[attributes["kind"]]}


# ---------------------------------------------------------------- API
_CACHE: dict[str, Judge] = {}


def load_judge(path: str | Path | None = None) -> Judge:
    """The committed judge (``ppcl/bench/assets/judge.safetensors``), in eval mode, cached per path."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ASSETS / "judge.safetensors"
    key = str(path.resolve())
    if key not in _CACHE:
        if not path.is_file():
            raise PPCLError(f"judge weights not found: {path}")
        judge = Judge()
        judge.load_state_dict(load_file(str(path)))
        _CACHE[key] = judge.eval().requires_grad_(False)
    return _CACHE[key]


@torch.no_grad()
def judge_predict(images: torch.Tensor, judge: Judge | None = None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted class per head: {head: int array (B,)}."""
    judge = judge or load_judge()
    out: dict[str, list[np.ndarray]] = {k: [] for k in HEADS}
    for i in range(0, len(images), batch_size):
        for k, v in judge(images[i : i + batch_size]).items():
            out[k].append(v.argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def judge_scores(images: torch.Tensor, attributes: list[dict[str, Any]], judge: Judge | None = None, *,
                 per_image: bool = False) -> dict[str, Any]:
    """Scores of ``images`` (B, 3, H, W) in [0, 1] against the attributes their captions state.

    ``attributes``: one synth attribute dict per image (a metadata.jsonl row, or
    :func:`ppcl.data.synth.parse_caption` of the prompt). Returns ``attribute_accuracy`` (correct checks / all
    checks), ``image_accuracy`` (images with every stated attribute right), ``per_head`` accuracy, ``n``; with
    ``per_image`` also ``per_image_hits`` and ``per_image_checks`` (lists of ints, one per image: correct checks and
    stated attributes), what :func:`accuracy_difference_se` pairs.
    """
    if len(images) != len(attributes):
        raise PPCLError(f"judge: {len(images)} images but {len(attributes)} attribute rows")
    if len(images) == 0:
        raise PPCLError("judge: no images to score")
    pred = judge_predict(images, judge)
    hits = {k: [] for k in HEADS}
    rows = []
    for i, a in enumerate(attributes):
        ok = [bool(pred[k][i] == v) for k, v in stated_labels(a).items()]
        for (k, _), o in zip(stated_labels(a).items(), ok):
            hits[k].append(o)
        rows.append(ok)
    checks = [o for ok in rows for o in ok]
    out = {
        "attribute_accuracy": float(np.mean(checks)),
        "image_accuracy": float(np.mean([all(ok) for ok in rows])),
        "per_head": {k: float(np.mean(v)) for k, v in hits.items() if v},
        "n": len(images),
    }
    if per_image:
        out["per_image_hits"] = [sum(ok) for ok in rows]
        out["per_image_checks"] = [len(ok) for ok in rows]
    return out


def judge_accuracy(images: torch.Tensor, attributes: list[dict[str, Any]], judge: Judge | None = None) -> float:
    """Attribute accuracy in [0, 1]: stated attributes the judge finds in ``images`` (B, 3, H, W) in [0, 1]."""
    return judge_scores(images, attributes, judge)["attribute_accuracy"]


@torch.no_grad()
def judge_features(images: torch.Tensor, judge: Judge | None = None, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features (B, 128) of images (B, 3, H, W) in [0, 1], for judge-FID."""
    judge = judge or load_judge()
    return torch.cat([judge.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def judge_fid(images: torch.Tensor, reference: torch.Tensor, judge: Judge | None = None) -> float:
    """Fréchet distance between judge features of ``images`` and of ``reference`` (both (N, 3, H, W) in [0, 1])."""
    from ppcl.evaluate.fid import frechet_distance

    a = judge_features(images, judge).double().numpy()
    b = judge_features(reference, judge).double().numpy()
    if len(a) < 2 or len(b) < 2:
        raise PPCLError("judge-FID needs at least 2 images per set")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def accuracy_difference_se(hits_a: np.ndarray, hits_b: np.ndarray, checks: np.ndarray) -> float:
    """Standard error of ``accuracy(a) - accuracy(b)``, the attribute accuracies (micro averages) of two models on
    the same images' captions: ``hits_a[i]``, ``hits_b[i]`` correct checks of image i, ``checks[i]`` its stated
    attributes (the same for both: same caption).

    The difference is the ratio ``sum(z) / sum(checks)`` with ``z = hits_a - hits_b``; its linearised (delta-method)
    variance over images is ``n / (n - 1) * sum((z - d * checks)^2) / sum(checks)^2``. Paired: a caption both
    models get wrong adds nothing, so this is much smaller than either accuracy's own spread."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (hits_a, hits_b, checks))
    if not (len(a) == len(b) == len(c)) or len(a) < 2:
        raise PPCLError(f"accuracy_difference_se: needs paired per-image counts of the same length >= 2, got "
                        f"{len(a)}, {len(b)}, {len(c)}")
    if c.sum() <= 0 or (a > c).any() or (b > c).any() or (a < 0).any() or (b < 0).any():
        raise PPCLError("accuracy_difference_se: hits must lie in 0..checks and some image must state an attribute")
    z = a - b
    d = z.sum() / c.sum()
    n = len(z)
    return float(np.sqrt(n / (n - 1) * ((z - d * c) ** 2).sum()) / c.sum())


def fid_difference_se(a: np.ndarray, b: np.ndarray, ref: np.ndarray, n_boot: int = 100, seed: int = 0) -> float:
    """Standard error of ``FID(a, ref) - FID(b, ref)`` by a paired bootstrap over samples.

    ``a``, ``b``, ``ref``: feature rows (N, D) of two models' images and of the reference, row i of each for the same
    caption and seed (the benchmark's evaluation set). Each of ``n_boot`` resamples draws N sample indices with
    replacement and uses them in all three sets, so the caption mix is shared and the SE is of the difference itself
    (much smaller than either FID's own spread). Fréchet distances via the eigenvalues of ``S1 S2`` (real and
    non-negative for covariances; the trace of its square root is the sum of their roots)."""
    if not (len(a) == len(b) == len(ref)) or len(a) < 2:
        raise PPCLError(f"fid_difference_se: needs paired feature sets of the same length >= 2, got {len(a)}, "
                        f"{len(b)}, {len(ref)}")
    rng = np.random.default_rng(seed)

    def fd(x: np.ndarray, y: np.ndarray) -> float:
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        try:  # S1 = L L^T: the eigenvalues of S1 S2 are those of the symmetric L^T S2 L (eigvalsh: faster)
            chol = np.linalg.cholesky(s1)
            ev = np.linalg.eigvalsh(chol.T @ s2 @ chol)
        except np.linalg.LinAlgError:  # singular S1 (fewer samples than features)
            ev = np.linalg.eigvals(s1 @ s2).real
        tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
        return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)

    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(a), len(a))
        diffs.append(fd(a[i], ref[i]) - fd(b[i], ref[i]))
    return float(np.std(diffs, ddof=1))


def synth_batch(n: int, seed: int, size: int = INPUT_SIZE, start: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Real synth images (n, 3, size, size) in [0, 1] and their attributes."""
    arr, _, attrs = synth.synth_arrays(n, size=size, seed=seed, start=start)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0, attrs


# ---------------------------------------------------------------- training
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (random 3x3 box/identity mix), colour jitter of +-4%, gaussian noise: what a VAE decode does."""
    b = x.shape[0]
    k = torch.ones(3, 1, 3, 3) / 9
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    w = torch.rand(b, 1, 1, 1, generator=g) * 0.8
    x = (1 - w) * x + w * blurred
    x = x * (1 + (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 0.08)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.05
    return x.clamp(0, 1)


def train(out: Path, seed: int = 0, n_train: int = 24000, steps: int = 1200, batch: int = 64, lr: float = 2e-3) -> dict:
    torch.manual_seed(seed)
    t0 = time.time()
    half = n_train // 2
    x32, a32 = synth_batch(half, seed, 32)
    x64, a64 = synth_batch(n_train - half, seed, 64, start=half)
    x = torch.cat([x32, Judge.prepare(x64) * 0.5 + 0.5])  # 64 px rendered, resized the judge's way
    attrs = a32 + a64
    y = {k: torch.tensor([labels(a)[k] for a in attrs]) for k in HEADS}
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    judge.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        logits = judge(_augment(x[idx], g))
        loss = sum(F.cross_entropy(logits[k], y[k][idx], ignore_index=-1) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"[{time.time() - t0:6.1f}s] judge step {step} loss {loss.item():.4f}", flush=True)
    judge.eval().requires_grad_(False)
    train_seconds = time.time() - t0
    held = {}
    for size in (32, 64):
        xh, ah = synth_batch(2000, HELD_OUT_SEED, size)
        held[f"{size}px"] = judge_scores(xh, ah, judge)
        print(f"held-out {size}px: {held[f'{size}px']}", flush=True)
    from safetensors.torch import save_file

    from ppcl.atomic import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "judge.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(tmp))
    record = {
        "version": 1,
        "seed": seed,
        "settings": {"n_train": n_train, "train_sizes": [32, 64], "steps": steps, "batch": batch, "lr": lr,
                     "optimizer": "AdamW wd 1e-4, one-cycle", "augment": "blur, colour jitter 4%, noise <= 0.05"},
        "train_seconds": train_seconds,
        "held_out": {"seed": HELD_OUT_SEED, "n": 2000, **held},
        "command": f"python -m ppcl.bench.judge --out DIR --seed {seed}",
    }
    write_json(out / "judge.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="train the reference judge")
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = train(args.out, seed=args.seed, steps=args.steps)
    print(json.dumps(record["held_out"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
