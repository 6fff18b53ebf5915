"""Train the reference teacher: a small FLUX-family pipeline that draws ``ppcl synth`` captions at 32 px.

``python -m ppcl.bench.teacher --out DIR --seed 0`` reproduces ``ppcl/bench/assets/reference-teacher/``.

What it builds (every part a stock diffusers / transformers class, so ``DiffusionPipeline.from_pretrained``
loads it and the stock ``FluxPipeline.__call__`` generates with it):

- tokenizers built locally from the synth vocabulary: ``CLIPTokenizer`` (BPE vocab.json + merges.txt, every
  caption word one token, letters as fall-back) and ``T5TokenizerFast`` over a ``tokenizers`` Unigram model.
- text encoders: a tiny ``CLIPTextModel`` (pooled output) and a tiny ``T5EncoderModel``, random-initialised and
  FROZEN. The synth captions form a finite set (288 captions); the script checks that every pair of captions
  gets clearly different embeddings, and the transformer learns from those outputs. Freezing keeps the
  encode cache of issue 4 valid and costs nothing to train.
- ``AutoencoderKL`` with 3 levels (x4 down-sampling, 4 latent channels), trained first for a few minutes on
  synth images (L1 + tiny KL); ``scaling_factor`` / ``shift_factor`` set from the latent statistics so the
  transformer sees unit-variance latents, as FLUX's VAE does.
- ``FluxTransformer2DModel``: 6 dual-stream + 10 single-stream blocks (16 in all), width 64 (2 heads x 32),
  no guidance embedding. A 32 px image is an 8x8x4 latent, packed 2x2 into 16 tokens of 16 channels.
- ``FlowMatchEulerDiscreteScheduler`` with shift 1 and no dynamic shifting (16 image tokens: nothing to shift).

Training: rectified flow as in diffusers' FLUX scripts: x_t = (1 - sigma) x0 + sigma * noise, target
noise - x0, sigma from a logit-normal(0, 1); the transformer gets ``timestep = sigma`` (the pipeline's t/1000
convention) and latents packed with the pipeline's own ``_pack_latents`` / ``_prepare_latent_image_ids``.
10% of the captions are replaced by the empty caption so ``true_cfg_scale`` with ``negative_prompt=""`` works.
Weights saved are an EMA (decay 0.999) of the trained weights.

Generation convention (recorded in ``ppcl_reference.json``): ``height=width=32``, ``max_sequence_length=16``
(the T5 length it was trained with; the FLUX default of 512 would feed 500 unseen padding tokens).

Runs on CPU with ``torch.set_num_threads(1)`` by default; the pipeline is saved every ``--save-every`` steps so
a partial result always exists. ``--max-minutes`` stops early; the record then gives the command that
reproduces the stop deterministically (``--stop-after N``, same lr schedule). ``--init DIR`` continues from a
saved teacher (VAE and EMA transformer, fresh optimizer and warm-up) as a new *stage*; ``ppcl_reference.json``
keeps every stage's settings, steps and CPU seconds, and ``command`` chains the stages' commands.

``--evaluate-only`` (and the end of a training run, when the judge exists) scores generations of a fixed
prompt/seed set with the judge (:func:`evaluate`) and stores the result under ``judge`` in the record.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppcl.data import synth

# Every word a synth caption uses; tokenizers give each one a single token.
WORDS: tuple[str, ...] = (
    ("a", "two", "to", "the", "left", "of", "above")
    + synth.SHAPES
    + tuple(f"{s}s" for s in synth.SHAPES)
    + synth.COLOUR_NAMES
)
MAX_SEQUENCE_LENGTH = 16
ASSETS_JUDGE = Path(__file__).parent / "assets" / "judge.safetensors"
RESOLUTION = 32

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,
    num_layers=6,
    num_single_layers=10,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=RESOLUTION,
)


def all_captions() -> list[str]:
    """Every caption synth can produce (288), in a fixed order."""
    caps = []
    for s in synth.SHAPES:
        for c in synth.COLOUR_NAMES:
            caps.append(f"a {c} {s}")
            caps.append(f"two {c} {s}s")
    for s1 in synth.SHAPES:
        for c1 in synth.COLOUR_NAMES:
            for s2 in synth.SHAPES:
                for c2 in synth.COLOUR_NAMES:
                    if (s1, c1) != (s2, c2):
                        caps.append(f"a {c1} {s1} to the left of a {c2} {s2}")
                        caps.append(f"a {c1} {s1} above a {c2} {s2}")
    return caps


def build_tokenizers(tmp: Path):
    """CLIPTokenizer and T5TokenizerFast over ``WORDS`` (letters as fall-back), built without any download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizer, T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for ch in letters:
        add(ch)
        add(ch + "</w>")
    ranks: dict[tuple[str, str], int] = {}

    def bpe(syms: list[str]) -> list[str]:
        # The CLIP tokenizer's merge loop: repeatedly merge the adjacent pair of lowest rank.
        while len(syms) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(syms, syms[1:]))]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            syms = syms[:i] + [syms[i] + syms[i + 1]] + syms[i + 2 :]
        return syms

    for w in WORDS:
        # CLIP BPE starts from letters with "</w>" on the last one. Merges learnt for earlier words may split
        # this one differently, so run the real merge loop and append (lowest priority) the merge still
        # missing, until the word is one token; earlier words are single tokens already and stay unchanged.
        syms = bpe(list(w[:-1]) + [w[-1] + "</w>"])
        while len(syms) > 1:
            ranks[(syms[0], syms[1])] = len(ranks)
            merges.append(f"{syms[0]} {syms[1]}")
            add(syms[0] + syms[1])
            syms = bpe(list(w[:-1]) + [w[-1] + "</w>"])
        add(syms[0])
    add("<|startoftext|>")
    add("<|endoftext|>")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    clip_tok = CLIPTokenizer(
        str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="<|endoftext|>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(ch, -8.0) for ch in letters] + [("\u2581", -8.0)]
    t5 = Tokenizer(models.Unigram(pieces, unk_id=2))
    t5.normalizer = normalizers.Lowercase()
    t5.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    t5.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    t5.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5_tok = T5TokenizerFast(
        tokenizer_object=t5, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=MAX_SEQUENCE_LENGTH,
    )
    return clip_tok, t5_tok


def build_text_encoders(clip_tok, t5_tok, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    eos = clip_tok.convert_tokens_to_ids("<|endoftext|>")
    bos = clip_tok.convert_tokens_to_ids("<|startoftext|>")
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_SEQUENCE_LENGTH, projection_dim=32,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pipeline's own prompt encoding: (prompt_embeds (N, 16, 32), pooled (N, 32))."""
    pe, pooled, _ = pipe.encode_prompt(
        prompt=captions, prompt_2=captions, device=torch.device("cpu"), max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    return pe, pooled


def check_distinct(pe: torch.Tensor, pooled: torch.Tensor, captions: list[str]) -> float:
    """Smallest relative distance between two captions' conditioning; raises if two coincide."""
    flat = torch.cat([pe.flatten(1), pooled * math.sqrt(pe.shape[1])], dim=1)
    d = torch.cdist(flat, flat)
    d.fill_diagonal_(float("inf"))
    rel = (d.min() / flat.norm(dim=1).mean()).item()
    if rel < 1e-3:
        i, j = divmod(int(d.argmin()), d.shape[0])
        raise RuntimeError(f"captions {captions[i]!r} and {captions[j]!r} get the same embedding")
    return rel


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, log) -> None:
    """L1 reconstruction + 1e-6 KL: flat-coloured shapes need sharp edges more than a smooth latent."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = (rec - x).abs().mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} l1 {loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def save_pipeline(pipe, out: Path, record: dict) -> None:
    from ppcl.atomic import atomic_path, write_json

    with atomic_path(out, directory=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "ppcl_reference.json", record)
        # generation defaults every ppcl stage reads (ppcl.arch.generation_defaults); guidance: the better
        # setting of the recorded judge evaluation (true CFG 3 with the empty negative prompt); steps: the
        # benchmark's evaluation steps (ppcl.bench.quality.QualitySettings.eval_steps)
        write_json(tmp / "ppcl.json", {"version": 1, "generation": {
            "height": RESOLUTION, "width": RESOLUTION, "steps": 10, "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "guidance": 3.0}})


EVAL_SEED = 2000


def eval_prompts(n: int, seed: int = EVAL_SEED) -> tuple[list[str], list[dict], list[int]]:
    """The fixed evaluation set: captions of synth samples 0..n-1 of ``seed``, their attributes, and the
    generator seed of each image (its index)."""
    caps, attrs = [], []
    for _, cap, a in synth.iter_synth(n, size=RESOLUTION, seed=seed):
        caps.append(cap)
        attrs.append(a)
    return caps, attrs, list(range(n))


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, true_cfg_scale: float = 1.0,
             batch_size: int = 64) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] from the stock FluxPipeline call, one generator per image."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i : i + batch_size], seeds[i : i + batch_size]
        kw = dict(negative_prompt=[""] * len(ps), true_cfg_scale=true_cfg_scale) if true_cfg_scale > 1 else {}
        img = pipe(
            prompt=ps, height=RESOLUTION, width=RESOLUTION, num_inference_steps=steps,
            max_sequence_length=MAX_SEQUENCE_LENGTH, generator=[torch.Generator().manual_seed(s) for s in ss],
            output_type="pt", **kw,
        ).images
        out.append(img.float().clamp(0, 1))
    return torch.cat(out)


def evaluate(pipe_dir: Path, n: int = 256, steps: int = 20, cfg_scales: tuple[float, ...] = (1.0, 3.0)) -> dict:
    """Judge scores (and judge-FID against the real synth images of the same captions) of the teacher's
    generations on the fixed evaluation set; written into ``pipe_dir/ppcl_reference.json`` under ``judge``."""
    from diffusers import DiffusionPipeline

    from ppcl.atomic import write_json
    from ppcl.bench.judge import judge_fid, judge_scores, synth_batch

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts, attrs, seeds = eval_prompts(n)
    real, _ = synth_batch(n, EVAL_SEED, RESOLUTION)
    result: dict[str, Any] = {"eval_seed": EVAL_SEED, "n": n, "num_inference_steps": steps, "runs": {}}
    for cfg in cfg_scales:
        t0 = time.time()
        imgs = generate(pipe, prompts, seeds, steps, cfg)
        scores = judge_scores(imgs, attrs)
        scores["judge_fid"] = judge_fid(imgs, real)
        scores["seconds"] = time.time() - t0
        result["runs"][f"true_cfg_{cfg:g}"] = scores
        print(f"cfg {cfg}: {scores}", flush=True)
    result["real_images"] = judge_scores(real, attrs)
    # The ceiling the VAE leaves: real images encoded and decoded by the teacher's own VAE.
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(real * 2 - 1).latent_dist.mean).sample
    result["vae_reconstructions"] = judge_scores((rec / 2 + 0.5).clamp(0, 1), attrs)
    # The small run tests/test_bench.py repeats: first 32 prompts, 10 steps, the better guidance setting.
    best = max(result["runs"], key=lambda k: result["runs"][k]["attribute_accuracy"])
    cfg = float(best.removeprefix("true_cfg_"))
    small = generate(pipe, prompts[:32], seeds[:32], 10, cfg)
    result["smoke"] = {"n": 32, "num_inference_steps": 10, "true_cfg_scale": cfg,
                       **judge_scores(small, attrs[:32])}
    record_path = pipe_dir / "ppcl_reference.json"
    record = json.loads(record_path.read_text())
    record["judge"] = result
    write_json(record_path, record)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=20000)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early; the record says where")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps, keeping the lr schedule of --steps (reproduces a stopped run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--init", type=Path, default=None,
                   help="continue training from a saved teacher (its VAE and transformer); recorded as a stage")
    p.add_argument("--evaluate-only", action="store_true", help="only score an existing --out with the judge")
    p.add_argument("--eval-n", type=int, default=256)
    return p


@dataclass
class _Setup:
    """What training needs: the pipeline's parts, the encoded captions and the scaled latents of the images."""
    parts: dict[str, Any]  # FluxPipeline's keyword arguments; ``transformer`` is the one being trained
    pe_all: torch.Tensor  # every caption's (and, last, the empty caption's) T5 states
    pooled_all: torch.Tensor
    cap_ids: torch.Tensor  # each image's caption index
    empty_id: int
    x0_all: torch.Tensor
    vae_l1: float
    vae_seconds: float
    prior: dict[str, Any] | None  # the record of the teacher --init continues from

    def pipeline(self, transformer):
        from diffusers import FluxPipeline

        return FluxPipeline(**{**self.parts, "transformer": transformer})


def _prepare(args: argparse.Namespace, log) -> _Setup:
    """Synth images, tokenizers, frozen text encoders, the VAE (trained, or --init's) and the transformer."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(args.seed)
    imgs_np, caps, _ = synth.synth_arrays(args.n_images, size=RESOLUTION, seed=args.seed)
    images = to_tensor(imgs_np)
    log(f"synth: {len(images)} images {RESOLUTION}px")

    with tempfile.TemporaryDirectory() as tok_dir:
        clip_tok, t5_tok = build_tokenizers(Path(tok_dir))
    clip, t5 = build_text_encoders(clip_tok, t5_tok, args.seed)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(args.seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=vae,
                 text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok)

    # Conditioning: every caption + the empty one, encoded once by the pipeline's own encode_prompt.
    cap_list = all_captions() + [""]
    cap_index = {c: i for i, c in enumerate(cap_list)}
    pe_all, pooled_all = encode_captions(FluxPipeline(**parts, transformer=transformer), cap_list)
    rel = check_distinct(pe_all, pooled_all, cap_list)
    log(f"caption embeddings: {len(cap_list)} distinct, min relative distance {rel:.3f}")
    cap_ids = torch.tensor([cap_index[c] for c in caps])

    prior: dict[str, Any] | None = None
    if args.init is not None:
        # Continue from a saved teacher: its VAE (with its latent scaling) and its (EMA) transformer.
        vae = AutoencoderKL.from_pretrained(args.init / "vae")
        transformer = FluxTransformer2DModel.from_pretrained(args.init / "transformer")
        parts["vae"] = vae
        prior = json.loads((args.init / "ppcl_reference.json").read_text())
        prior.pop("judge", None)
        vae.eval().requires_grad_(False)
        vae_seconds, vae_l1 = 0.0, prior["vae_l1"]
        latents = encode_latents(vae, images)
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
        log(f"continuing from {args.init} (its steps_done {prior.get('steps_done')})")
    else:
        t_vae = time.time()
        train_vae(vae, images, args.vae_steps, 32, 2e-3, log)
        with torch.no_grad():
            rec = vae.decode(encode_latents(vae, images[:512])).sample
            vae_l1 = (rec - images[:512]).abs().mean().item()
        latents = encode_latents(vae, images)
        shift, scale = latents.mean().item(), 1.0 / latents.std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        vae_seconds = time.time() - t_vae
        log(f"vae trained in {vae_seconds:.0f}s, held-in L1 {vae_l1:.4f} (images in [-1,1]); latents {tuple(latents.shape)}")
    parts["transformer"] = transformer
    return _Setup(parts, pe_all, pooled_all, cap_ids, cap_index[""], (latents - shift) * scale, vae_l1, vae_seconds,
                  prior)


def _new_record(args: argparse.Namespace, setup: _Setup) -> tuple[dict[str, Any], str]:
    """``ppcl_reference.json`` before training (settings, VAE; earlier stages when continuing) and this stage's
    command."""
    record: dict[str, Any] = {
        "version": 1,
        "seed": args.seed,
        "resolution": RESOLUTION,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "generation": {"height": RESOLUTION, "width": RESOLUTION, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "transformer_config": TRANSFORMER_CONFIG,
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items()},
        "settings": {
            "n_images": args.n_images, "vae_steps": args.vae_steps, "steps_planned": args.steps,
            "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "schedule": "cosine to 0.1x",
            "optimizer": "AdamW(0.9, 0.99), wd 0.01", "ema": 0.999, "timesteps": "logit-normal(0, 1)",
            "caption_dropout": 0.1, "threads": args.threads, "text_encoders": "random-init, frozen",
        },
        "vae_l1": setup.vae_l1,
        "vae_seconds": setup.vae_seconds,
    }
    stage_cmd = "python -m ppcl.bench.teacher --out DIR --seed %d --steps %d" % (args.seed, args.steps)
    prior = setup.prior
    if prior is not None:
        # A continued run: earlier stages first, this one last; totals add up over stages.
        stages = prior.pop("stages", None) or []
        stages.append(prior)
        for st in stages:
            if "stage_command" not in st:  # records written before stage_command existed
                st["stage_command"] = st.get("command", "?")
                if st.get("steps_done", 0) < st.get("settings", {}).get("steps_planned", 0):
                    st["stage_command"] += " --stop-after %d" % st["steps_done"]
        record["stages"] = stages
        record["vae_seconds"] = prior.get("vae_seconds", 0.0)
        stage_cmd = "python -m ppcl.bench.teacher --init DIR --out DIR --seed %d --steps %d --lr %g --warmup %d" % (
            args.seed, args.steps, args.lr, args.warmup)
    return record, stage_cmd


def _train(args: argparse.Namespace, setup: _Setup, record: dict[str, Any], stage_cmd: str, log,
           t_start: float) -> None:
    """Rectified-flow training with 10% caption dropout and an EMA, saving the EMA pipeline and the record every
    ``--save-every`` steps, at the end, and where ``--max-minutes`` / ``--stop-after`` stop it."""
    import copy

    from diffusers import FluxPipeline

    transformer, x0_all, cap_ids = setup.parts["transformer"], setup.x0_all, setup.cap_ids
    h = w = RESOLUTION // setup.pipeline(transformer).vae_scale_factor
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3)
    c = x0_all.shape[1]

    ema = copy.deepcopy(transformer).requires_grad_(False)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = args.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)) * 0.9 + 0.1),
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    t_train = time.time()
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x0_all.shape[0], (args.batch,), generator=g)
        x0 = x0_all[idx]
        ci = cap_ids[idx].clone()
        ci[torch.rand(args.batch, generator=g) < 0.1] = setup.empty_id
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=g))
        s4 = sigma.view(-1, 1, 1, 1)
        xt = (1 - s4) * x0 + s4 * noise
        packed = FluxPipeline._pack_latents(xt, args.batch, c, h, w)
        target = FluxPipeline._pack_latents(noise - x0, args.batch, c, h, w)
        pred = transformer(
            hidden_states=packed, timestep=sigma, pooled_projections=setup.pooled_all[ci],
            encoder_hidden_states=setup.pe_all[ci], txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for pe_, pt_ in zip(ema.parameters(), transformer.parameters()):
                pe_.lerp_(pt_, 1 - d)
        losses.append(loss.item())
        elapsed = time.time() - t_train
        stop = (args.max_minutes is not None and (time.time() - t_start) / 60 >= args.max_minutes) or (
            args.stop_after is not None and step >= args.stop_after
        )
        if step % 50 == 0:
            log(f"step {step} loss {np.mean(losses[-50:]):.4f} lr {sched.get_last_lr()[0]:.2e} {elapsed / step:.3f}s/step")
        if step % args.save_every == 0 or step == args.steps or stop:
            earlier = record.get("stages") or []
            record["stage_command"] = stage_cmd + (" --stop-after %d" % step if step < args.steps else "")
            record["command"] = " && ".join([st["stage_command"] for st in earlier] + [record["stage_command"]])
            record.update(
                steps_done=step, train_seconds=elapsed, total_seconds=time.time() - t_start,
                # CPU seconds of this process: on a shared machine, wall time says little about cost.
                cpu_seconds=time.process_time(),
                cpu_seconds_total=time.process_time() + sum(s_.get("cpu_seconds", 0.0) for s_ in earlier),
                steps_total=step + sum(s_.get("steps_done", 0) for s_ in earlier),
                train_seconds_total=elapsed + sum(s_.get("train_seconds", 0.0) for s_ in earlier),
                final_loss=float(np.mean(losses[-200:])), finished=step == args.steps,
            )
            save_pipeline(setup.pipeline(ema), args.out, record)
            log(f"saved {args.out} at step {step}")
        if stop:
            log(f"stopped at step {step} of {args.steps}")
            break


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        evaluate(args.out, n=args.eval_n)
        return 0
    t_start = time.time()
    log_path = args.out.parent / f"{args.out.name}.train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as logf:
        def log(msg: str) -> None:
            line = f"[{time.time() - t_start:7.1f}s] {msg}"
            print(line, flush=True)
            logf.write(line + "\n")
            logf.flush()

        setup = _prepare(args, log)
        record, stage_cmd = _new_record(args, setup)
        _train(args, setup, record, stage_cmd, log, t_start)
    if ASSETS_JUDGE.is_file():
        evaluate(args.out, n=args.eval_n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
