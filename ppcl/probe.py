"""The streaming similarity probe (method.md section 1): which contiguous runs of blocks are redundant?

One stock teacher forward per (calibration batch, timestep) with hooks on every block; statistics are
accumulated on the fly, never activations, so memory does not grow with the number of samples.

States. ``h_0`` is what block 0 receives and ``h_{l+1}`` what block ``l`` returns, per stream (``"image"``,
``"text"``; SD3's last block returns no text). Rows are tokens: a ``(B, N, D)`` stream tensor gives ``B * N`` rows
of ``D`` features. Every token the block processes counts, text padding included (the blocks process it too).

Quantities, per block and stream:

- ``cka``: linear CKA(h_l, h_{l+1}) in the feature-space form
  ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` from streamed moments.
- ``r2`` / ``probe_cka``: a ridge least-squares probe ``h_{l+1} ~ h_l + W h_l + b`` solved once at the end from the
  accumulated normal equations. With centred moments ``Sxx = Xc^T Xc``, ``Sxy = Xc^T Yc``, ``Syy = Yc^T Yc``:
  ``A = I + (Sxx + lam I)^{-1} (Sxy - Sxx)`` (ridge shrinks towards the identity, i.e. towards "skip the block";
  the bias is not penalised), ``lam = ridge * tr(Sxx) / D``. Then without any stored activation
  ``SSE = tr(Syy) - 2 tr(A^T Sxy) + tr(A^T Sxx A)``, ``R^2 = 1 - SSE / tr(Syy)`` (pooled over features) and
  ``CKA(Xc A, Yc) = ||Syx A||_F^2 / (||A^T Sxx A||_F ||Syy||_F)``.
- ``cosine``: mean over tokens of cos(h_l, h_{l+1}) (ShortGPT's block influence is ``1 - cosine``).
- ``trend``: ``d_l = c_{l+1} - c_l`` (None for the last block).

Interval probes: the same probe fitted from ``h_s`` to ``h_{e+1}`` for every interval ``[s, e]`` with ``s < e``
inside one kind and at most ``max_interval`` blocks long (default 12). Design choice: the cost is bounded by
length rather than by "candidates selection needs", because selection runs later without the model; 12 covers
the released Qwen-Image plan (longest interval 10 blocks) and keeps the per-state window of cross moments small.

Moments are accumulated in float64: each batch's product ``Xc^T Yc`` is computed on batch-centred rows in the
compute dtype (float32: a fast matmul, and centring first avoids cancellation), then added to float64 raw sums
``S += Xc^T Yc + n_b m_x m_y^T``; the global centring ``S - n mu_x mu_y^T`` happens once in float64 at the end.
This is exact streaming: the result does not depend on how rows are split into batches.

Exact vs projected (``probe_dim``). Exact moments cost, per stream, ``(L + 1) + sum of window sizes`` matrices of
``D x D`` doubles: for Qwen-Image (60 blocks, D = 3072, windows of 12) that is ~800 x 75 MB per stream, far too
big. With ``probe_dim = k < D`` every state is multiplied by one fixed seeded Gaussian matrix ``P`` (``D x k``,
entries N(0, 1/k); Johnson-Lindenstrauss) before its moments are taken, and ``cka``, ``r2``, ``probe_cka`` and the
interval scores are those of the projected states (the probe becomes a ``k x k`` map between projections). The
default ``"auto"`` is exact whenever the moments fit in ``max_moment_bytes`` (4 GiB) and otherwise the largest
multiple of 64 that fits. Cosines, angular distances and the CKA matrix always use the full width.

CKA matrix between block outputs (``L x L`` per stream): the minibatch unbiased-HSIC estimator of Nguyen,
Raghu & Kornblith (2021), with a linear kernel on ``hsic_tokens`` (default 256) tokens sampled per forward (the
same tokens for every block). Why: it needs ``O(L m^2)`` memory per forward and nothing of size ``D^2``, so the
full matrix costs the same for D = 32 or 3072, and because each minibatch's HSIC_1 (Song et al. 2012) is
unbiased, averaging over forwards converges to the population value instead of depending on the minibatch
size. ``CKA_ij = mean HSIC(K_i, K_j) / sqrt(mean HSIC(K_i, K_i) mean HSIC(K_j, K_j))``.

Angular distances (for the "Unreasonable Ineffectiveness of the Deeper Layers" baseline): an ``(L+1) x (L+1)``
matrix of mean token ``arccos(cos(h_i, h_j)) / pi`` per stream (and of mean cosines), accumulated per forward
from the unit-normalised states of that forward, for the pairs ``|i - j| <= max_interval`` (the others are
None). Design choice: a mean of arccos over tokens has no streaming form, so every pair needs both states at
once; keeping all ``L + 1`` full-width states of a forward costs memory linear in the depth (12.9 GiB for
Qwen-Image at batch 4), while the window covers every interval up to ``max_interval + 1`` blocks, longer than
any interval the ppcl selector can score. Models with ``L <= max_interval`` get the full matrix, as before.

Memory per forward (flat in the number of blocks). Each block's statistics are updated inside its hook and its
state is dropped there, except for a window: the ``max_interval`` most recent centred (projected) states for
the interval cross moments and unit states for the angular window, plus one ``m x m`` HSIC Gram per block
(``m = hsic_tokens``: 0.5 MiB each at 256, independent of width and tokens). Only those Grams grow with depth.

Device and precision. The teacher may run in bfloat16 on a GPU (``ProbeSettings.device``/``dtype``; ``auto`` is
CUDA + bfloat16 where a GPU is present, else CPU + float32): each captured state is cast to float32 before any
statistic, and the moments, cosines and HSIC accumulate in float64 as above, so only the teacher's forward
runs in the low precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ppcl.errors import PPCLError

# probe.json's schema lives in ppcl.probe_result, below this module and ppcl.plots (which draws a result); its
# reader and version are re-exported here because readers of probe.json know them as ppcl.probe's
from ppcl.probe_result import PROBE_VERSION, load_probe  # noqa: F401
from ppcl.probe_result import BlockProbe, Calibration, CKAMatrix, IntervalProbe, ProbeResult, Projection, StreamStats

STREAMS: tuple[str, ...] = ("image", "text")
HSIC_ESTIMATOR = "minibatch_unbiased_hsic_linear"
DEFAULT_MAX_INTERVAL = 12
DEFAULT_MAX_MOMENT_BYTES = 4 * 2**30


# ------------------------------------------------------------------------------------- reference formulas
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """All-at-once linear CKA of rows ``x`` ``(n, Dx)`` and ``y`` ``(n, Dy)`` (float64, feature-space form)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = (y.T @ x).square().sum()
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(num / den)


def cka_from_moments(sxx: torch.Tensor, syy: torch.Tensor, syx: torch.Tensor) -> float | None:
    """Linear CKA from centred moments ``Xc^T Xc``, ``Yc^T Yc``, ``Yc^T Xc``."""
    den = torch.linalg.matrix_norm(sxx) * torch.linalg.matrix_norm(syy)
    if not float(den) > 0:
        return None
    return float(syx.square().sum() / den)


def residual_probe(
    sxx: torch.Tensor, syy: torch.Tensor, syx: torch.Tensor, ridge: float
) -> tuple[float | None, float | None]:
    """``(R^2, CKA(prediction, target))`` of the ridge probe ``y ~ x + W x + b`` from centred moments.

    Args:
        sxx, syy, syx: ``(D, D)`` float64 centred moments ``Xc^T Xc``, ``Yc^T Yc``, ``Yc^T Xc``.
        ridge: relative ridge; the penalty on ``W`` is ``ridge * tr(Sxx) / D``.
    """
    d = sxx.shape[0]
    tyy = float(torch.trace(syy))
    if not tyy > 0:
        return None, None
    sxy = syx.T
    lam = ridge * max(float(torch.trace(sxx)) / d, 1e-30)
    eye = torch.eye(d, dtype=sxx.dtype, device=sxx.device)
    try:
        b = torch.linalg.solve(sxx + lam * eye, sxy - sxx)
    except RuntimeError:  # numerically singular despite the ridge: least-squares solution instead
        b = torch.linalg.lstsq(sxx + lam * eye, sxy - sxx).solution
    a = eye + b
    sxx_a = sxx @ a
    sse = tyy - 2 * float((a * sxy).sum()) + float((a * sxx_a).sum())
    r2 = 1.0 - sse / tyy
    pred_gram = a.T @ sxx_a
    return r2, cka_from_moments(pred_gram, syy, syx @ a)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def stratified_sigmas(k: int) -> torch.Tensor:
    """``k`` noise levels before the scheduler shift: the midpoints of ``k`` equal-probability strata of
    uniform(0, 1), i.e. ``(i + 0.5) / k``; deterministic, so every calibration sample sees the same levels."""
    if k < 1:
        raise PPCLError(f"--timesteps must be >= 1 (got {k})")
    return (torch.arange(k, dtype=torch.float64) + 0.5) / k


def moment_bytes(num_blocks: int, kinds: list[str], dim: int, max_interval: int, streams: int = 2) -> int:
    """Float64 bytes of the exact moment matrices for a model: Grams of the ``L+1`` states plus, per state, the
    cross moments with its same-kind predecessors up to ``max_interval`` back."""
    mats = 0
    for t in range(num_blocks + 1):
        mats += 1 + len(_window(t, kinds, max_interval))
    return mats * dim * dim * 8 * streams


def _window(t: int, kinds: list[str], max_interval: int) -> list[int]:
    """States ``s < t`` whose cross moment with state ``t`` some probe needs: ``t - 1`` (the block probe of block
    ``t - 1``) and the starts ``s`` of intervals ``[s, t - 1]`` within one kind and at most ``max_interval`` long."""
    if t == 0:
        return []
    e = t - 1
    out = [e]
    s = e - 1
    while s >= 0 and e - s + 1 <= max_interval and kinds[s] == kinds[e]:
        out.append(s)
        s -= 1
    return sorted(out)


def choose_probe_dim(model_dim: int, num_blocks: int, kinds: list[str], max_interval: int,
                     probe_dim: int | str | None, max_moment_bytes: int = DEFAULT_MAX_MOMENT_BYTES) -> int:
    """The feature width the moments live in (see the module docstring): ``probe_dim`` ``None``/``0`` = exact,
    an int = that width (capped at the model width), ``"auto"`` = exact if it fits ``max_moment_bytes``."""
    if probe_dim in (None, 0, "0", "exact"):
        return model_dim
    if probe_dim == "auto":
        if moment_bytes(num_blocks, kinds, model_dim, max_interval) <= max_moment_bytes:
            return model_dim
        # moment_bytes is proportional to k^2: start from the exact root, rounded down to a multiple of 64, and
        # step down in 64s only to absorb rounding (64 is the floor even where it does not fit)
        per_unit = moment_bytes(num_blocks, kinds, 1, max_interval)
        k = max(64, math.isqrt(max_moment_bytes // per_unit) // 64 * 64)
        while k > 64 and moment_bytes(num_blocks, kinds, k, max_interval) > max_moment_bytes:
            k -= 64
        return min(k, model_dim)
    try:
        k = int(probe_dim)
    except (TypeError, ValueError):
        raise PPCLError(f"--probe-dim must be 'auto', 0 (exact) or a positive width (got {probe_dim!r})") from None
    if k < 0:
        raise PPCLError(f"--probe-dim must be 'auto', 0 (exact) or a positive width (got {k})")
    return min(k, model_dim) if k else model_dim


# ------------------------------------------------------------------------------------------ accumulator
class _StreamBank:
    """Streaming moments of one stream over the states ``h_0..h_L``, in a ``k``-dim (maybe projected) space."""

    def __init__(self, num_states: int, windows: list[list[int]], k: int, device, hsic_states: int):
        f64 = dict(dtype=torch.float64, device=device)
        self.k = k
        self.windows = windows
        self.n = [0] * num_states
        self.sum = [torch.zeros(k, **f64) for _ in range(num_states)]
        self.gram = [torch.zeros(k, k, **f64) for _ in range(num_states)]
        # cross[t][j] = raw sum of X_t^T X_s for s = windows[t][j]
        self.cross = [[torch.zeros(k, k, **f64) for _ in w] for w in windows]
        self.cos_sum = torch.zeros(num_states, num_states, **f64)
        self.ang_sum = torch.zeros(num_states, num_states, **f64)
        self.cos_n = torch.zeros(num_states, num_states, **f64)
        self.hsic_sum = torch.zeros(hsic_states, hsic_states, **f64)
        self.hsic_n = torch.zeros(hsic_states, hsic_states, **f64)


class ProbeAccumulator:
    """Accumulates the probe statistics over stock teacher forwards; :meth:`result` solves and reports.

    Memory is fixed at construction (moment matrices), plus per forward a window of that forward's states
    (``max_interval`` centred projected states and unit-normalised full states for cosines) and one ``m x m``
    HSIC Gram per block: nothing grows with the number of forwards, and no full-width state with the depth.
    """

    def __init__(
        self,
        adapter,
        *,
        probe_dim: int | str | None = "auto",
        max_interval: int = DEFAULT_MAX_INTERVAL,
        ridge: float = 1e-4,
        hsic_tokens: int = 256,
        seed: int = 0,
        compute_dtype: torch.dtype = torch.float32,
        max_moment_bytes: int = DEFAULT_MAX_MOMENT_BYTES,
    ):
        if max_interval < 2:
            raise PPCLError(f"--max-interval must be >= 2 (got {max_interval})")
        if ridge < 0:
            raise PPCLError(f"--ridge must be >= 0 (got {ridge})")
        if hsic_tokens < 4:
            raise PPCLError(f"--hsic-tokens must be >= 4 (the unbiased HSIC needs 4 tokens; got {hsic_tokens})")
        self.adapter = adapter
        self.infos = adapter.blocks()
        self.L = len(self.infos)
        if self.L < 2:
            raise PPCLError(f"the model has {self.L} transformer blocks: the probe needs at least 2")
        self.kinds = [b.kind for b in self.infos]
        param = next(adapter.transformer.parameters())
        self.device = param.device
        self.model_dim = int(getattr(adapter.transformer, "inner_dim", 0) or 0)
        self.max_interval = max_interval
        self.ridge = ridge
        self.hsic_tokens = hsic_tokens
        self.seed = seed
        self.compute_dtype = compute_dtype
        self.max_moment_bytes = max_moment_bytes
        self._probe_dim_arg = probe_dim
        self.windows = [_window(t, self.kinds, max_interval) for t in range(self.L + 1)]
        self.banks: dict[str, _StreamBank] = {}
        self.proj: torch.Tensor | None = None
        self.k: int | None = None
        self.forwards = 0
        self._gen = torch.Generator().manual_seed(seed + 1)

    # -- lazy set-up on the first state, when the width is known
    def _setup(self, dim: int) -> None:
        if self.k is not None:
            return
        self.model_dim = dim
        self.k = choose_probe_dim(dim, self.L, self.kinds, self.max_interval, self._probe_dim_arg,
                                  self.max_moment_bytes)
        if self.k < dim:
            g = torch.Generator().manual_seed(self.seed)
            self.proj = (torch.randn(dim, self.k, generator=g, dtype=torch.float64) / math.sqrt(self.k)).to(
                self.device, self.compute_dtype)

    def _bank(self, stream: str) -> _StreamBank:
        if stream not in self.banks:
            self.banks[stream] = _StreamBank(self.L + 1, self.windows, self.k, self.device, self.L)
        return self.banks[stream]

    # -- one forward
    @torch.no_grad()
    def observe(self, model_inputs: dict[str, Any]) -> None:
        """Run one stock teacher forward on ``model_inputs`` and fold its block states into the statistics."""
        # per stream, per forward: centred projected states of the window, batch means, unit states, HSIC rows
        fwd: dict[str, dict[str, Any]] = {}

        def add_state(stream: str, t: int, h: torch.Tensor) -> None:
            rows = h.detach().reshape(-1, h.shape[-1]).to(self.compute_dtype)
            self._setup(rows.shape[1])
            bank = self._bank(stream)
            st = fwd.setdefault(stream, {"xc": {}, "mean": {}, "unit": {}, "hsic": {}, "idx": None})
            z = rows @ self.proj if self.proj is not None else rows
            mean = z.double().mean(0)
            xc = z - mean.to(z.dtype)
            n = rows.shape[0]
            window = self.windows[t]
            others = [st["xc"][s] for s in window if s in st["xc"]]
            # One matmul for the Gram and every cross moment this state needs.
            prod = (xc.T @ torch.cat([xc, *others], dim=1)).double() if others else (xc.T @ xc).double()
            bank.n[t] += n
            bank.sum[t] += n * mean
            bank.gram[t] += prod[:, : self.k] + n * torch.outer(mean, mean)
            j = 1
            for wi, s in enumerate(window):
                if s not in st["xc"]:
                    continue
                ms = st["mean"][s]
                bank.cross[t][wi] += prod[:, j * self.k:(j + 1) * self.k] + n * torch.outer(mean, ms)
                j += 1
            st["mean"][t] = mean
            st["xc"][t] = xc
            # Drop states no later state's window reaches (keeps per-forward memory at the window size).
            keep_from = t + 1 - self.max_interval
            for s in [s for s in st["xc"] if s < keep_from]:
                del st["xc"][s]
            # Cosines / angular distances against the earlier states of this forward at most max_interval back
            # (full width). Only that window of unit states is kept, so the states held per forward do not
            # grow with the number of blocks (see "Memory" in the module docstring).
            unit = torch.nn.functional.normalize(rows.float(), dim=1, eps=1e-12)
            for s, u in st["unit"].items():
                c = (unit * u).sum(1).clamp(-1, 1).double()
                bank.cos_sum[t, s] += c.sum()
                bank.ang_sum[t, s] += (torch.arccos(c) / math.pi).sum()
                bank.cos_n[t, s] += c.numel()
            st["unit"][t] = unit
            for s in [s for s in st["unit"] if s < t + 1 - self.max_interval]:
                del st["unit"][s]
            # Minibatch unbiased HSIC between block outputs (states 1..L) on sampled tokens.
            if t >= 1:
                if st["idx"] is None:
                    m = min(self.hsic_tokens, n)
                    st["idx"] = torch.randperm(n, generator=self._gen)[:m].to(rows.device)
                if st["idx"].numel() >= 4:
                    x = rows[st["idx"]].double()
                    kmat = x @ x.T
                    kmat.fill_diagonal_(0)
                    st["hsic"][t - 1] = kmat

        def on_output(i, call, out):
            if i == 0:
                for stream, h in call.streams().items():
                    add_state(stream, 0, h)
            for stream, h in out.items():
                add_state(stream, i + 1, h)
            return None

        with self.adapter.hooks(on_output=on_output):
            self.adapter.forward(model_inputs)
        for stream, st in fwd.items():
            if st["hsic"]:
                self._fold_hsic(self.banks[stream], st["hsic"])
        self.forwards += 1

    @staticmethod
    def _fold_hsic(bank: _StreamBank, grams: dict[int, torch.Tensor]) -> None:
        """Add the unbiased HSIC_1 (Song et al. 2012) of every pair of this forward's zero-diagonal Grams."""
        idx = sorted(grams)
        ks = torch.stack([grams[i] for i in idx])  # (S, m, m), zero diagonals
        m = ks.shape[-1]
        flat = ks.reshape(len(idx), -1)
        tr = flat @ flat.T  # tr(K_i K_j) for symmetric K
        tot = flat.sum(1)  # 1^T K 1
        rs = ks.sum(2)  # K 1, (S, m)
        cross = rs @ rs.T  # 1^T K_i K_j 1
        hsic = (tr + torch.outer(tot, tot) / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * cross) / (m * (m - 3))
        ii = torch.tensor(idx, device=ks.device)
        bank.hsic_sum[ii[:, None], ii[None, :]] += hsic
        bank.hsic_n[ii[:, None], ii[None, :]] += 1

    # -- the end: solve and report
    def _centred(self, bank: _StreamBank, t: int, s: int | None = None) -> torch.Tensor:
        n = bank.n[t]
        mu_t = bank.sum[t] / n
        if s is None:
            return bank.gram[t] - n * torch.outer(mu_t, mu_t)
        mu_s = bank.sum[s] / n
        return bank.cross[t][self.windows[t].index(s)] - n * torch.outer(mu_t, mu_s)

    def _pair(self, stream: str, s: int, t: int) -> dict[str, float | None] | None:
        """Statistics of predicting state ``t`` from state ``s`` on ``stream`` (None where a state is missing)."""
        bank = self.banks.get(stream)
        if bank is None or bank.n[s] == 0 or bank.n[t] == 0 or bank.n[s] != bank.n[t]:
            return None
        sxx, syy, syx = self._centred(bank, s), self._centred(bank, t), self._centred(bank, t, s)
        r2, pcka = residual_probe(sxx, syy, syx, self.ridge)
        return {"cka": _clean(cka_from_moments(sxx, syy, syx)), "r2": _clean(r2), "probe_cka": _clean(pcka)}

    def result(self, *, family: str, model: str, calibration: dict[str, Any]) -> ProbeResult:
        if self.forwards == 0 or not self.banks:
            raise PPCLError("the probe saw no calibration data (0 forwards)")
        streams = [s for s in STREAMS if s in self.banks]
        per_block: list[dict[str, dict[str, float | None]]] = []
        for b in self.infos:
            row = {}
            for stream in streams:
                stats = self._pair(stream, b.index, b.index + 1)
                if stats is None:
                    continue
                bank = self.banks[stream]
                cn = float(bank.cos_n[b.index + 1, b.index])
                stats["cosine"] = float(bank.cos_sum[b.index + 1, b.index]) / cn if cn else None
                row[stream] = stats
            per_block.append(row)
        # trend per stream, d_l = c_{l+1} - c_l
        blocks: list[BlockProbe] = []
        combined_c = [_mean(v["cka"] for v in row.values()) for row in per_block]
        for b, row in zip(self.infos, per_block):
            ps = {}
            for stream, v in row.items():
                nxt = per_block[b.index + 1].get(stream) if b.index + 1 < self.L else None
                trend = None
                if nxt is not None and nxt["cka"] is not None and v["cka"] is not None:
                    trend = nxt["cka"] - v["cka"]
                ps[stream] = StreamStats(cka=v["cka"], r2=v["r2"], probe_cka=v["probe_cka"],
                                         cosine=_clean(v["cosine"]), trend=_clean(trend))
            c_next = combined_c[b.index + 1] if b.index + 1 < self.L else None
            trend = None if c_next is None or combined_c[b.index] is None else c_next - combined_c[b.index]
            blocks.append(BlockProbe(
                index=b.index, kind=b.kind, list_name=b.list_name, params=b.params, streams=list(row),
                cka=combined_c[b.index], r2=_mean(v.r2 for v in ps.values()),
                probe_cka=_mean(v.probe_cka for v in ps.values()), cosine=_mean(v.cosine for v in ps.values()),
                trend=_clean(trend), per_stream=ps,
            ))
        intervals: list[IntervalProbe] = []
        for t in range(2, self.L + 1):
            e = t - 1
            for s in self.windows[t]:
                if s >= e:
                    continue
                ps = {}
                for stream in streams:
                    stats = self._pair(stream, s, t)
                    if stats is not None:
                        ps[stream] = stats
                intervals.append(IntervalProbe(
                    start=s, end=e, r2=_mean(v["r2"] for v in ps.values()),
                    probe_cka=_mean(v["probe_cka"] for v in ps.values()),
                    cka=_mean(v["cka"] for v in ps.values()), per_stream=ps,
                ))
        intervals.sort(key=lambda iv: (iv.start, iv.end))
        matrices, angular, cosine = {}, {}, {}
        for stream in streams:
            bank = self.banks[stream]
            h = (bank.hsic_sum / bank.hsic_n.clamp(min=1)).cpu()
            have = (bank.hsic_n > 0).cpu()
            diag = torch.diagonal(h).clamp(min=0)
            mat = h / torch.sqrt(torch.outer(diag, diag))
            matrices[stream] = [[_clean(float(mat[i, j])) if have[i, j] and diag[i] > 0 and diag[j] > 0 else None
                                 for j in range(self.L)] for i in range(self.L)]
            cn = bank.cos_n + bank.cos_n.T
            cs = (bank.cos_sum + bank.cos_sum.T).cpu()
            an = (bank.ang_sum + bank.ang_sum.T).cpu()
            cn = cn.cpu()
            n_states = self.L + 1
            have_state = [bank.n[t] > 0 for t in range(n_states)]
            angular[stream] = [[(0.0 if i == j else float(an[i, j] / cn[i, j]) if cn[i, j] > 0 else None)
                                if have_state[i] and have_state[j] else None for j in range(n_states)]
                               for i in range(n_states)]
            cosine[stream] = [[(1.0 if i == j else float(cs[i, j] / cn[i, j]) if cn[i, j] > 0 else None)
                               if have_state[i] and have_state[j] else None for j in range(n_states)]
                              for i in range(n_states)]
        exceptions = _plug_source_exceptions(self.adapter, self.L)
        calibration = dict(calibration)
        calibration["forwards"] = self.forwards
        calibration["tokens"] = {s: int(self.banks[s].n[0]) for s in streams}
        return ProbeResult(
            family=family, model=model, total_params=self.adapter.total_parameters(),
            calibration=Calibration(**calibration),
            projection=Projection(exact=self.proj is None, dim=int(self.k), model_dim=int(self.model_dim),
                                  seed=self.seed),
            ridge=self.ridge, max_interval=self.max_interval, blocks=blocks,
            cka_matrix=CKAMatrix(
                estimator=HSIC_ESTIMATOR,
                description=("linear-kernel CKA from the minibatch unbiased HSIC_1 of Nguyen, Raghu & Kornblith "
                             "(2021), averaged over forwards; full model width; the same sampled tokens for "
                             "every block of a forward"),
                states="block outputs h_1..h_L (row/column i = output of block i)",
                tokens_per_forward=self.hsic_tokens, matrices=matrices,
            ),
            angular=angular, cosine_matrix=cosine, intervals=intervals,
            plug_source_exceptions=exceptions,
        )


def _generic_source(s: int, e: int, mode: str) -> int:
    return {"middle": (s + e) // 2, "first": s, "last": e}[mode]


def _plug_source_exceptions(adapter, num_blocks: int) -> list[list[int | str]]:
    """Every ``[s, e, mode, source]`` where ``adapter.plug_source`` departs from the generic rule (O(L^2) calls of
    a pure function; only the departures are stored)."""
    out: list[list[int | str]] = []
    for s in range(num_blocks):
        for e in range(s, num_blocks):
            for mode in ("middle", "first", "last"):
                src = adapter.plug_source(s, e, mode)
                if src != _generic_source(s, e, mode):
                    out.append([s, e, mode, int(src)])
    return out


# ------------------------------------------------------------------------------------------------- driver
def probe_transformer(
    adapter,
    scheduler_config: dict[str, Any],
    batches: Iterable[dict[str, Any]],
    *,
    timesteps: int = 4,
    seed: int = 0,
    progress_total: int | None = None,
    progress: bool = False,
    **accumulator_kwargs: Any,
) -> tuple[ProbeAccumulator, list[float]]:
    """Stream ``batches`` (cache-shaped dicts) x ``timesteps`` stratified, scheduler-shifted noise levels through
    the stock forward of ``adapter.transformer``. Returns the accumulator and the sigmas of the first batch."""
    from ppcl.arch import shift_sigmas
    from ppcl.calibration import noise_batch

    acc = ProbeAccumulator(adapter, seed=seed, **accumulator_kwargs)
    base = stratified_sigmas(timesteps)
    gen = torch.Generator().manual_seed(seed)
    first_sigmas: list[float] = []
    bar = None
    if progress:
        from ppcl.progress import progress as progress_bar

        bar = progress_bar(total=progress_total, desc="probe", unit="forward", leave=False)
    param = next(adapter.transformer.parameters())
    for batch in batches:
        batch = {k: (v.to(param.device, param.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                     else v.to(param.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        latents = batch["latents"]
        shifted = torch.as_tensor(shift_sigmas(base, scheduler_config, adapter.image_seq_len(latents)))
        if not first_sigmas:
            first_sigmas = [float(x) for x in shifted]
        for sigma in shifted:
            sig = torch.full((latents.shape[0],), float(sigma))
            noised = noise_batch(adapter, scheduler_config, batch, sigma=sig, generator=gen)
            acc.observe(noised.model_inputs)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return acc, first_sigmas


def iter_batches(pipe, *, data: str | None, samples: int, batch_size: int, resolution: int,
                 seed: int = 0) -> Iterator[dict[str, Any]]:
    """Calibration batches: the latent cache at ``data`` when given, else the built-in synthetic set."""
    if samples < 1 or batch_size < 1:
        raise PPCLError(f"--samples and --batch-size must be >= 1 (got {samples}, {batch_size})")
    if data is not None:
        if not Path(data).exists():
            raise PPCLError(f"calibration data not found: {data}")
        try:
            from ppcl.data.cache import iter_cache_batches
        except ImportError:
            raise PPCLError("--data needs the latent cache (ppcl.data.cache), which this build lacks") from None
        return iter_cache_batches(data, batch_size, limit=samples)
    from ppcl.calibration import synthetic_batches

    return synthetic_batches(pipe, n_samples=samples, batch_size=batch_size, resolution=resolution, seed=seed)


def probe_device(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """``(torch device, teacher dtype)`` for the settings' ``device``/``dtype``: ``auto`` is CUDA + bfloat16 where
    a GPU is present (a 20B teacher fits one 80 GB card only in 16 bits), else CPU + float32 (bfloat16 matmuls
    are slow on most CPUs and float32 keeps small-model results as they always were)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise PPCLError("probe settings: field 'device' is cuda but no CUDA GPU is available (use auto or cpu)")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def run_probe(
    model: str | Path,
    out: str | Path,
    *,
    data: str | None = None,
    settings: Any = None,
    progress: bool = True,
    plots: bool = True,
    **overrides: Any,
) -> ProbeResult:
    """Probe the pipeline at ``model`` and write ``out/probe.json`` (+ ``cka_heatmap.png``, ``trend.png``)
    atomically: the folder appears complete or not at all. ``trained_steps > 0`` adds the trained-plug probe's
    scores (:func:`ppcl.probe_trained.trained_interval_scores`, default settings, the probe's seed and
    ``max_interval``, the same latent cache; without one, distill's built-in synthetic set) as probe.json's
    ``trained``.

    ``settings``: a :class:`ppcl.settings.ProbeSettings` (None: its defaults, the same as ``ppcl probe``'s and the
    pipeline's); ``overrides``: any of its fields by name (``samples=16``, ``device="cpu"``), validated by the same
    model. The teacher runs on ``device`` in ``dtype`` (:func:`probe_device`)."""
    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.settings import ProbeSettings, validate_settings

    base = settings.model_dump() if settings is not None else {}
    s = validate_settings(ProbeSettings, {**base, **overrides})
    samples, batch_size, timesteps, seed = s.samples, s.batch_size, s.timesteps, s.seed
    device, dtype = probe_device(s.device, s.dtype)
    pipe = load_pipeline(model, device=device, dtype=dtype)
    adapter = get_adapter(pipe)
    adapter.transformer.eval()
    batches = iter_batches(pipe, data=data, samples=samples, batch_size=batch_size, resolution=s.resolution,
                           seed=seed)
    acc, sigmas = probe_transformer(
        adapter, dict(pipe.scheduler.config), batches, timesteps=timesteps, seed=seed,
        progress_total=math.ceil(samples / batch_size) * timesteps, progress=progress,
        probe_dim=s.probe_dim, max_interval=s.max_interval, ridge=s.ridge, hsic_tokens=s.hsic_tokens,
    )
    calibration = dict(source="cache" if data else "synthetic", data=str(data) if data else None,
                       samples=samples, batch_size=batch_size, resolution=None if data else s.resolution,
                       timesteps=timesteps, sigmas=sigmas, seed=seed)
    result = acc.result(family=adapter.family, model=str(model), calibration=calibration)
    if s.trained_steps:
        from ppcl.probe_trained import trained_interval_scores

        # on the CPU in float32 (the plugs' fp32 training): the loaded teacher when it already is, else reloaded
        on_cpu = device == "cpu" and dtype == torch.float32
        result.trained = trained_interval_scores(pipe if on_cpu else model, data, steps=s.trained_steps, seed=seed,
                                                 max_interval=s.max_interval, uncond_ratio=s.trained_uncond_ratio,
                                                 output_guidance=s.trained_output_guidance, progress=progress)
    write_probe(result, out, plots=plots)
    return result


def write_probe(result: ProbeResult, out: str | Path, *, plots: bool = True) -> Path:
    """Write ``out/probe.json`` (and the plots) as one atomic folder."""
    from ppcl.atomic import atomic_path

    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        (tmp / "probe.json").write_text(result.model_dump_json(indent=2) + "\n")
        if plots:
            from ppcl.plots import plot_cka_heatmap, plot_trend

            plot_cka_heatmap(result, tmp / "cka_heatmap.png")
            plot_trend(result, tmp / "trend.png")
    return out / "probe.json"
