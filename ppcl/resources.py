"""Resource planner: the peak memory of every stage of a run (distill, probe, export, evaluate), counted tensor by
tensor while the stage's real code runs on meta tensors where it can (no weights, no GPU; scale.md, "Memory counting
on the meta device"), modelled from the plan's exact sizes where it cannot. Each stage says which.

How it counts. :class:`LiveBytes` is a ``TorchDispatchMode``: every tensor an aten op returns on the counted device
is registered once per storage (views share it; a DTensor is counted by its local shard), with its size rounded like
the CUDA caching allocator rounds a block (:data:`ALLOC_ROUND`); a ``weakref.finalize`` on the storage records its
release. Every allocation and release is one event ``(serial, +/-bytes, phase)``; the peak is the maximum of the
running sum, and its breakdown is the live set at that event, each storage named by its final role (teacher weight,
plug weight shard, gathered bf16 plug weight, gradient shard, optimiser state, probe statistic) or, failing that,
by the phase that allocated it (the teacher pass: captured teacher states; a plug's forward: kept for backward;
anything else: transient). So the rows of the breakdown add up to the tensor peak exactly. That peak is what
``torch.cuda.max_memory_allocated`` measures; the device needs :data:`CUDA_CONTEXT_BYTES` and the caching
allocator's fragmentation (:data:`ALLOCATOR_SLACK`) on top, named constants to calibrate against a GPU run.

Distill (real code on meta, the sharded design; :func:`_distill_steps`). What runs, in the order a training run does:
- load: the teacher straight to the device in bf16 (no fp32 copy on the host or the device), frozen, replicated on
  every rank; text encoders are not loaded (the latent cache holds the embeddings);
- setup: :func:`ppcl.distill.build_units` (fp32 copies of teacher blocks), then every unit sharded with PyTorch FSDP2
  over a 1-D mesh of all ``gpus x nodes`` ranks: ``fully_shard(unit.module, mesh, mp_policy=MixedPrecisionPolicy(
  param_dtype=bf16, reduce_dtype=fp32))``, reshard after forward (the training loop's own
  ``ppcl.distill.sharding.shard_units``). fp32 master weights, gradients and AdamW
  states live as 1/N shards (dim 0 padded to a multiple of N, as FSDP2 pads; rank 0, whose shard is never the
  smaller one, is the rank counted);
- one training step from the state any step after the first starts in (AdamW's states in place): noise, one
  no-grad teacher pass capturing every unit's input and target (:func:`ppcl.distill.teacher_pass`), then per unit:
  its forward on the captured states under bf16 autocast (FSDP2 all-gathers its bf16 weights), its loss, its own
  backward (FSDP2 reduce-scatters fp32 gradient shards), so one unit's activations are alive at a time; the
  output-level term (weight > 0) runs last with its own backward; then gradient clipping and AdamW (``foreach``).
The sharding engine itself runs: FSDP2 on meta tensors over torch's fake process group (``FakeStore``, backend
``fake``, rank 0 of N: collectives allocate their buffers and move no data), with three adaptations a meta module
needs (:func:`_fsdp_on_meta`: FSDP2's check that nothing is left on meta is skipped, and its streams and device are
those of a host device on meta tensors). So the all-gather and reduce-scatter buffers, the padded shards and the
DTensor optimiser states are FSDP2's own, not a formula. Meta tensors have no autocast, so :class:`CudaAutocast`
applies CUDA autocast's bf16 policy at the torch-function level (matmul-like ops in bf16 with the weight-cast cache,
norms / reductions / losses in fp32, lists from torch's CUDA autocast registrations) and routes attention to the
fused kernels CUDA picks. 8-bit AdamW is modelled by :class:`Adam8bitMemory` (bitsandbytes' state layout on each
local shard), because bitsandbytes cannot run on meta tensors.

Probe (real code on meta; :func:`probe_memory`): the bf16 teacher on the GPU and :func:`ppcl.probe.probe_transformer`
(the real accumulator: projected float64 moment banks, the per-forward window of states, the HSIC Grams) over one
cache-shaped batch; the text encoders are not loaded (the pipeline's probe step reads the latent cache).

Export (modelled, host RAM, no GPU; :func:`export_memory`): the streaming export (:mod:`ppcl.export_stream`) maps,
copies and writes ONE tensor at a time (each output shard's header first, then its tensors in order), so the output
shard size does not enter its memory: its peak is the largest tensor copied (a plug tensor read in fp32 plus its
cast copy, or a teacher tensor read and written in the teacher's dtype), plus the process itself
(:data:`HOST_PROCESS_BYTES`). Modelled because nothing of it runs on the device and its buffers are plain host
copies whose sizes the plan gives exactly (measured: 339 MiB peak RSS growth on a 6-block Qwen-Image-width teacher
against 324 MiB modelled for its largest tensor; docs/export.md).

Evaluate (real transformer forward on meta + modelled components; :func:`evaluate_memory`): the teacher (the
largest pipeline evaluated) in bf16 and one no-grad denoising forward at ``2 x batch`` (classifier-free guidance
batched: an upper bound for pipelines that run the two branches apart); text encoders and VAE from the pipeline
folder's safetensors headers when ``--model`` is a pipeline folder (a bare config names none: then not counted,
and the output says so). Not counted: VAE decoding activations and the CLIP / FID feature extractors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ppcl.errors import PPCLError

GIB = 2**30
#: The CUDA caching allocator hands out blocks in multiples of 512 bytes; ``max_memory_allocated`` counts blocks.
ALLOC_ROUND = 512
#: CUDA context, cuBLAS workspaces, kernel images and NCCL's own buffers of one process: memory the device loses but
#: ``max_memory_allocated`` does not count (about 0.5 GiB on an H100 with CUDA 12; calibrate on a GPU run).
CUDA_CONTEXT_BYTES = 512 * 2**20
#: Reserved-but-unallocated memory of the caching allocator (fragmentation), as a fraction of the tensor peak.
#: A few percent in long training runs; calibrate against ``torch.cuda.max_memory_reserved`` on a GPU run.
ALLOCATOR_SLACK = 0.05
#: A CPU process with torch, diffusers and ppcl imported, before any tensor (0.32 GB maxrss measured with
#: ``python -c "import torch, diffusers, ppcl.export"``; rounded up for the allocator's arenas).
HOST_PROCESS_BYTES = 512 * 2**20
#: Rows of the breakdown, in print order (a stage prints those it can have).
ROWS = ("teacher weights", "plug weights", "gathered plug weights", "plug gradients", "optimizer states",
        "captured teacher states", "activations kept for backward", "probe statistics", "transient")
DISTILL_ROWS = ROWS[:7] + ("transient",)
#: Training steps simulated after the optimiser state is set up (see :func:`_distill_steps`).
STEPS = 1
#: the phase whose allocations are named by the phase when no role is given
_BORN_ROLE = {"forward": "activations kept for backward", "teacher pass": "captured teacher states"}


@dataclass
class DistillKnobs:
    """The settings of one planned distill run (the knobs the code has, the data shape and the world)."""

    batch_size: int = 1
    resolution: int = 1024
    #: text tokens per sample (512: the FLUX / Qwen-Image default ``max_sequence_length``)
    text_tokens: int = 512
    gradient_checkpointing: bool = False
    adam_8bit: bool = False
    #: ``bf16`` (distill's ``mixed_precision auto`` on CUDA) or ``no`` (fp32 everywhere, CPU)
    mixed_precision: str = "bf16"
    #: AdamW's ``foreach`` implementation (what CUDA tensors get; its step temporaries are the size of the local
    #: shards); False: the per-tensor loop a CPU run of distill gets
    foreach_adamw: bool = True
    #: GPUs per node and nodes: the FSDP2 mesh has ``gpus * nodes`` ranks
    gpus: int = 1
    nodes: int = 1
    #: the output-level term (> 0: a student forward with every unit in place, its own backward)
    output_loss_weight: float = 0.0

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    def label(self) -> str:
        return (f"{self.gpus} GPU(s) x {self.nodes} node(s), batch {self.batch_size}, {self.resolution}x"
                f"{self.resolution}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                f"{'8-bit' if self.adam_8bit else 'fp32'} AdamW"
                + (f", output loss {self.output_loss_weight:g}" if self.output_loss_weight else ""))


#: The phases reported apart: the teacher's load, building and sharding the units, and the training step.
PHASES = ("load", "setup", "training")


@dataclass
class MemoryEstimate:
    """The peak memory of one stage (per GPU; export: host RAM). ``phases[name]`` is ``{"tensor_peak": bytes,
    "breakdown": {row: bytes}}`` for the peak within that phase (rows summing to its ``tensor_peak``);
    ``tensor_peak`` is the largest of them, what ``torch.cuda.max_memory_allocated`` measures over the stage."""

    stage: str
    knobs: Any
    phases: dict[str, dict[str, Any]]
    #: parameters the optimiser updates (distill: every unit, all ranks together)
    trainable: int = 0
    constants: dict[str, int] = field(default_factory=dict)
    #: the breakdown rows this stage can have, in print order
    rows: tuple[str, ...] = DISTILL_ROWS
    #: how the stage was counted ("real code on meta" / "modelled ..."), and what it leaves out
    counted: str = ""
    notes: list[str] = field(default_factory=list)
    #: where the peak lives: "gpu" or "host"
    memory: str = "gpu"
    #: per row, the most it held at any moment of the stage (:meth:`LiveBytes.row_peaks`)
    row_peaks: dict[str, int] = field(default_factory=dict)

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

    def fits(self, limit_bytes: int) -> bool:
        return self.peak_bytes <= limit_bytes


# --------------------------------------------------------------------------------------------- counting
class LiveBytes(TorchDispatchMode):
    """Live bytes of tensors on ``device`` (module doc). ``phase`` names what allocates now; :meth:`name` gives a
    live tensor its final role; :meth:`peak` and :meth:`breakdown` read the event stream afterwards."""

    def __init__(self, device: str = "meta", round_to: int = ALLOC_ROUND):
        super().__init__()
        self.device = device
        self.round_to = round_to
        self.phase = "other"
        self.events: list[tuple[int, int, str]] = []
        self.sizes: dict[int, int] = {}
        self.born: dict[int, str] = {}
        self.role: dict[int, str] = {}
        self._serial: dict[int, int] = {}  # id(storage object) -> serial, while the storage lives
        self._next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        name = getattr(func, "__name__", "")
        if name.startswith(("all_gather_copy_in", "split_with_sizes_copy")) and "fsdp" in str(func):
            # FSDP2's all-gather buffer and the unsharded (bf16) parameters it is copied out into
            self.name([*tree_leaves(out), *tree_leaves(kwargs.get("out"))] if name.startswith("split") else
                      tree_leaves(out), "gathered plug weights")
        return out

    def track(self, t: torch.Tensor, role: str | None = None) -> None:
        """Register ``t``'s storage if it is new and on the counted device; ``role`` names it (see :meth:`name`)."""
        local = getattr(t, "_local_tensor", None)  # a DTensor holds its local shard, nothing else
        if local is not None:
            t = local
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

    def resized(self, t: torch.Tensor) -> None:
        """``t``'s storage was resized in place (FSDP2 frees and re-allocates its unsharded parameters with
        ``storage.resize_``, which no dispatch mode sees): record the difference as one event."""
        st = t.untyped_storage()
        serial = self._serial.get(id(st))
        if serial is None:
            self.track(t)
            return
        n = st.nbytes()
        n = -(-n // self.round_to) * self.round_to if n else 0
        if n != self.sizes[serial]:
            self.events.append((serial, n - self.sizes[serial], self.phase))
            self.sizes[serial] = n

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

    def row_peaks(self) -> dict[str, int]:
        """The largest number of bytes each row of :data:`ROWS` held at any moment (not only at the peak)."""
        row_of: dict[int, str] = {}
        now = dict.fromkeys(ROWS, 0)
        best = dict.fromkeys(ROWS, 0)
        for serial, n, _ in self.events:
            if serial not in row_of:
                role = self.role.get(serial)
                row_of[serial] = role if role is not None else _BORN_ROLE.get(self.born[serial], "transient")
            row = row_of[serial]
            now[row] += n
            best[row] = max(best[row], now[row])
        return best

    def breakdown(self, upto: int) -> dict[str, int]:
        """Bytes per row of :data:`ROWS` live after the first ``upto`` events."""
        live: dict[int, int] = {}
        for serial, n, _ in self.events[:upto]:
            live[serial] = live.get(serial, 0) + n
            if not live[serial]:
                del live[serial]
        rows = dict.fromkeys(ROWS, 0)
        for serial, n in live.items():
            role = self.role.get(serial)
            if role is None:
                role = _BORN_ROLE.get(self.born[serial], "transient")
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
                    local = getattr(p, "_local_tensor", p)  # bitsandbytes on an FSDP2 shard: its local numel
                    if local.numel() >= self.MIN_8BIT_SIZE:
                        blocks = math.ceil(local.numel() / self.BLOCK)
                        st["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        st["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        st["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)
                        st["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)
                    else:
                        st["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        st["state2"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
        return None


# --------------------------------------------------------------------------------------------- sharding on meta
@contextlib.contextmanager
def fake_mesh(world: int, meta: bool):
    """A 1-D device mesh of ``world`` ranks over torch's fake process group (this process is rank 0; collectives
    allocate their outputs and move no data), and, for ``meta``, FSDP2 adapted to meta modules
    (:func:`_fsdp_on_meta`). The process group is torn down on exit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PPCLError("resource planner: a process group is already initialised in this process; the planner "
                        "runs FSDP2 over its own fake one (run it in a process of its own)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with _fsdp_on_meta() if meta else contextlib.nullcontext():
            yield DeviceMesh("cpu", torch.arange(world))
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _fsdp_on_meta():
    """FSDP2 (torch 2.13) on meta parameters: its lazy-init check that no parameter is left on meta is skipped, and a
    meta device gets the host's stream / event handles (no-ops), so the all-gathers, the reduce-scatters and the
    sharded optimiser run as they do on a GPU, allocating meta tensors. :func:`_meta_device` then points each
    sharded module's device at meta (FSDP2 takes it from the mesh, which is a host mesh here). Restored on exit."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    handle = group._get_device_handle
    saved = (group.FSDPParamGroup._validate_no_meta_params, group._get_device_handle, coll._get_device_handle)

    def meta_handle(device_type: str):
        return torch.cpu if device_type == "meta" else handle(device_type)

    group.FSDPParamGroup._validate_no_meta_params = lambda self: None
    group._get_device_handle = coll._get_device_handle = meta_handle
    try:
        yield
    finally:
        group.FSDPParamGroup._validate_no_meta_params, group._get_device_handle, coll._get_device_handle = saved


@contextlib.contextmanager
def _fsdp_counted(meter: LiveBytes):
    """FSDP2's in-place storage frees / re-allocations (``free_storage`` / ``alloc_storage``: ``storage.resize_``,
    invisible to a dispatch mode) reported to ``meter``; restored on exit."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param as fparam
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    saved = (fparam.alloc_storage, fparam.free_storage, group.alloc_storage)

    def alloc(tensor):
        saved[0](tensor)
        meter.resized(tensor)

    def free(tensor):
        saved[1](tensor)
        meter.resized(tensor)

    fparam.alloc_storage = group.alloc_storage = alloc
    fparam.free_storage = free
    try:
        yield
    finally:
        fparam.alloc_storage, fparam.free_storage, group.alloc_storage = saved


def _meta_device(modules) -> None:
    meta = torch.device("meta")
    for m in modules:
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        if state is None:
            continue
        state._device = meta
        for pg in [state._fsdp_param_group] if state._fsdp_param_group is not None else []:
            pg.device = meta
            for fp in pg.fsdp_params:
                fp.device = meta


# --------------------------------------------------------------------------------------------- distill
def example_batch(adapter, knobs, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A cache-shaped batch (what ``ppcl encode`` writes) of zeros for ``knobs``: latents ``(B, C, h, w)`` at the
    family's VAE factor 8, ``prompt_embeds`` ``(B, text_tokens, joint_attention_dim)`` and, for a transformer with a
    pooled projection, ``pooled_prompt_embeds`` ``(B, pooled_projection_dim)``; floats in ``dtype``."""
    from types import SimpleNamespace

    cfg = adapter.transformer.config
    if knobs.resolution % 16 or knobs.resolution < 16:
        raise PPCLError(f"--resolution {knobs.resolution}: must be a positive multiple of 16 pixels (2x2 patches of "
                        "the 8x downsampled latents)")
    c, h, w = adapter.latent_shape(SimpleNamespace(transformer=adapter.transformer, vae_scale_factor=8),
                                   knobs.resolution, knobs.resolution)
    b = knobs.batch_size
    batch = {
        "latents": torch.zeros(b, c, h, w, device=device, dtype=dtype),
        "prompt_embeds": torch.zeros(b, knobs.text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
    }
    if getattr(cfg, "pooled_projection_dim", None):
        batch["pooled_prompt_embeds"] = torch.zeros(b, cfg.pooled_projection_dim, device=device, dtype=dtype)
    return batch


def _distill_steps(adapter, plan, knobs: DistillKnobs, meter: LiveBytes, steps: int = STEPS) -> int:
    """The distill design of the module doc from the teacher's load to the end of ``steps`` optimiser steps, on
    ``adapter``'s device (meta: the GPU modelled; cpu: a real run, fp32), counted by ``meter``. The ONLY function
    of this module that calls into ``ppcl.distill``: it follows the training loop step by step and calls its public
    pieces (check_plan_family, build_units, unit_table, teacher_pass, unit_step_losses, output_loss_units,
    lr_factor, make_optimizer) and the sharding engine (FSDP2 over a fake process group of ``knobs.world`` ranks).

    Returns the number of trainable parameters (all ranks). The teacher is left as it came (dtype,
    requires_grad) so one model serves several calls."""
    from ppcl.calibration import noise_batch
    from ppcl.distill import DistillSettings, build_units, check_plan_family, lr_factor, make_optimizer, \
        output_loss_units, shard_units, teacher_pass, unit_step_losses, unit_table
    from ppcl.distill.losses import output_loss, student_forward
    from ppcl.plugs import LOSS_EPS, freeze

    transformer = adapter.transformer
    device = next(transformer.parameters()).device
    modelled = device.type == "meta"
    bf16 = knobs.mixed_precision == "bf16"
    settings = DistillSettings(batch_size=knobs.batch_size, gradient_checkpointing=knobs.gradient_checkpointing,
                               mixed_precision=knobs.mixed_precision, use_8bit_adam=knobs.adam_8bit,
                               resolution=knobs.resolution, output_loss_weight=knobs.output_loss_weight)
    check_plan_family(plan, adapter, "plan resources")
    # meta: CUDA's autocast (bf16) and attention kernels (always) are modelled; a real device runs its own
    autocast = (lambda: CudaAutocast(torch.bfloat16 if bf16 else None)) if modelled else contextlib.nullcontext
    if bf16 and not modelled:
        raise PPCLError(f"resource planner: mixed precision bf16 is modelled on the meta device only, not on {device}")
    teacher_dtype = torch.bfloat16 if bf16 else torch.float32
    dtype0 = next(transformer.parameters()).dtype
    grads0 = {id(p): p.requires_grad for p in transformer.parameters()}
    full = settings.output_loss_weight > 0
    try:
        with fake_mesh(knobs.world, modelled) as mesh, _fsdp_counted(meter), meter:
            # the teacher straight to the device in its compute dtype (no fp32 copy), frozen
            with meter.during("load"):
                freeze(transformer)
                if transformer.dtype != teacher_dtype:
                    transformer.to(teacher_dtype)
                meter.name([*transformer.parameters(), *transformer.buffers()], "teacher weights")
            with meter.during("units"):
                units = build_units(adapter, plan, settings.init)
                if not units:
                    raise PPCLError("the plan has no intervals and no width ops: nothing to distill")
                table = unit_table(units).to(device)
                meter.name(table.parameters(), "plug weights")
                shard_units(units, table, mesh, torch.bfloat16 if bf16 else None)
                if modelled:
                    _meta_device(table.modules())
                params = [p for p in table.parameters() if p.requires_grad]
                meter.name(table.parameters(), "plug weights")
                if knobs.adam_8bit and modelled:
                    optimizer = Adam8bitMemory(params, lr=settings.lr, weight_decay=settings.weight_decay)
                else:
                    optimizer = make_optimizer(params, settings, device)
                    # torch picks the foreach AdamW for CUDA tensors; meta (and CPU) tensors would get the loop
                    for g in optimizer.param_groups:
                        g["foreach"] = knobs.foreach_adamw
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda s: lr_factor(s, settings.warmup_steps, settings.steps))
                trainable = sum(p.numel() for p in params)

            def noised(step: int) -> dict[str, Any]:
                batch = example_batch(adapter, knobs, device, teacher_dtype)
                g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 7_919)
                return noise_batch(adapter, {}, batch, scheme=settings.timesteps, generator=g,
                                   guidance=settings.guidance).model_inputs

            # The least-squares init of width projections (one no-grad teacher pass whose normal equations live on
            # the host) is not run: on the device it holds less than a training step (no gradients, no activations).
            table.train()
            with meter.during("optimizer"):
                # Every step after the first starts with the optimiser states in place: a step on zero gradients
                # sets them up (its own temporaries are those of every optimiser step) without a forward.
                for p in params:
                    p.grad = torch.zeros_like(p)
                meter.name([p.grad for p in params], "plug gradients")
                optimizer.step()
                meter.name([v for st in optimizer.state.values() for v in st.values()], "optimizer states")
            for step in range(1, steps + 1):
                with meter.during("inputs"):
                    inputs = noised(step)
                with meter.during("teacher pass"), autocast():
                    calls, outs, teacher_out = teacher_pass(adapter, inputs, units, full=full)
                optimizer.zero_grad(set_to_none=True)
                # each unit: forward on the captured teacher states, loss, its own backward (only its activations
                # alive); torch's checkpoint re-enters the forward's autocast to recompute, so the mode stays on
                for u in units:
                    with meter.during("forward"), autocast():
                        loss = sum(unit_step_losses(u, calls, outs, LOSS_EPS, settings.gradient_checkpointing)
                                   .values())
                    with meter.during("backward"), autocast():
                        loss.backward()
                    del loss
                if full:
                    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 7_919 + 104_729)
                    placed = output_loss_units(units, settings.output_loss_keep, g)
                    with meter.during("forward"), autocast():
                        student_out, _ = student_forward(adapter, inputs, placed, capture=False)
                        loss = settings.output_loss_weight * output_loss(student_out, teacher_out)
                    with meter.during("backward"), autocast():
                        loss.backward()
                    del loss, student_out
                meter.name([p.grad for p in params], "plug gradients")
                del calls, outs, teacher_out, inputs
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


def _phases(meter: LiveBytes, names: tuple[str, ...], group_of) -> dict[str, dict[str, Any]]:
    """Per reported phase: its peak (over the events of the meter phases ``group_of(name)``) and breakdown."""
    out = {}
    for name in names:
        peak, at = meter.peak(group_of(name))
        out[name] = {"tensor_peak": peak, "breakdown": meter.breakdown(at)}
    return out


def _device_constants(est: MemoryEstimate) -> dict[str, int]:
    return {"cuda context": CUDA_CONTEXT_BYTES, "allocator slack": int(ALLOCATOR_SLACK * est.tensor_peak)}


def distill_memory(adapter, plan, knobs: DistillKnobs | None = None, *, constants: bool = True,
                   round_to: int | None = None) -> MemoryEstimate:
    """Per-GPU memory of ``ppcl distill`` (the sharded design) for ``plan`` on ``adapter``'s model (meta: CUDA
    modelled).

    ``constants``: add :data:`CUDA_CONTEXT_BYTES` and :data:`ALLOCATOR_SLACK` (off for a CPU measurement);
    ``round_to``: allocation rounding, default :data:`ALLOC_ROUND` on meta (the CUDA allocator's), 1 on a real
    device (exact bytes)."""
    knobs = knobs or DistillKnobs()
    device = next(adapter.transformer.parameters()).device
    # the caching allocator's block rounding is a CUDA matter: a CPU run counts exact bytes
    meter = LiveBytes(device.type, round_to or (ALLOC_ROUND if device.type == "meta" else 1))
    trainable = _distill_steps(adapter, plan, knobs, meter)
    seen = {ph for _, _, ph in meter.events}
    groups = {"load": {"load"}, "setup": {"units"}, "training": seen - {"load", "units"}}
    est = MemoryEstimate("distill", knobs, _phases(meter, PHASES, groups.get), trainable,
                         counted="real code on meta: the loss path, FSDP2 and AdamW run on meta tensors",
                         row_peaks=meter.row_peaks())
    if knobs.world > 1:
        est.notes.append(f"plug weights, gradients and optimiser states are FSDP2 shards (1/{knobs.world}, rank 0); "
                         "the bf16 teacher is replicated on every GPU")
    if constants:
        est.constants = _device_constants(est)
    return est


def candidate_knobs(knobs: DistillKnobs, max_gpus: int = 8) -> list[DistillKnobs]:
    """Settings to try when ``knobs`` does not fit, cheapest first: the two switches that keep the training the
    same (gradient checkpointing: more compute; 8-bit AdamW: other optimiser numerics), then more GPUs per node (the
    sharded state shrinks, up to ``max_gpus``; both switches on), then smaller batches (halved down to 1), then
    smaller images (3/4, then halves, down to 256 px, batch 1)."""
    out: list[DistillKnobs] = []
    rep = dataclasses.replace
    for ck, a8 in ((True, False), (False, True), (True, True)):
        if (ck or knobs.gradient_checkpointing, a8 or knobs.adam_8bit) != (knobs.gradient_checkpointing,
                                                                           knobs.adam_8bit):
            out.append(rep(knobs, gradient_checkpointing=ck or knobs.gradient_checkpointing,
                           adam_8bit=a8 or knobs.adam_8bit))
    both = rep(knobs, gradient_checkpointing=True, adam_8bit=True)
    g = knobs.gpus
    while g < max_gpus:
        g = min(max_gpus, g * 2)
        out.append(rep(both, gpus=g))
    both = rep(both, gpus=max(knobs.gpus, g))
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
    """Bytes every training step holds at once, whatever the batch or image size: the replicated teacher and this
    rank's shards of the fp32 plug weights, gradients and optimiser states (8 or, 8-bit, at least 2 bytes per
    parameter), plus the constant terms."""
    held = teacher_bytes + trainable * (4 + 4 + (2 if knobs.adam_8bit else 8)) // knobs.world
    return held + CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * held)


# --------------------------------------------------------------------------------------------- probe
@dataclass
class StageKnobs:
    """The data shape of a probe or evaluate run (the other settings are the stage's defaults)."""

    batch_size: int = 4
    resolution: int = 1024
    text_tokens: int = 512

    def label(self) -> str:
        return f"batch {self.batch_size}, {self.resolution}x{self.resolution}"


def _teacher_on(meter: LiveBytes, transformer, dtype: torch.dtype) -> None:
    with meter.during("load"):
        if transformer.dtype != dtype:
            transformer.to(dtype)
        meter.name([*transformer.parameters(), *transformer.buffers()], "teacher weights")


@contextlib.contextmanager
def _bf16_teacher_counted(adapter, stage: str):
    """A fresh meter over the meta transformer of ``adapter``, the teacher moved to bf16 under it (the "load"
    phase); yields ``(meter, device)``; the transformer's dtype is restored on exit. ``stage`` names the command in
    the error for a transformer that is not on meta."""
    transformer = adapter.transformer
    device = next(transformer.parameters()).device
    if device.type != "meta":
        raise PPCLError(f"resource planner: {stage} is counted on the meta device only, not on {device}")
    meter = LiveBytes("meta")
    dtype0 = transformer.dtype
    try:
        with meter:
            _teacher_on(meter, transformer, torch.bfloat16)
            yield meter, device
    finally:
        transformer.to(dtype0)


def probe_memory(adapter, knobs: StageKnobs | None = None) -> MemoryEstimate:
    """Per-GPU memory of ``ppcl probe`` (bf16 teacher on the GPU, the probe settings' defaults) on one batch: the
    real :func:`ppcl.probe.probe_transformer` on meta tensors. Memory is the same for every forward after the first
    (the moment banks are fixed at their first use; per-forward states are released), so one forward is the run's
    peak except the final solve (``k x k`` float64 systems, small next to the forward)."""
    from ppcl.probe import probe_transformer
    from ppcl.settings import ProbeSettings

    knobs = knobs or StageKnobs()
    s = ProbeSettings()
    with _bf16_teacher_counted(adapter, "the probe") as (meter, device):
        with meter.during("probe"), CudaAutocast(None):
            batch = example_batch(adapter, knobs, device, torch.bfloat16)
            acc, _ = probe_transformer(adapter, {}, [batch], timesteps=1, seed=s.seed, probe_dim=s.probe_dim,
                                       max_interval=s.max_interval, ridge=s.ridge, hsic_tokens=s.hsic_tokens)
            stats = [acc.proj] + [t for b in acc.banks.values() for t in (
                *b.sum, *b.gram, *(c for w in b.cross for c in w), b.cos_sum, b.ang_sum, b.cos_n, b.hsic_sum,
                b.hsic_n)]
            meter.name(stats, "probe statistics")
            k = acc.k
        del acc, batch, stats
    est = MemoryEstimate("probe", knobs, _phases(meter, ("load", "probe"), lambda n: {n}),
                         rows=("teacher weights", "probe statistics", "transient"),
                         counted="real code on meta: ppcl.probe.probe_transformer (bf16 teacher, float64 statistics)")
    est.notes.append(f"moments in a {k}-dim projection (probe_dim {s.probe_dim}); text encoders not loaded (the "
                     "pipeline's probe step reads the latent cache)")
    est.constants = _device_constants(est)
    return est


# --------------------------------------------------------------------------------------------- export
@dataclass
class ExportKnobs:
    #: bytes per element of the written student (the teacher's dtype, bf16 for the released teachers)
    out_bytes: int = 2

    def label(self) -> str:
        return f"{8 * self.out_bytes}-bit weights, one tensor copied at a time"


def export_memory(adapter, plan, knobs: ExportKnobs | None = None) -> MemoryEstimate:
    """Host RAM of the streaming ``ppcl export`` (modelled, see the module doc; exact sizes from the plan): the
    largest tensor copied (a tensor of a trained unit read from plugs.safetensors in fp32 plus its cast copy; a
    teacher tensor read and written in the output dtype), and the process."""
    knobs = knobs or ExportKnobs()
    student = plan.params.student
    trained_lists = {}
    for s in plan.plug_sources:
        trained_lists.setdefault(adapter.locate(s)[0], set()).add(adapter.locate(s)[1])
    for op in _width_dicts(plan):  # width units are exported block by block too
        members = [op["block"]] if "block" in op else range(op["interval"][0] + 1, op["interval"][1] + 1)
        for k in members:
            trained_lists.setdefault(adapter.locate(int(k))[0], set()).add(adapter.locate(int(k))[1])
    trained = [p.numel() for name, idx in trained_lists.items() for i in idx
               for p in getattr(adapter.transformer, name)[i].parameters()]
    teacher = [p.numel() for p in adapter.transformer.parameters()]
    copied = max([n * (4 + knobs.out_bytes) for n in trained] + [n * 2 * knobs.out_bytes for n in teacher])
    rows = {"tensor being copied": copied, "process": HOST_PROCESS_BYTES}
    est = MemoryEstimate("export", knobs, {"export": {"tensor_peak": sum(rows.values()), "breakdown": rows}},
                         rows=tuple(rows), memory="host",
                         counted="modelled from the plan's exact sizes (streaming export: host RAM, no GPU)")
    est.notes.append(f"student {student:,} parameters = {student * knobs.out_bytes / 1e9:.1f} GB written")
    return est


def _width_dicts(plan) -> list[dict[str, Any]]:
    out = []
    for w in getattr(plan, "width", []) or []:
        out.append(w.model_dump() if hasattr(w, "model_dump") else dict(w))
    return out


# --------------------------------------------------------------------------------------------- evaluate
def component_bytes(model: str | Path, dtype_bytes: int = 2) -> dict[str, int] | None:
    """Bytes of a pipeline folder's components other than the transformer, loaded in a ``dtype_bytes`` float
    dtype, read from the safetensors headers only (no weights read); None when ``model`` is no pipeline folder."""
    root = Path(model)
    if not (root / "model_index.json").is_file():
        return None
    out: dict[str, int] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "transformer"):
        total = 0
        for f in sorted(sub.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                numel = math.prod(v["shape"])
                total += numel * (dtype_bytes if v["dtype"] in ("F32", "F16", "BF16", "F64") else
                                  (v["data_offsets"][1] - v["data_offsets"][0]) // max(1, numel))
        if total:
            out[sub.name] = total
    return out


def evaluate_memory(adapter, knobs: StageKnobs | None = None, model: str | Path | None = None) -> MemoryEstimate:
    """Per-GPU memory of ``ppcl evaluate`` for its largest pipeline, the teacher: the bf16 transformer and one
    no-grad denoising forward at ``2 x batch`` counted on meta tensors, plus the pipeline's other components
    (:func:`component_bytes`) when ``model`` is a pipeline folder."""
    from ppcl.calibration import noise_batch

    knobs = knobs or StageKnobs()
    with _bf16_teacher_counted(adapter, "evaluate") as (meter, device):
        with meter.during("denoise"), CudaAutocast(None), torch.no_grad():
            cfg = dataclasses.replace(knobs, batch_size=2 * knobs.batch_size)
            inputs = noise_batch(adapter, {}, example_batch(adapter, cfg, device, torch.bfloat16),
                                 generator=torch.Generator().manual_seed(0)).model_inputs
            out = adapter.forward(inputs)
            del out, inputs
    est = MemoryEstimate("evaluate", knobs, _phases(meter, ("load", "denoise"), lambda n: {n}),
                         rows=("teacher weights", "transient"),
                         counted="real transformer forward on meta (no grad, 2 x batch for guidance); other "
                                 "components from the pipeline's safetensors headers")
    est.constants = _device_constants(est)
    comps = component_bytes(model) if model is not None else None
    if comps is None:
        est.notes.append("text encoders and VAE NOT counted: --model is not a pipeline folder (a bare config names "
                         "none); Qwen-Image's text encoder alone is ~16 GB in bf16")
    else:
        for name, n in comps.items():
            est.constants[f"{name} (bf16)"] = n
    est.notes.append("not counted: VAE decoding activations, the CLIP / FID feature extractors")
    return est


# --------------------------------------------------------------------------------------------- the report
def _search(est: MemoryEstimate, limit: int, candidates, run, low=None) -> tuple[MemoryEstimate | None, list]:
    """Try ``candidates`` (cheapest first) until one fits; ``low(cand)`` is a lower bound that spares the run."""
    tried: list[dict[str, Any]] = []
    if est.fits(limit):
        return None, tried
    for cand in candidates:
        bound = low(cand) if low is not None else None
        if bound is not None and bound > limit:
            tried.append({"settings": dataclasses.asdict(cand), "peak_bytes": None, "lower_bound_bytes": bound,
                          "fits": False})
            continue
        e = run(cand)
        tried.append({"settings": dataclasses.asdict(cand), "peak_bytes": e.peak_bytes, "fits": e.fits(limit)})
        if e.fits(limit):
            return e, tried
    return None, tried


def _halved(knobs):
    out, b = [], knobs.batch_size
    while b > 1:
        b //= 2
        out.append(dataclasses.replace(knobs, batch_size=b))
    return out


#: the stages the planner reports, in pipeline order
STAGES = ("distill", "probe", "export", "evaluate")


def plan_resources(adapter, plan, *, gpus: int = 1, nodes: int = 1, gpu_memory_gib: float = 80.0,
                   knobs: DistillKnobs | None = None, search: bool = True, stages: tuple[str, ...] = STAGES,
                   probe: StageKnobs | None = None, evaluate: StageKnobs | None = None,
                   export: ExportKnobs | None = None, host_memory_gib: float = 8.0,
                   model: str | Path | None = None) -> dict[str, Any]:
    """The planner's report (the ``--json`` object): per stage ``peak_bytes``, ``fits``, the breakdown, how it was
    counted, and the cheapest settings that fit when the asked ones do not (``None`` when nothing offered fits).
    ``knobs.gpus`` / ``nodes`` are set from ``gpus`` / ``nodes``; export is checked against ``host_memory_gib``."""
    if gpus < 1 or nodes < 1:
        raise PPCLError(f"--gpus and --nodes must be >= 1 (got {gpus}, {nodes})")
    if not gpu_memory_gib > 0:
        raise PPCLError(f"--gpu-memory must be positive GiB (got {gpu_memory_gib})")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise PPCLError(f"--stages: unknown stage(s) {', '.join(sorted(unknown))} (known: {', '.join(STAGES)})")
    knobs = dataclasses.replace(knobs or DistillKnobs(), gpus=gpus, nodes=nodes)
    limit = int(gpu_memory_gib * GIB)
    host = int(host_memory_gib * GIB)
    report: dict[str, Any] = {
        "model": {"family": adapter.family, "blocks": adapter.num_blocks, "parameters": adapter.total_parameters()},
        "plan": {"intervals": [list(iv) for iv in plan.intervals], "width_ops": len(plan.width),
                 "student_parameters": plan.params.student},
        "gpus": gpus, "nodes": nodes, "gpu_memory_bytes": limit, "host_memory_bytes": host,
        "sharding": f"FSDP2 over {gpus * nodes} rank(s): plug weights, gradients and AdamW states are 1/"
                    f"{gpus * nodes} shards per GPU; the bf16 teacher is replicated on every GPU",
        "global_batch_size": knobs.batch_size * gpus * nodes,
        "stages": {},
    }
    for stage in [s for s in STAGES if s in stages]:
        if stage == "distill":
            est = distill_memory(adapter, plan, knobs)
            report["plan"]["trainable_parameters"] = est.trainable
            teacher = est.phases["training"]["breakdown"]["teacher weights"]
            fit, tried = _search(est, limit, candidate_knobs(knobs) if search else [],
                                 lambda k: distill_memory(adapter, plan, k),
                                 lambda k: lower_bound(teacher, est.trainable, k))
        elif stage == "probe":
            est = probe_memory(adapter, probe)
            fit, tried = _search(est, limit, _halved(est.knobs) if search else [], lambda k: probe_memory(adapter, k))
        elif stage == "evaluate":
            est = evaluate_memory(adapter, evaluate, model)
            fit, tried = _search(est, limit, _halved(est.knobs) if search else [],
                                 lambda k: evaluate_memory(adapter, k, model))
        else:
            est = export_memory(adapter, plan, export)  # no setting changes it: one tensor at a time
            fit, tried = _search(est, host, [], lambda k: export_memory(adapter, plan, k))
        report["stages"][stage] = _stage_json(est, host if est.memory == "host" else limit, fit, tried)
    return report


def _stage_json(est: MemoryEstimate, limit: int, fit: MemoryEstimate | None, tried: list) -> dict[str, Any]:
    return {
        "memory": est.memory,
        "counted": est.counted,
        "settings": dataclasses.asdict(est.knobs),
        "peak_bytes": est.peak_bytes,
        "limit_bytes": limit,
        "fits": est.fits(limit),
        "tensor_peak_bytes": est.tensor_peak,
        "peak_phase": est.peak_phase,
        "rows": list(est.rows),
        "phases": {k: {"tensor_peak_bytes": v["tensor_peak"], "breakdown_bytes": v["breakdown"]}
                   for k, v in est.phases.items()},
        "constants_bytes": est.constants,
        "trainable_parameters": est.trainable,
        "notes": est.notes,
        "fit_search": tried,
        "cheapest_fit": None if fit is None else {"settings": dataclasses.asdict(fit.knobs),
                                                   "peak_bytes": fit.peak_bytes},
    }


#: Column titles of the phases in the printed table.
_PHASE_TITLES = {"load": "load (bf16 teacher)", "setup": "units built + sharded", "training": "training step",
                 "probe": "probe forward", "denoise": "denoising forward", "export": "streaming export"}
_KNOBS = {"distill": DistillKnobs, "probe": StageKnobs, "evaluate": StageKnobs, "export": ExportKnobs}


def format_resources(report: dict[str, Any]) -> str:
    """The human-readable table of :func:`plan_resources`' report."""
    m, p = report["model"], report["plan"]
    lines = [
        f"{m['family']}: {m['blocks']} blocks, {m['parameters']:,} parameters; plan: {len(p['intervals'])} "
        f"intervals, {p['width_ops']} width ops, student {p['student_parameters']:,}",
        f"{report['gpus']} GPU(s) x {report['nodes']} node(s), {report['gpu_memory_bytes'] / GIB:.1f} GiB each; "
        f"global batch {report['global_batch_size']}",
        f"sharding: {report['sharding']}",
    ]
    width = 26
    for stage, s in report["stages"].items():
        k = _KNOBS[stage](**s["settings"])
        names = list(s["phases"])
        where = "host RAM" if s["memory"] == "host" else "per GPU"
        limit = s["limit_bytes"] / GIB
        extra = f"; {s['trainable_parameters']:,} trainable" if s["trainable_parameters"] else ""
        lines += ["", f"{stage} {where} ({k.label()}{extra}), GiB  [{s['counted']}]:",
                  f"  {'':<36}" + "".join(f"{_PHASE_TITLES.get(n, n):>{width}}" for n in names)]
        for row in s["rows"]:
            lines.append(f"  {row:<36}" + "".join(f"{s['phases'][n]['breakdown_bytes'][row] / GIB:>{width}.2f}"
                                                  for n in names))
        total = "= tensor peak (max_memory_allocated)" if s["memory"] == "gpu" else "= sum"
        lines.append(f"  {total:<36}" + "".join(f"{s['phases'][n]['tensor_peak_bytes'] / GIB:>{width}.2f}"
                                                for n in names))
        for name, n in s["constants_bytes"].items():
            lines.append(f"  {'+ ' + name:<36}{n / GIB:>{width}.2f}")
        lines.append(f"  {'= peak (' + s['peak_phase'] + ')':<36}{s['peak_bytes'] / GIB:>{width}.2f}   "
                     f"({s['peak_bytes'] / 1e9:.1f} GB) {'fits' if s['fits'] else 'does NOT fit'} in {limit:.1f} GiB")
        lines += [f"  note: {n}" for n in s["notes"]]
        if not s["fits"]:
            for t in s["fit_search"]:
                got = (f"{t['peak_bytes'] / GIB:.1f} GiB" if t["peak_bytes"] is not None else
                       f">= {t['lower_bound_bytes'] / GIB:.1f} GiB (teacher, weight / gradient / optimizer shards)")
                lines.append(f"  tried {_KNOBS[stage](**t['settings']).label()}: {got}"
                             f"{'  <- cheapest that fits' if t['fits'] else ''}")
            if s["cheapest_fit"] is None:
                lines.append("  nothing the planner offers fits: more GPUs or a larger device")
    return "\n".join(lines)
