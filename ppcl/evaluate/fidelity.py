"""Fidelity to the teacher: same prompt, same seed, how close are the final latents and the images.

Needs no reference set. Accumulated batch by batch (sums only), so memory does not grow with the number of
samples. PSNR is computed from the MSE pooled over all samples ("global PSNR"): one well-defined number that
is infinite only when every sample is identical; metrics.json stores infinity as ``null`` with
``identical: true`` (see :mod:`ppcl.evaluate.metrics`).
"""

from __future__ import annotations

import math

import torch

from ppcl.evaluate.metrics import Fidelity


def psnr_db(mse: float, peak: float) -> float:
    """``10 log10(peak^2 / mse)``; +inf for mse == 0."""
    if mse <= 0.0:
        return math.inf
    if peak <= 0.0:
        return -math.inf
    return 10.0 * math.log10(peak * peak / mse)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class FidelityAccumulator:
    """Streams (teacher, model) pairs of final latents (B, ...) and images (B, 3, H, W) in [0, 1].

    Latent PSNR peak R: the teacher latents' range (max - min) over all samples seen. Images are compared after
    8-bit quantisation (what a user sees in a saved PNG), so the image peak is 1.
    """

    def __init__(self):
        self.n = 0
        self.identical = True
        self.latent_sq_err = 0.0
        self.latent_elems = 0
        self.latent_min = math.inf
        self.latent_max = -math.inf
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.image_sq_err = 0.0
        self.image_elems = 0

    @torch.no_grad()
    def update(self, teacher_latents: torch.Tensor, latents: torch.Tensor,
               teacher_images: torch.Tensor | None = None, images: torch.Tensor | None = None) -> None:
        if teacher_latents.shape != latents.shape:
            raise ValueError(f"latent shapes differ: teacher {tuple(teacher_latents.shape)} vs {tuple(latents.shape)}")
        t = teacher_latents.detach().reshape(teacher_latents.shape[0], -1).double().cpu()
        m = latents.detach().reshape(latents.shape[0], -1).double().cpu()
        self.identical &= bool(torch.equal(teacher_latents.cpu(), latents.cpu()))
        self.latent_sq_err += float((t - m).square().sum())
        self.latent_elems += t.numel()
        self.latent_min = min(self.latent_min, float(t.min()))
        self.latent_max = max(self.latent_max, float(t.max()))
        cos = torch.nn.functional.cosine_similarity(t, m, dim=1, eps=1e-12)
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.n += t.shape[0]
        if teacher_images is not None and images is not None:
            a = quantize(teacher_images).double()
            b = quantize(images).double()
            self.image_sq_err += float((a - b).square().sum())
            self.image_elems += a.numel()

    def result(self) -> Fidelity:
        if self.n == 0:
            raise ValueError("no samples")
        latent_mse = self.latent_sq_err / self.latent_elems
        latent_psnr = psnr_db(latent_mse, self.latent_max - self.latent_min)
        image_psnr = psnr_db(self.image_sq_err / self.image_elems, 1.0) if self.image_elems else math.nan
        return Fidelity(
            latent_psnr_db=_finite_or_none(latent_psnr),
            latent_cosine=min(1.0, self.cos_sum / self.n),
            latent_cosine_min=min(1.0, self.cos_min),
            image_psnr_db=_finite_or_none(image_psnr) if self.image_elems else None,
            identical=self.identical,
            samples=self.n,
        )


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> the same values after 8-bit rounding (as saved), float32 on CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().cpu() / 255.0


def fidelity(teacher_latents: torch.Tensor, latents: torch.Tensor, teacher_images: torch.Tensor | None = None,
             images: torch.Tensor | None = None) -> Fidelity:
    """One-shot :class:`FidelityAccumulator` over one set of samples."""
    acc = FidelityAccumulator()
    acc.update(teacher_latents, latents, teacher_images, images)
    return acc.result()
