"""FID: Fréchet distance between Gaussian fits of image features, accumulated batch by batch.

Pieces:
- :func:`frechet_distance`: our own float64 implementation (scipy ``sqrtm``), the number we report.
- :func:`load_extractor`: the feature network from a spec string, with an identity (name + sha256 of its
  weights) that metrics.json records so numbers are never compared across extractors.
- :class:`FIDAccumulator`: torchmetrics' ``FrechetInceptionDistance`` holds the streaming sums (sum of
  features and of their outer products, in float64), so memory does not grow with the number of images; the
  distance is computed from those sums with :func:`frechet_distance`.
- :func:`reference_statistics`: the reference set's statistics, cached to a file keyed by the set's checksum,
  the extractor's identity and the image size.

Preprocessing choice (method.md is silent): generated images reach the extractor as float (B, 3, H, W) in
[0, 1] at the generation resolution; reference images are centre-cropped to the generation aspect ratio and
resized (bicubic, PIL) to the same H x W, so both sets see the same pipeline. Extractors resize internally
(Inception to 299, CLIP to its crop size).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ppcl.errors import PPCLError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------- the distance
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Args:
        mu1, mu2: means, shape (D,).
        sigma1, sigma2: covariances, shape (D, D).
        eps: diagonal offset added when the product is singular and sqrtm fails (as pytorch-fid does).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Rank-deficient covariances (fewer images than features) are common and handled just below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # sqrtm of a product of PSD matrices is real in exact arithmetic; drop round-off imaginary parts.
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def gaussian_from_sums(feature_sum, cov_sum, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) from streamed sums: sum x, sum x x^T, count."""
    if n < 2:
        raise PPCLError(f"FID needs at least 2 images per set, got {n}")
    s = np.asarray(feature_sum, np.float64)
    mu = s / n
    cov = (np.asarray(cov_sum, np.float64) - n * np.outer(mu, mu)) / (n - 1)
    return mu, cov


# ---------------------------------------------------------------- extractors
@dataclass
class FeatureExtractor:
    """A feature network for FID and its identity.

    ``module`` is an nn.Module taking float (B, 3, H, W) in [0, 1] and returning (B, num_features); or None for
    the standard Inception, which torchmetrics builds itself from ``inception_weights`` (needs torch-fidelity).
    """

    name: str
    sha256: str
    module: nn.Module | None = None
    inception_weights: str | None = None
    num_features: int | None = None


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's tensors (sorted names, dtype, shape, bytes): identifies the weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings as FID features ("FD-CLIP", Kynkäänniemi et al. 2023).

    Preprocessing in torch, matching CLIPImageProcessor: resize the short side to the crop size (bicubic,
    antialiased), centre crop, normalise with the processor's mean and std.
    """

    def __init__(self, model, processor):
        super().__init__()
        self.model = model.eval()
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        self.crop = int(crop.get("height", model.config.vision_config.image_size))
        self.register_buffer("mean", torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(model.config.projection_dim)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        h, w = x.shape[-2:]
        scale = self.crop / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        x = nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        dtype = next(self.model.parameters()).dtype
        from ppcl.evaluate.clip import image_embeddings

        return image_embeddings(self.model, x.to(dtype)).float()


def load_extractor(spec: str | None, clip: tuple | None = None, clip_name: str | None = None) -> FeatureExtractor:
    """The FID feature extractor named by ``spec``.

    Specs:
      - ``clip``: the CLIP given for CLIP score (``clip`` = (model, processor)), image embeddings (FD-CLIP).
      - ``inception:PATH``: the standard FID Inception-v3 (torch-fidelity's ``pt_inception-2015-12-05`` weights
        at PATH), 2048 pool features; needs torch-fidelity importable.
      - ``pkg.module:factory``: ``factory()`` returns an nn.Module taking float (B, 3, H, W) in [0, 1] and
        returning (B, D); it should have ``num_features`` (else torchmetrics infers it from a dummy image).
    Raises PPCLError for anything unusable, before any work is done.
    """
    if not spec:
        raise PPCLError("FID needs a feature extractor: pass --fid-features (clip, inception:PATH or pkg.mod:factory)")
    if spec == "clip":
        if clip is None:
            raise PPCLError("--fid-features clip needs a CLIP model: pass --clip PATH")
        module = ClipImageFeatures(*clip)
        return FeatureExtractor(f"clip-image:{clip_name}", state_dict_sha256(module.model), module,
                                num_features=module.num_features)
    if spec.startswith("inception:"):
        path = Path(spec.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise PPCLError(f"Inception weights not found: {path}")
        # torchmetrics' Inception FID runs on torch-fidelity: ask for the package, not for torchmetrics' private flag
        if importlib.util.find_spec("torch_fidelity") is None:
            raise PPCLError("--fid-features inception:PATH needs torch-fidelity, which cannot be imported here; "
                            "name a feature module instead (pkg.mod:factory or clip)")
        return FeatureExtractor("inception-v3-compat-2048", file_sha256(path), None, str(path), 2048)
    if spec.count(":") == 1:
        mod_name, factory_name = spec.split(":")
        try:
            factory = getattr(importlib.import_module(mod_name), factory_name)
        except (ImportError, AttributeError) as e:
            raise PPCLError(f"cannot import FID feature factory '{spec}': {e}") from None
        module = factory()
        if not isinstance(module, nn.Module):
            raise PPCLError(f"FID feature factory '{spec}' returned {type(module).__name__}, not an nn.Module")
        nf = getattr(module, "num_features", None)
        return FeatureExtractor(spec, state_dict_sha256(module), module.eval(), num_features=nf)
    raise PPCLError(f"unknown --fid-features '{spec}': expected clip, inception:PATH or pkg.module:factory")


# ---------------------------------------------------------------- streaming FID
class FIDAccumulator:
    """Streaming FID against fixed reference statistics.

    Reference ("real") sums persist across :meth:`reset_generated`, so one accumulator serves the teacher and
    every model in turn. Memory is O(D^2) whatever the number of images.
    """

    def __init__(self, extractor: FeatureExtractor, device: str | torch.device = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.extractor = extractor
        if extractor.module is not None:
            self.metric = FrechetInceptionDistance(feature=extractor.module, normalize=True,
                                                   reset_real_features=False)
        else:
            self.metric = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                                   feature_extractor_weights_path=extractor.inception_weights)
        self.metric = self.metric.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add float images (B, 3, H, W) in [0, 1]."""
        self.metric.update(images.to(self.device, torch.float32), real=real)

    def reference_sums(self) -> dict[str, np.ndarray]:
        m = self.metric
        return {"sum": m.real_features_sum.cpu().numpy(), "cov_sum": m.real_features_cov_sum.cpu().numpy(),
                "n": np.asarray(int(m.real_features_num_samples))}

    def load_reference_sums(self, sums: dict[str, np.ndarray]) -> None:
        m = self.metric
        m.real_features_sum = torch.as_tensor(sums["sum"], dtype=torch.float64, device=self.device)
        m.real_features_cov_sum = torch.as_tensor(sums["cov_sum"], dtype=torch.float64, device=self.device)
        m.real_features_num_samples = torch.as_tensor(int(sums["n"]), dtype=torch.long, device=self.device)

    def reset_generated(self) -> None:
        self.metric.reset()

    def compute(self) -> float:
        """FID (ours, float64 scipy) between the reference and the generated images added since the last reset."""
        m = self.metric
        mu_r, cov_r = gaussian_from_sums(m.real_features_sum.cpu(), m.real_features_cov_sum.cpu(),
                                         int(m.real_features_num_samples))
        mu_g, cov_g = gaussian_from_sums(m.fake_features_sum.cpu(), m.fake_features_cov_sum.cpu(),
                                         int(m.fake_features_num_samples))
        return frechet_distance(mu_r, cov_r, mu_g, cov_g)


# ---------------------------------------------------------------- reference set
def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted; PPCLError if the folder is missing or has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PPCLError(f"reference image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PPCLError(f"reference folder has no images ({', '.join(IMAGE_SUFFIXES)}): {folder}")
    return files


def reference_checksum(folder: str | Path, files: list[Path] | None = None) -> str:
    """sha256 over the sorted relative paths and contents of the reference images."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in files if files is not None else list_images(folder):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """One image as float (3, height, width) in [0, 1]: RGB, centre crop to the aspect ratio, bicubic resize."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError as e:
        raise PPCLError(f"unreadable reference image {path}: {e}") from None
    w0, h0 = im.size
    target = width / height
    if w0 / h0 > target:
        cw = round(h0 * target)
        box = ((w0 - cw) // 2, 0, (w0 - cw) // 2 + cw, h0)
    else:
        ch = round(w0 / target)
        box = (0, (h0 - ch) // 2, w0, (h0 - ch) // 2 + ch)
    im = im.resize((width, height), Image.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def iter_image_batches(files: list[Path], height: int, width: int, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(files), batch_size):
        yield torch.stack([load_image(p, height, width) for p in files[i : i + batch_size]])


def default_cache_dir() -> Path:
    root = os.environ.get("PPCL_CACHE_DIR")
    return Path(root) / "fid" if root else Path.home() / ".cache" / "ppcl" / "fid"


@dataclass
class ReferenceStats:
    sha256: str
    num_images: int
    cached: bool
    cache_file: Path


def reference_statistics(acc: FIDAccumulator, folder: str | Path, height: int, width: int, *, batch_size: int = 16,
                         cache_dir: str | Path | None = None, progress: bool = True) -> ReferenceStats:
    """Fill ``acc``'s reference sums from ``folder``, reading or writing the statistics cache.

    Cache file ``<cache_dir>/<set sha256[:16]>-<extractor sha256[:16]>-<H>x<W>.npz`` holds the float64 sums and the
    full keys, which are checked on read (a mismatch or unreadable file is recomputed and overwritten).
    """
    from ppcl.progress import progress as tqdm

    from ppcl.atomic import atomic_path

    files = list_images(folder)
    sha = reference_checksum(folder, files)
    ex = acc.extractor
    key = {"reference_sha256": sha, "extractor": ex.name, "extractor_sha256": ex.sha256, "height": height,
           "width": width, "num_images": len(files)}
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = cache_dir / f"{sha[:16]}-{ex.sha256[:16]}-{height}x{width}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                if json.loads(str(z["key"])) == key:
                    acc.load_reference_sums({"sum": z["sum"], "cov_sum": z["cov_sum"], "n": z["n"]})
                    return ReferenceStats(sha, len(files), True, cache_file)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is recomputed below
    for batch in tqdm(iter_image_batches(files, height, width, batch_size), total=-(-len(files) // batch_size),
                      desc="reference images", unit="batch", disable=not progress):
        acc.update(batch, real=True)
    sums = acc.reference_sums()
    with atomic_path(cache_file) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.asarray(json.dumps(key)), **sums)
    return ReferenceStats(sha, len(files), False, cache_file)
