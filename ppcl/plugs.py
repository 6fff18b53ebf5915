"""Plugs: the trained replacements of a plan, and the small surgeries that place them.

A *depth plug* replaces the teacher blocks ``s..e`` of one interval by ONE block of the same class, a deep copy of
teacher block ``adapter.plug_source(s, e, init)`` (method.md section 2), so it is called with exactly the arguments
the teacher's block ``s`` received. A *width plug* is a teacher block rebuilt by the adapter with some sub-modules
replaced by residual linear maps ``y = x + W x + b`` (method.md section 3; see ``Adapter.apply_width_op``). Those
stand-in modules (``ResidualLinear``, ``ZeroBranch``) live in :mod:`ppcl.arch.common`: a saved width-pruned
transformer is built from them, so they belong to the adapter protocol, below this module.

The loss (method.md section 2), per stream, for ``a``, ``b`` of shape ``(B, N, D)``::

    D(a, b) = mean over tokens of || a / (||a|| + eps) - b / (||b|| + eps) ||^2      (= 2 - 2 cos without eps)

computed in float32 whatever the autocast dtype.

Surgery is written once against the adapter protocol as small pure functions: :func:`student_lists` lays out the
block lists of a model where some intervals are replaced by plugs (used by sequential distillation, the
output-level loss and export alike).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ppcl.arch.common import Adapter
from ppcl.errors import PPCLError

#: default epsilon added to the per-token norms of the loss
LOSS_EPS = 1e-6


def plug_loss(a: torch.Tensor, b: torch.Tensor, eps: float = LOSS_EPS) -> torch.Tensor:
    """Loss D of method.md: mean over tokens of the squared distance of per-token L2-normalised states.

    Args:
        a, b: ``(..., D)`` student and teacher states; normalised over the last (channel) axis.
    Returns: scalar float32, in [0, 4].
    """
    a = a.float()
    b = b.float()
    an = a / (a.norm(dim=-1, keepdim=True) + eps)
    bn = b / (b.norm(dim=-1, keepdim=True) + eps)
    return (an - bn).pow(2).sum(dim=-1).mean()


@dataclass(frozen=True)
class DepthPlugSpec:
    """Where one depth plug goes: interval ``[start, end]`` (inclusive execution indices), copied from block
    ``source`` (execution index), living in block list ``list_name``."""

    index: int  # position of the interval in the plan
    start: int
    end: int
    source: int
    list_name: str


def depth_plug_specs(adapter: Adapter, intervals: list[list[int]] | list[tuple[int, int]], init: str) -> list[DepthPlugSpec]:
    """Validate ``intervals`` against the teacher and say where each plug comes from.

    Raises PPCLError when an interval is out of range, reversed, overlaps another, or crosses block lists."""
    n = adapter.num_blocks
    specs: list[DepthPlugSpec] = []
    prev_end = -1
    for k, iv in enumerate(intervals):
        s, e = int(iv[0]), int(iv[1])
        if not (0 <= s <= e < n):
            raise PPCLError(f"plan interval {k} [{s}, {e}] does not fit the model's {n} blocks")
        if s <= prev_end:
            raise PPCLError(f"plan interval {k} [{s}, {e}] overlaps or precedes the previous interval")
        ls, _ = adapter.locate(s)
        le, _ = adapter.locate(e)
        if ls != le:
            raise PPCLError(f"plan interval {k} [{s}, {e}] crosses block lists ({ls} -> {le})")
        src = adapter.plug_source(s, e, init)
        specs.append(DepthPlugSpec(k, s, e, src, ls))
        prev_end = e
    return specs


def make_depth_plug(adapter: Adapter, spec: DepthPlugSpec) -> nn.Module:
    """A trainable deep copy of the teacher block ``spec.source`` (fp32 master weights)."""
    plug = copy.deepcopy(adapter.block(spec.source))
    plug.float()
    for p in plug.parameters():
        p.requires_grad_(True)
    return plug


def freeze(module: nn.Module) -> nn.Module:
    """Teacher weights never train: ``requires_grad=False`` everywhere, eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def student_lists(
    adapter: Adapter,
    plugs: dict[int, tuple[int, nn.Module, int]],
    replaced: dict[int, nn.Module] | None = None,
) -> tuple[dict[str, list[nn.Module]], dict[str, list[int]], dict[int, int]]:
    """Block lists of a student where some intervals are replaced by plugs (a module-list edit).

    Args:
        plugs: ``start -> (end, plug module, source execution index)`` for the intervals to replace.
        replaced: ``execution index -> module`` for kept teacher blocks to swap for another module (width plugs).
    Returns:
        ``lists``: list_name -> modules in order; ``keep``: list_name -> for each new position the LOCAL index of
        the teacher block whose structure it has (what ``Adapter.pruned_config`` takes); ``position``: execution
        index of every plug start and kept block -> its new execution index.
    """
    replaced = replaced or {}
    lists: dict[str, list[nn.Module]] = {name: [] for name, _ in adapter.block_lists}
    keep: dict[str, list[int]] = {name: [] for name, _ in adapter.block_lists}
    position: dict[int, int] = {}
    n = adapter.num_blocks
    l = 0
    new = 0
    while l < n:
        name, _ = adapter.locate(l)
        if l in plugs:
            end, module, source = plugs[l]
            src_list, src_local = adapter.locate(source)
            assert src_list == name, "a plug lives in the list of its interval"
            lists[name].append(module)
            keep[name].append(src_local)
            position[l] = new
            l = end + 1
        else:
            lists[name].append(replaced.get(l, adapter.block(l)))
            keep[name].append(adapter.locate(l)[1])
            position[l] = new
            l += 1
        new += 1
    return lists, keep, position


class StudentView:
    """The teacher transformer with its block lists replaced (a shallow module-list edit, no weight copied).

    Use as a context manager: inside, ``adapter.transformer`` runs the student through the stock forward; on exit
    the teacher's own lists are back. Config layer counts are not touched: the stock forwards iterate the lists.
    """

    def __init__(self, adapter: Adapter, lists: dict[str, list[nn.Module]]):
        self.adapter = adapter
        self.lists = lists
        self._saved: dict[str, nn.ModuleList] = {}

    def __enter__(self) -> Adapter:
        t = self.adapter.transformer
        for name, modules in self.lists.items():
            self._saved[name] = getattr(t, name)
            t._modules[name] = nn.ModuleList(modules)
        return type(self.adapter)(t)

    def __exit__(self, *exc: Any) -> None:
        t = self.adapter.transformer
        for name, modules in self._saved.items():
            t._modules[name] = modules


# ------------------------------------------------------------------------------------------- least squares
class NormalEquations:
    """Streamed normal equations of the residual fit ``y - x ~ W x + b`` in float64.

    Accumulates ``A = [x 1]^T [x 1]`` ``(D+1, D+1)`` and ``C = [x 1]^T (y - x)`` ``(D+1, D_out)`` over any number of
    batches (memory independent of the token count); :meth:`solve` returns the ridge solution. Fitting from many
    batches, not the last one, is method.md section 3's explicit requirement.
    """

    def __init__(self, dim: int, dim_out: int | None = None):
        dim_out = dim if dim_out is None else dim_out
        self.A = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
        self.C = torch.zeros(dim + 1, dim_out, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens ``x`` ``(..., D)`` -> ``y`` ``(..., D_out)``."""
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        y = y.detach().reshape(-1, y.shape[-1]).to("cpu", torch.float64)
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        self.A += xa.T @ xa
        self.C += xa.T @ (y - x)
        self.count += x.shape[0]

    def solve(self, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W (D_out, D), b (D_out,))`` minimising ``||y - x - W x - b||^2 + ridge * tr(A)/D * ||W||^2``.

        The ridge is relative to the mean diagonal of ``A`` so it is scale-free; the bias is not penalised."""
        if self.count == 0:
            raise PPCLError("least-squares fit has no data: no batch reached the projected block")
        d = self.A.shape[0] - 1
        reg = torch.zeros_like(self.A)
        reg[:d, :d] = torch.eye(d, dtype=torch.float64) * ridge * (self.A.diagonal()[:d].mean().clamp_min(1e-12))
        sol = torch.linalg.solve(self.A + reg, self.C)  # (D+1, D_out)
        return sol[:d].T.contiguous(), sol[d].contiguous()
