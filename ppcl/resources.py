"""Resource planner: the per-GPU memory of a stage, counted tensor by tensor while the stage's real code runs on
meta tensors (no weights, no GPU; scale.md, "Memory counting on the meta device").

How it counts. :class:`LiveBytes` is a ``TorchDispatchMode``: every tensor an aten op returns on the counted device
is registered once per storage (views share it), with its size rounded like the CUDA caching allocator rounds a
block (:data:`ALLOC_ROUND`); a ``weakref.finalize`` on the storage records its release. Every allocation and release
is one event ``(serial, +/-bytes, phase)``; the peak is the maximum of the running sum, and its breakdown is the
live set at that event, each storage named by its final role (teacher weight, plug weight, gradient, optimiser
state) or, failing that, by the phase that allocated it (forward: kept for backward; anything else: transient).
So the rows of the breakdown add up to the tensor peak exactly. That peak is what
``torch.cuda.max_memory_allocated`` measures; the device needs :data:`CUDA_CONTEXT_BYTES` and the caching allocator's
fragmentation (:data:`ALLOCATOR_SLACK`) on top, named constants to calibrate against a GPU run.

What runs. The distill stage of today's code (:func:`_distill_steps`, the one place that calls into
``ppcl.distill``): the teacher moved to the device in fp32 then cast to bf16 (``mixed_precision auto`` on CUDA), the
units of :func:`ppcl.distill.build_units` (fp32 plugs), the least-squares init of width projections (real devices
only: its normal equations live on the host, and on the device it holds less than a training step), then one
step of the training loop: noise, :func:`ppcl.distill.nonsequential_losses` under bf16 autocast, backward, gradient
clipping, AdamW. The step runs from the state a step leaves behind (the previous gradients, alive through the next
forward, and the optimiser states), which an optimiser step on zero gradients sets up. Meta tensors have no
autocast, so :class:`CudaAutocast` applies CUDA autocast's bf16 policy at the torch-function level (matmul-like
ops in bf16 with the weight-cast cache, norms / reductions / losses in fp32, lists from torch's CUDA autocast
registrations) and routes attention to the fused kernels CUDA picks; AdamW runs its ``foreach`` implementation as
it does on CUDA.
8-bit AdamW is modelled by :class:`Adam8bitMemory` (bitsandbytes' state layout: two uint8 states and per-256-block
fp32 scales for tensors of >= 4096 elements, fp32 states below; a fused kernel, no temporaries), because
bitsandbytes cannot run on meta tensors (the CUDA image installs it, ``ppcl[cuda]``; without it a CUDA run asked for
8-bit stops with an error).

Today's distill does not shard: N GPUs run N copies of the same state, so the per-GPU peak does not depend on N;
the planner says so in its output. The sharded path will be measured through the same function once it exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ppcl.errors import PPCLError

GIB = 2**30
#: The CUDA caching allocator hands out blocks in multiples of 512 bytes; ``max_memory_allocated`` counts blocks.
ALLOC_ROUND = 512
#: CUDA context, cuBLAS workspaces and kernel images of one process: memory the device loses but
#: ``max_memory_allocated`` does not count (about 0.5 GiB on an H100 with CUDA 12; calibrate on a GPU run).
CUDA_CONTEXT_BYTES = 512 * 2**20
#: Reserved-but-unallocated memory of the caching allocator (fragmentation), as a fraction of the tensor peak.
#: A few percent in long training runs; calibrate against ``torch.cuda.max_memory_reserved`` on a GPU run.
ALLOCATOR_SLACK = 0.05
#: Rows of the breakdown, in print order.
ROWS = ("teacher weights", "plug weights", "plug gradients", "optimizer states", "activations kept for backward",
        "transient")
#: Training steps simulated after the optimiser state is set up (see :func:`_distill_steps`).
STEPS = 1


@dataclass
class DistillKnobs:
    """The settings of one planned distill run (the knobs today's code has, plus the data shape)."""

    batch_size: int = 1
    resolution: int = 1024
    #: text tokens per sample (512: the FLUX / Qwen-Image default ``max_sequence_length``)
    text_tokens: int = 512
    gradient_checkpointing: bool = False
    adam_8bit: bool = False
    #: ``bf16`` (distill's ``mixed_precision auto`` on CUDA) or ``no`` (fp32 everywhere, CPU)
    mixed_precision: str = "bf16"

    def label(self) -> str:
        return (f"batch {self.batch_size}, {self.resolution}x{self.resolution}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, {'8-bit' if self.adam_8bit else 'fp32'} AdamW")


#: The phases reported apart: the teacher's move to the device (fp32, then cast), and everything after it.
PHASES = ("load", "training")


@dataclass
class MemoryEstimate:
    """The per-GPU memory of one stage. ``phases[name]`` is ``{"tensor_peak": bytes, "breakdown": {row: bytes}}``
    for the peak within that phase (rows of :data:`ROWS`, summing to its ``tensor_peak``); ``tensor_peak`` is the
    largest of them, what ``torch.cuda.max_memory_allocated`` measures over the stage."""

    stage: str
    knobs: DistillKnobs
    phases: dict[str, dict[str, Any]]
    #: parameters the optimiser updates (every unit: plugs, width-modified and text-frozen blocks)
    trainable: int
    constants: dict[str, int] = field(default_factory=dict)

    @property
    def tensor_peak(self) -> int:
        return max(ph["tensor_peak"] for ph in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k]["tensor_peak"])

    @property
    def peak_bytes(self) -> int:
        """What the device must hold: the tensor peak plus the constant terms."""
        return self.tensor_peak + sum(self.constants.values())

    def fits(self, gpu_memory_bytes: int) -> bool:
        return self.peak_bytes <= gpu_memory_bytes


# --------------------------------------------------------------------------------------------- counting
class LiveBytes(TorchDispatchMode):
    """Live bytes of tensors on ``device`` (module doc). ``phase`` names what allocates now; :meth:`name` gives a
    live tensor its final role; :meth:`peak` and :meth:`breakdown` read the event stream afterwards."""

    def __init__(self, device: str = "meta", round_to: int = ALLOC_ROUND):
        super().__init__()
        self.device = device
        self.round_to = round_to
        self.phase = "setup"
        self.events: list[tuple[int, int, str]] = []
        self.sizes: dict[int, int] = {}
        self.born: dict[int, str] = {}
        self.role: dict[int, str] = {}
        self._serial: dict[int, int] = {}  # id(storage object) -> serial, while the storage lives
        self._next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor, role: str | None = None) -> None:
        """Register ``t``'s storage if it is new and on the counted device; ``role`` names it (see :meth:`name`)."""
        if t.device.type != self.device:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage hold no device memory of their own
            return
        serial = self._serial.get(id(st))
        if serial is None:
            n = st.nbytes()
            n = -(-n // self.round_to) * self.round_to if n else 0
            self._next += 1
            serial = self._next
            self._serial[id(st)] = serial
            self.sizes[serial] = n
            self.born[serial] = self.phase
            self.events.append((serial, n, self.phase))
            weakref.finalize(st, self._free, id(st), serial)
        if role is not None:
            self.role[serial] = role

    def _free(self, key: int, serial: int) -> None:
        self._serial.pop(key, None)
        self.events.append((serial, -self.sizes[serial], self.phase))

    def name(self, tensors, role: str) -> None:
        """Give every (live) tensor of ``tensors`` the breakdown row ``role``, registering it if needed."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.track(t, role)

    @contextlib.contextmanager
    def during(self, phase: str):
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def peak(self, phases: set[str] | None = None) -> tuple[int, int]:
        """``(bytes, event index)`` of the highest live total, over events of ``phases`` (all when None)."""
        live, best, at = 0, 0, 0
        for i, (_, n, ph) in enumerate(self.events):
            live += n
            if live > best and (phases is None or ph in phases):
                best, at = live, i + 1
        return best, at

    def breakdown(self, upto: int) -> dict[str, int]:
        """Bytes per row of :data:`ROWS` live after the first ``upto`` events."""
        live: dict[int, int] = {}
        for serial, n, _ in self.events[:upto]:
            if n >= 0:
                live[serial] = n
            else:
                live.pop(serial, None)
        rows = dict.fromkeys(ROWS, 0)
        for serial, n in live.items():
            role = self.role.get(serial)
            if role is None:
                role = "activations kept for backward" if self.born[serial] == "forward" else "transient"
            rows[role] += n
        return rows


#: Ops CUDA autocast runs in the lower precision (torch/csrc/autocast_mode.cpp, the CUDA registrations) and those it
#: runs in fp32; names as ``torch`` / ``torch.nn.functional`` / ``Tensor`` functions reach a TorchFunctionMode.
_LOWER = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv",
          "addr", "einsum", "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
          "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention", "linalg_vecdot"}
_FP32 = {"layer_norm", "group_norm", "softmax", "log_softmax", "exp", "expm1", "log", "log10", "log2", "log1p",
         "pow", "rsqrt", "reciprocal", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "mse_loss",
         "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "cosine_similarity", "logsumexp", "cdist", "dist",
         "renorm", "binary_cross_entropy_with_logits", "nll_loss", "cross_entropy"}


class CudaAutocast(TorchFunctionMode):
    """CUDA bf16 autocast for tensors that have none (meta): the ops of CUDA autocast's lower-precision list get
    their fp32 floating inputs cast to ``dtype`` (casts of leaf tensors that require grad, i.e. parameters, are
    cached until the region ends, as autocast caches them), the fp32-list ops get low-precision inputs cast to fp32,
    every other op runs on what it is given. The casts are ordinary autograd ops, so what the backward keeps (the
    bf16 weight copies) is what CUDA keeps."""

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        #: None: no autocast (fp32 run), only CUDA's attention kernels
        self.dtype = dtype
        #: id(leaf) -> (leaf, weak reference to its cast copy). Autocast holds the copies until its region ends; the
        #: forward's region ends before the backward, when autograd holds them anyway, so a weak reference keeps
        #: each copy exactly as long (and a recompute's copies die with that plug's backward, as on CUDA).
        self.cache: dict[int, tuple[torch.Tensor, Any]] = {}

    def __exit__(self, *exc):
        self.cache.clear()
        return super().__exit__(*exc)

    def _cast(self, x, to: torch.dtype, src: tuple[torch.dtype, ...]):
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, to, src) for v in x)
        if not isinstance(x, torch.Tensor) or x.dtype not in src:
            return x
        if to == self.dtype and x.is_leaf and x.requires_grad:
            hit = self.cache.get(id(x))
            copy = hit[1]() if hit is not None and hit[0] is x else None
            if copy is None:
                copy = x.to(to)
                self.cache[id(x)] = (x, weakref.ref(copy))
            return copy
        return x.to(to)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "backward" and len(args) == 1 and not any(kwargs.values()) and args[0].dim() == 0:
            # A mode is off inside its own handler, and Tensor.backward would call it again if re-entered; the
            # checkpoint recomputes must see it (torch re-enters the forward's autocast there), so the engine is
            # run directly with the mode on, as Tensor.backward runs it for a scalar loss.
            from torch.autograd.variable import Variable

            with self:
                Variable._execution_engine.run_backward((args[0],), (torch.ones_like(args[0]),), False, False, (),
                                                        allow_unreachable=True, accumulate_grad=True)
            return None
        if name == "scaled_dot_product_attention":
            if self.dtype is not None:
                args = self._cast(tuple(args), self.dtype, (torch.float32,))
                kwargs = {k: self._cast(v, self.dtype, (torch.float32,)) for k, v in kwargs.items()}
            return _cuda_sdpa(*args, **kwargs)
        if self.dtype is None:
            return func(*args, **kwargs)
        if name in _LOWER:
            args = self._cast(tuple(args), self.dtype, (torch.float32,))
            kwargs = {k: self._cast(v, self.dtype, (torch.float32,)) for k, v in kwargs.items()}
        elif name in _FP32:
            args = self._cast(tuple(args), torch.float32, (torch.bfloat16, torch.float16))
            kwargs = {k: self._cast(v, torch.float32, (torch.bfloat16, torch.float16)) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as CUDA runs it: the flash kernel for bf16 / fp16 without a mask, the
    memory-efficient one with a mask or in fp32 (both keep only the output and the log-sum-exp for backward). Meta
    tensors would otherwise take the math path, which materialises the ``(B, H, L, L)`` attention matrix."""
    if enable_gqa:
        raise PPCLError("resource planner: grouped-query attention is not modelled")
    if attn_mask is None and query.dtype in (torch.bfloat16, torch.float16):
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # SDPA turns a boolean mask into an additive bias first
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask.logical_not(), float("-inf"))
    b, h, lq, _ = query.shape
    bias = None if attn_mask is None else attn_mask.expand(b, h, lq, key.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p,
                                                                  is_causal, scale=scale)[0]


class Adam8bitMemory(torch.optim.Optimizer):
    """The memory of bitsandbytes' ``AdamW8bit`` (not its arithmetic: it only runs on meta tensors): per parameter
    of >= :attr:`MIN_8BIT_SIZE` elements two uint8 moments and two fp32 scales per block of :attr:`BLOCK` elements,
    below that two fp32 moments; the update is one fused kernel, so a step allocates nothing else."""

    MIN_8BIT_SIZE = 4096
    BLOCK = 256

    def __init__(self, params, lr: float = 1e-4, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)  # on the host, like AdamW's
                    if p.numel() >= self.MIN_8BIT_SIZE:
                        blocks = math.ceil(p.numel() / self.BLOCK)
                        st["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        st["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        st["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                        st["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    else:
                        st["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        st["state2"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
        return None


# --------------------------------------------------------------------------------------------- distill
def example_batch(adapter, knobs: DistillKnobs, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A cache-shaped batch (what ``ppcl encode`` writes) of zeros for ``knobs``: latents ``(B, C, h, w)`` at the
    family's VAE factor 8, ``prompt_embeds`` ``(B, text_tokens, joint_attention_dim)`` and, for a transformer with a
    pooled projection, ``pooled_prompt_embeds`` ``(B, pooled_projection_dim)``; floats in ``dtype``."""
    from types import SimpleNamespace

    cfg = adapter.transformer.config
    c, h, w = adapter.latent_shape(SimpleNamespace(transformer=adapter.transformer, vae_scale_factor=8),
                                   knobs.resolution, knobs.resolution)
    if knobs.resolution % 16 or knobs.resolution < 16:
        raise PPCLError(f"--resolution {knobs.resolution}: must be a positive multiple of 16 pixels (2x2 patches of "
                        "the 8x downsampled latents)")
    b = knobs.batch_size
    batch = {
        "latents": torch.zeros(b, c, h, w, device=device, dtype=dtype),
        "prompt_embeds": torch.zeros(b, knobs.text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
    }
    if getattr(cfg, "pooled_projection_dim", None):
        batch["pooled_prompt_embeds"] = torch.zeros(b, cfg.pooled_projection_dim, device=device, dtype=dtype)
    return batch


def _distill_steps(adapter, plan, knobs: DistillKnobs, meter: LiveBytes, steps: int = STEPS) -> int:
    """Today's ``ppcl.distill.distill`` from the teacher's move to the device to the end of ``steps`` optimiser
    steps, on ``adapter``'s device (meta: the GPU modelled; cpu: a real run), counted by ``meter``. The ONLY function
    of this module that calls into ``ppcl.distill``: it mirrors the loop of ``distill()`` (same order, same settings)
    and calls its public pieces (check_plan_family, build_units, unit_table, fit_width_units, lr_factor,
    nonsequential_losses, make_optimizer).

    Returns the number of trainable parameters. The teacher is left as it came (dtype, requires_grad) so one
    model serves several calls."""
    from ppcl.calibration import noise_batch
    from ppcl.distill import DistillSettings, build_units, check_plan_family, fit_width_units, lr_factor, \
        make_optimizer, nonsequential_losses, unit_table
    from ppcl.plugs import freeze

    transformer = adapter.transformer
    device = next(transformer.parameters()).device
    modelled = device.type == "meta"
    bf16 = knobs.mixed_precision == "bf16"
    settings = DistillSettings(batch_size=knobs.batch_size, gradient_checkpointing=knobs.gradient_checkpointing,
                               mixed_precision=knobs.mixed_precision, use_8bit_adam=knobs.adam_8bit,
                               resolution=knobs.resolution)
    check_plan_family(plan, adapter, "plan resources")
    # meta: CUDA's autocast (bf16) and attention kernels (always) are modelled; a real device runs its own
    autocast = (lambda: CudaAutocast(torch.bfloat16 if bf16 else None)) if modelled else contextlib.nullcontext
    if bf16 and not modelled:
        raise PPCLError(f"resource planner: mixed precision bf16 is modelled on the meta device only, not on {device}")
    dtype0 = next(transformer.parameters()).dtype
    grads0 = {id(p): p.requires_grad for p in transformer.parameters()}
    try:
        with meter:
            # distill(): freeze, teacher.to(device) (fp32: every weight on the device), then .to(bf16)
            with meter.during("load"):
                freeze(transformer)
                meter.name([*transformer.parameters(), *transformer.buffers()], "teacher weights")
                if bf16:
                    transformer.to(torch.bfloat16)
                meter.name([*transformer.parameters(), *transformer.buffers()], "teacher weights")
            teacher_dtype = torch.bfloat16 if bf16 else torch.float32
            with meter.during("setup"):
                units = build_units(adapter, plan, settings.init)
                if not units:
                    raise PPCLError("the plan has no intervals and no width ops: nothing to distill")
                table = unit_table(units).to(device)
                params = [p for p in table.parameters() if p.requires_grad]
                meter.name(table.parameters(), "plug weights")
                if knobs.adam_8bit and modelled:
                    optimizer = Adam8bitMemory(params, lr=settings.lr, weight_decay=settings.weight_decay)
                else:
                    optimizer = make_optimizer(params, settings, device)
                    if modelled:  # torch picks the foreach AdamW for CUDA tensors; meta would get the loop
                        for g in optimizer.param_groups:
                            g["foreach"] = True
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda s: lr_factor(s, settings.warmup_steps, settings.steps))
                trainable = sum(p.numel() for p in params)

            def noised(step: int) -> dict[str, Any]:
                batch = example_batch(adapter, knobs, device, teacher_dtype)
                g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 7_919)
                return noise_batch(adapter, {}, batch, scheme=settings.timesteps, generator=g,
                                   guidance=settings.guidance).model_inputs

            # The least-squares init of width projections is one no-grad teacher pass whose normal equations live
            # on the host (float64, ppcl.plugs.NormalEquations copies to the CPU, which meta tensors cannot): on the
            # device it holds less than a training step (no gradients, no saved activations), so meta skips it.
            if any(u.kind in ("width", "text_freeze") for u in units) and not modelled:
                with meter.during("least squares"):  # one batch: the normal equations are summed batch by batch
                    fit_width_units(adapter, units, [None], lambda b, j: noised(-1 - j), settings.ridge, autocast)
            table.train()
            with meter.during("optimizer"):
                # Every step after the first starts where the one before ended: its gradients still alive (distill
                # zeroes them after the forward) and the optimiser states in place. A step on zero gradients sets
                # that state up (its own temporaries are those of every optimiser step) without a second forward.
                for p in params:
                    p.grad = torch.zeros_like(p)
                meter.name([p.grad for p in params], "plug gradients")
                optimizer.step()
                meter.name([v for st in optimizer.state.values() for v in st.values()], "optimizer states")
            for step in range(1, steps + 1):
                with meter.during("inputs"):
                    inputs = noised(step)
                with meter.during("forward"):
                    with autocast():
                        losses, out_loss = nonsequential_losses(adapter, inputs, units, settings, step=step)
                    total = sum(v for per in losses.values() for v in per.values())
                    if out_loss is not None:
                        total = total + settings.output_loss_weight * out_loss
                with meter.during("backward"):
                    optimizer.zero_grad(set_to_none=True)
                    # torch's checkpoint re-enters the forward's autocast state to recompute a plug; the emulated
                    # autocast is a mode, so it is on through the backward (only those recomputes see it)
                    with autocast():
                        total.backward()
                    meter.name([p.grad for p in params], "plug gradients")
                with meter.during("optimizer"):
                    if settings.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    meter.name([v for st in optimizer.state.values() for v in st.values()], "optimizer states")
            del units, table, params, optimizer, scheduler
        return trainable
    finally:
        transformer.to(dtype0)
        for p in transformer.parameters():
            p.requires_grad_(grads0.get(id(p), p.requires_grad))


def distill_memory(adapter, plan, knobs: DistillKnobs | None = None, *, constants: bool = True,
                   round_to: int | None = None) -> MemoryEstimate:
    """Per-GPU memory of today's ``ppcl distill`` for ``plan`` on ``adapter``'s model (meta: CUDA modelled).

    ``constants``: add :data:`CUDA_CONTEXT_BYTES` and :data:`ALLOCATOR_SLACK` (off for a CPU measurement);
    ``round_to``: allocation rounding, default :data:`ALLOC_ROUND` on meta (the CUDA allocator's), 1 on a real
    device (exact bytes)."""
    knobs = knobs or DistillKnobs()
    device = next(adapter.transformer.parameters()).device
    # the caching allocator's block rounding is a CUDA matter: a CPU run counts exact bytes
    meter = LiveBytes(device.type, round_to or (ALLOC_ROUND if device.type == "meta" else 1))
    trainable = _distill_steps(adapter, plan, knobs, meter)
    phases = {}
    for name in PHASES:
        group = {"load"} if name == "load" else {ph for _, _, ph in meter.events} - {"load"}
        peak, at = meter.peak(group)
        phases[name] = {"tensor_peak": peak, "breakdown": meter.breakdown(at)}
    est = MemoryEstimate("distill", knobs, phases, trainable)
    if constants:
        est.constants = {"cuda context": CUDA_CONTEXT_BYTES, "allocator slack": int(ALLOCATOR_SLACK * est.tensor_peak)}
    return est


def candidate_knobs(knobs: DistillKnobs) -> list[DistillKnobs]:
    """Settings to try when ``knobs`` does not fit, cheapest first: the two switches that keep the training the
    same (gradient checkpointing: more compute; 8-bit AdamW: other optimiser numerics), then smaller batches (halved
    down to 1, both switches on), then smaller images (3/4, then halves, down to 256 px, batch 1)."""
    out: list[DistillKnobs] = []
    rep = dataclasses.replace
    for ck, a8 in ((True, False), (False, True), (True, True)):
        if (ck or knobs.gradient_checkpointing, a8 or knobs.adam_8bit) != (knobs.gradient_checkpointing,
                                                                           knobs.adam_8bit):
            out.append(rep(knobs, gradient_checkpointing=ck or knobs.gradient_checkpointing,
                           adam_8bit=a8 or knobs.adam_8bit))
    both = rep(knobs, gradient_checkpointing=True, adam_8bit=True)
    b = knobs.batch_size
    while b > 1:
        b //= 2
        out.append(rep(both, batch_size=b))
    r = knobs.resolution
    res = [r * 3 // 4 // 16 * 16] if r * 3 // 4 >= 256 else []
    while r // 2 >= 256:
        r //= 2
        res.append(r)
    for r in sorted(set(res), reverse=True):
        out.append(rep(both, batch_size=1, resolution=r))
    seen, unique = set(), []
    for k in out:
        key = dataclasses.astuple(k)
        if key not in seen and key != dataclasses.astuple(knobs):
            seen.add(key)
            unique.append(k)
    return unique


def lower_bound(teacher_bytes: int, trainable: int, knobs: DistillKnobs) -> int:
    """Bytes every training step of today's distill holds at once, whatever the batch or image size: the teacher,
    fp32 plug weights and gradients (the previous step's gradients live through the next forward) and the optimiser
    states (8 or, 8-bit, at least 2 bytes per parameter), plus the constant terms."""
    held = teacher_bytes + trainable * (4 + 4 + (2 if knobs.adam_8bit else 8))
    return held + CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * held)


def plan_resources(adapter, plan, *, gpus: int = 1, nodes: int = 1, gpu_memory_gib: float = 80.0,
                   knobs: DistillKnobs | None = None, search: bool = True) -> dict[str, Any]:
    """The planner's report (the ``--json`` object): per stage ``peak_bytes``, ``fits``, the breakdown, and the
    cheapest settings that fit when the asked ones do not (``None`` when nothing the code offers fits)."""
    if gpus < 1 or nodes < 1:
        raise PPCLError(f"--gpus and --nodes must be >= 1 (got {gpus}, {nodes})")
    if not gpu_memory_gib > 0:
        raise PPCLError(f"--gpu-memory must be positive GiB (got {gpu_memory_gib})")
    knobs = knobs or DistillKnobs()
    limit = int(gpu_memory_gib * GIB)
    est = distill_memory(adapter, plan, knobs)
    fit = None
    tried = []
    if search and not est.fits(limit):
        teacher = est.phases["training"]["breakdown"]["teacher weights"]
        for cand in candidate_knobs(knobs):
            low = lower_bound(teacher, est.trainable, cand)
            if low > limit:  # no need to run it: what every step holds already does not fit
                tried.append({"settings": dataclasses.asdict(cand), "peak_bytes": None, "lower_bound_bytes": low,
                              "fits": False})
                continue
            e = distill_memory(adapter, plan, cand)
            tried.append({"settings": dataclasses.asdict(cand), "peak_bytes": e.peak_bytes, "fits": e.fits(limit)})
            if e.fits(limit):
                fit = e
                break
    return {
        "model": {"family": adapter.family, "blocks": adapter.num_blocks, "parameters": adapter.total_parameters()},
        "plan": {"intervals": [list(iv) for iv in plan.intervals], "width_ops": len(plan.width),
                 "student_parameters": plan.params.student, "trainable_parameters": est.trainable},
        "gpus": gpus, "nodes": nodes, "gpu_memory_bytes": limit,
        "sharding": "none: today's distill replicates teacher, plugs, gradients and optimiser states on every GPU; "
                    "the per-GPU peak does not depend on the number of GPUs",
        "global_batch_size": knobs.batch_size * gpus * nodes,
        "stages": {"distill": _stage_json(est, limit, fit, tried)},
    }


def _stage_json(est: MemoryEstimate, limit: int, fit: MemoryEstimate | None, tried: list) -> dict[str, Any]:
    return {
        "settings": dataclasses.asdict(est.knobs),
        "peak_bytes": est.peak_bytes,
        "fits": est.fits(limit),
        "tensor_peak_bytes": est.tensor_peak,
        "peak_phase": est.peak_phase,
        "phases": {k: {"tensor_peak_bytes": v["tensor_peak"], "breakdown_bytes": v["breakdown"]}
                   for k, v in est.phases.items()},
        "constants_bytes": est.constants,
        "trainable_parameters": est.trainable,
        "fit_search": tried,
        "cheapest_fit": None if fit is None else {"settings": dataclasses.asdict(fit.knobs),
                                                   "peak_bytes": fit.peak_bytes},
    }


#: Column titles of the phases in the printed table.
_PHASE_TITLES = {"load": "load (fp32 teacher, then cast)", "training": "training step"}


def format_resources(report: dict[str, Any]) -> str:
    """The human-readable table of :func:`plan_resources`' report."""
    m, p = report["model"], report["plan"]
    limit = report["gpu_memory_bytes"] / GIB
    lines = [
        f"{m['family']}: {m['blocks']} blocks, {m['parameters']:,} parameters; plan: {len(p['intervals'])} "
        f"intervals, {p['width_ops']} width ops, student {p['student_parameters']:,}",
        f"{report['gpus']} GPU(s) x {report['nodes']} node(s), {limit:.1f} GiB each; global batch "
        f"{report['global_batch_size']}",
        f"sharding: {report['sharding']}",
    ]
    for stage, s in report["stages"].items():
        k = DistillKnobs(**s["settings"])
        names = list(s["phases"])
        lines += ["", f"{stage} per GPU ({k.label()}; {s['trainable_parameters']:,} trainable), GiB:",
                  f"  {'':<34}" + "".join(f"{_PHASE_TITLES.get(n, n):>32}" for n in names)]
        for row in ROWS:
            lines.append(f"  {row:<34}" + "".join(f"{s['phases'][n]['breakdown_bytes'][row] / GIB:>32.1f}"
                                                  for n in names))
        lines.append(f"  {'= tensor peak (max_memory_allocated)':<34}"
                     + "".join(f"{s['phases'][n]['tensor_peak_bytes'] / GIB:>32.1f}" for n in names))
        for name, n in s["constants_bytes"].items():
            lines.append(f"  {'+ ' + name:<34}{n / GIB:>32.1f}")
        lines.append(f"  {'= peak (' + s['peak_phase'] + ')':<34}{s['peak_bytes'] / GIB:>32.1f}   "
                     f"{'fits' if s['fits'] else 'does NOT fit'} in {limit:.1f} GiB")
        if not s["fits"]:
            for t in s["fit_search"]:
                got = (f"{t['peak_bytes'] / GIB:.1f} GiB" if t["peak_bytes"] is not None else
                       f">= {t['lower_bound_bytes'] / GIB:.1f} GiB (teacher, plugs, gradients, optimizer states)")
                lines.append(f"  tried {DistillKnobs(**t['settings']).label()}: {got}"
                             f"{'  <- cheapest that fits' if t['fits'] else ''}")
            if s["cheapest_fit"] is None:
                lines.append("  nothing today's code offers fits: it needs sharded training state (not built yet) "
                             "or a larger GPU")
    return "\n".join(lines)
