"""Complete tiny random diffusers pipelines for FLUX.1, SD3.5 and Qwen-Image, built offline.

Every test, the local demo and the docs need a real pipeline directory that ``DiffusionPipeline.from_pretrained``
loads and whose stock ``__call__`` draws a 64x64 image on CPU in about a second. This module writes one per family
from config alone: random weights (seeded), tokenizers built from an embedded word list, the family's usual
flow-matching scheduler. Nothing is downloaded.

Design choices (method.md is silent on all of them):

- Shapes follow the real models wherever it is cheap, so code paths match: VAEs downsample 8x with 16 latent
  channels (a 64x64 image -> 8x8x16 latent -> 16 image tokens after 2x2 packing); FLUX has both dual-stream and
  single-stream blocks and guidance embedding (FLUX.1-dev-like); the SD3 transformer is SD3.5-like
  (``qk_norm="rms_norm"``, dual attention in blocks 0 and 1, the last block ``context_pre_only``); Qwen-Image
  uses a Qwen2.5-VL text encoder with a one-layer vision tower.
- Widths are tiny (transformer: 2 heads x 16 dims = 32; text encoders 32, SD3's T5 64 because SD3 pads the
  two CLIP states (32 + 32) to the T5 width); depth is 10 transformer blocks per family (FLUX: 4 dual + 6 single)
  so that contiguous intervals can be probed and pruned.
- Tokenizers: byte-level BPE (CLIP, Qwen2) and Unigram (T5) over an embedded caption vocabulary (colours,
  shapes, spatial words, counts, common objects, the Qwen-Image prompt template). Every listed word is a single
  token, so different words get different ids; unknown words fall back to byte/character pieces, never to
  a single shared unk. BPE merges are built as chains that cannot conflict (see :func:`_chain_merges`), so the
  result does not depend on a trainer's tie-breaking. The Qwen-Image prompt template's prefix tokenizes to
  exactly 34 tokens, like the real tokenizer, so the pipeline's ``prompt_template_encode_start_idx`` drops
  exactly the system prompt.
- Determinism: each component is built under its own seed derived from ``(seed, component name)`` inside a
  forked RNG, so the caller's global RNG is untouched and the same seed gives byte-identical safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ppcl.atomic import atomic_path
from ppcl.errors import PPCLError

FAMILIES: tuple[str, ...] = ("flux", "sd3", "qwenimage")

# Transformer width shared by the three families: 2 heads x 16 dims; FLUX/Qwen RoPE axes (4, 6, 6) sum to 16.
_HEADS = 2
_HEAD_DIM = 16
_ROPE_AXES = (4, 6, 6)
_TEXT_WIDTH = 32  # CLIP / T5 (FLUX) / Qwen2.5-VL hidden size
_SD3_T5_WIDTH = 64  # must be >= the two CLIP widths together (SD3 pads CLIP states to the T5 width)

# Words that caption datasets and our demos use; each becomes one token in every tokenizer.
_WORDS: tuple[str, ...] = tuple(
    """
    a an the one two three four five six seven eight nine ten some many several pair group
    red blue green yellow orange purple pink brown black white gray grey golden silver dark light bright pale
    circle square triangle rectangle star heart cross ring dot dots line lines cube sphere cone cylinder box
    hexagon diamond oval shape shapes circles squares triangles rectangles stars
    above below under over on in inside outside left right top bottom middle center centre corner next to
    beside behind front near far between around of with and or is are at by from into its their
    big small large tiny huge little tall short wide thin long round flat
    cat cats dog dogs bird birds fish horse cow person people man woman child girl boy face hand
    car bus bike boat train plane tree trees flower flowers grass leaf apple banana fruit cake cup mug
    table chair bed house building city street road bridge window door wall floor room kitchen
    sky sun moon cloud clouds rain snow mountain mountains river lake sea ocean beach forest field water
    sitting standing walking running flying lying holding looking playing wearing
    photo photograph picture image painting drawing illustration render sketch portrait close up view scene
    background foreground texture color colour size quantity text spatial relationships objects object
    describe detailing style art realistic simple plain soft sharp smooth shiny wooden metal glass stone
    striped dotted checkered pattern empty full old new high quality detailed
    """.split()
)
# Bare (no leading space) forms the Qwen-Image prompt template and sentence starts need as single tokens.
_QWEN_BARE_WORDS: tuple[str, ...] = ("system", "user", "assistant", "Describe", "A", "An", "The", "Two", "Three")
_QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _check_arch(arch: str) -> str:
    if arch not in FAMILIES:
        raise PPCLError(f"unknown family {arch!r}: expected one of {', '.join(FAMILIES)}")
    return arch


# --------------------------------------------------------------------------------------------------------------
# Transformer


def tiny_transformer_config(arch: str, **overrides: Any) -> dict:
    """The tiny transformer's ``__init__`` kwargs for ``arch`` (a fresh dict), with ``overrides`` applied.

    The widths match the tiny text encoders built by :func:`build_tiny_pipeline`; overriding
    ``joint_attention_dim`` / ``pooled_projection_dim`` gives a transformer that no longer fits that pipeline.
    Unknown override keys are an error (a typo would otherwise be silently ignored by diffusers).
    """
    _check_arch(arch)
    if arch == "flux":
        config: dict[str, Any] = dict(
            patch_size=1,
            in_channels=64,  # 16 latent channels x 2x2 packing
            out_channels=None,
            num_layers=4,
            num_single_layers=6,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_TEXT_WIDTH,  # T5 width
            pooled_projection_dim=_TEXT_WIDTH,  # CLIP pooled width
            guidance_embeds=True,
            axes_dims_rope=_ROPE_AXES,
        )
    elif arch == "sd3":
        config = dict(
            sample_size=8,  # 64 px / 8
            patch_size=2,
            in_channels=16,
            num_layers=10,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_SD3_T5_WIDTH,
            caption_projection_dim=_HEADS * _HEAD_DIM,  # must equal the inner width
            pooled_projection_dim=2 * _TEXT_WIDTH,  # the two CLIP projections concatenated
            out_channels=16,
            pos_embed_max_size=32,  # up to 512 px images
            dual_attention_layers=(0, 1),
            qk_norm="rms_norm",
        )
    else:  # qwenimage
        config = dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=10,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_TEXT_WIDTH,  # Qwen2.5-VL hidden size
            guidance_embeds=False,
            axes_dims_rope=_ROPE_AXES,
        )
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise PPCLError(
            f"unknown {arch} transformer setting(s) {', '.join(unknown)}: expected some of {', '.join(config)}"
        )
    config.update(overrides)
    return config


def _transformer_class(arch: str):
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel

    return {
        "flux": FluxTransformer2DModel,
        "sd3": SD3Transformer2DModel,
        "qwenimage": QwenImageTransformer2DModel,
    }[arch]


def _component_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one component, derived from the user's seed and the component's name."""
    digest = hashlib.sha256(f"ppcl.arch.tiny:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _seeded(seed: int, name: str, build):
    """Call ``build()`` with torch's CPU RNG seeded for ``name``, restoring the caller's RNG afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, name))
        return build()


def tiny_transformer(arch: str, seed: int = 0, **overrides: Any):
    """A randomly initialised tiny transformer of ``arch`` in eval mode, float32, on CPU.

    Same ``seed`` and overrides -> identical weights. See :func:`tiny_transformer_config` for the shape.
    """
    config = tiny_transformer_config(arch, **overrides)
    cls = _transformer_class(arch)
    return _seeded(seed, "transformer", lambda: cls(**config)).eval()


# --------------------------------------------------------------------------------------------------------------
# Tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE (CLIP, Qwen2)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _chain_merges(symbols: list[list[str]], *, from_right: bool) -> list[tuple[str, str]]:
    """BPE merges that turn each symbol sequence into one token, in an order no other chain can disturb.

    With ``from_right`` the merges grow a suffix: (s[n-2], s[n-1]), (s[n-3], s[n-2]s[n-1]), ... Every right
    operand then ends with the last symbol of its word; when that symbol only ever occurs at a word's end
    (CLIP's ``x</w>``), inside a word exactly one merge applies at each step, so every word merges fully
    whatever the ranks. Without ``from_right`` the merges grow a prefix, which is conflict-free when the first
    symbol only occurs at a word's start (byte-level ``Ġ``, the leading space).
    """
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in symbols:
        if from_right:
            acc = word[-1]
            for sym in reversed(word[:-1]):
                pair = (sym, acc)
                acc = sym + acc
                if pair not in seen:
                    seen.add(pair)
                    merges.append(pair)
        else:
            acc = word[0]
            for sym in word[1:]:
                pair = (acc, sym)
                acc = acc + sym
                if pair not in seen:
                    seen.add(pair)
                    merges.append(pair)
    return merges


def _trained_merges(symbols: list[list[str]]) -> list[tuple[str, str]]:
    """Plain BPE training (most frequent pair, ties to the smallest pair) until every word is one token.

    Used only for the handful of words whose symbols can occur anywhere (no unique start/end marker).
    """
    words = [list(w) for w in symbols]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, w in enumerate(words):
            out: list[str] = []
            j = 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out


def _vocab_from(base: list[str], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in [*base, *(a + b for a, b in merges), *specials]:
        vocab.setdefault(token, len(vocab))
    return vocab


def tiny_clip_tokenizer():
    """A CLIPTokenizer (byte-level BPE with ``</w>`` word ends) where every word of the caption list is one token.

    Layout as in the real CLIP vocab: 256 byte symbols, the same with ``</w>``, merge results, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last. ``model_max_length`` is 77.
    """
    from transformers import CLIPTokenizer

    byte_symbols = list(_bytes_to_unicode().values())
    words = [[*w[:-1], w[-1] + "</w>"] for w in _WORDS]
    merges = _chain_merges(words, from_right=True)
    vocab = _vocab_from(
        [*byte_symbols, *(s + "</w>" for s in byte_symbols)], merges, ["<|startoftext|>", "<|endoftext|>"]
    )
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_t5_tokenizer():
    """A T5 tokenizer over a Unigram model: ``▁word`` pieces for the caption list, single characters as fallback.

    Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` as in T5; no sentinel (``<extra_id_N>``) tokens.
    """
    import string

    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    # Whole words score far above any spelling from characters, so a listed word is always one piece.
    for i, word in enumerate(_WORDS):
        for form in (word, word.capitalize()):
            piece = "▁" + form
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -3.0 - 1e-3 * i))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        if ch not in seen:
            seen.add(ch)
            pieces.append((ch, -8.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_qwen_tokenizer():
    """A Qwen2Tokenizer: 256 byte-level symbols, ``Ġword`` and a few bare words as single tokens, Qwen's specials.

    The Qwen-Image prompt template prefix (system prompt up to ``<|im_start|>user\\n``) encodes to 34 tokens,
    as with the real tokenizer.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    b2u = _bytes_to_unicode()
    byte_symbols = list(b2u.values())
    space = b2u[ord(" ")]  # "Ġ"
    spaced = [[space, *w] for w in _WORDS]
    # Prefix chains first: they finish every spaced word before any bare merge could cut into it.
    merges = _chain_merges(spaced, from_right=False)
    merges += [m for m in _trained_merges([list(w) for w in _QWEN_BARE_WORDS]) if m not in set(merges)]
    vocab = _vocab_from(byte_symbols, merges, list(_QWEN_SPECIAL_TOKENS))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIAL_TOKENS[1:]]}
    )
    return tok


# --------------------------------------------------------------------------------------------------------------
# Text encoders, VAEs, schedulers


def _clip_text_model(tokenizer, *, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=2 * _TEXT_WIDTH,
        projection_dim=_TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,  # not 2: the pooled state is taken at the first eos, as with current CLIP configs
        pad_token_id=eos,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 2,
        d_ff=2 * width,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in FLUX's and SD3's T5-XXL
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _qwen_text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL_TOKENS}
    head_dim = _TEXT_WIDTH // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_WIDTH,
            intermediate_size=2 * _TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            # M-RoPE sections (temporal, height, width) must sum to head_dim / 2, like (16, 24, 24) for 128.
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=_TEXT_WIDTH,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    assert head_dim // 2 == sum(config.text_config.rope_parameters["mrope_section"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _autoencoder_kl(*, scaling_factor: float, shift_factor: float):
    """AutoencoderKL with 4 levels (8x down), 16 latent channels, no quant convs: FLUX/SD3's VAE layout."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def _scheduler(arch: str):
    """FlowMatchEulerDiscreteScheduler with the settings of the released scheduler_config.json of each family."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if arch == "flux":  # FLUX.1-dev
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    if arch == "sd3":  # SD3 / SD3.5
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(  # Qwen-Image
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def _build_pipeline(arch: str, seed: int, transformer_overrides: dict):
    """The in-memory pipeline; every random component is seeded by (seed, its name)."""
    transformer = tiny_transformer(arch, seed, **transformer_overrides)
    if arch == "flux":
        from diffusers import FluxPipeline

        clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        return FluxPipeline(
            scheduler=_scheduler(arch),
            vae=_seeded(seed, "vae", lambda: _autoencoder_kl(scaling_factor=0.3611, shift_factor=0.1159)),
            text_encoder=_seeded(seed, "text_encoder", lambda: _clip_text_model(clip_tok, with_projection=False)),
            tokenizer=clip_tok,
            text_encoder_2=_seeded(seed, "text_encoder_2", lambda: _t5_encoder(t5_tok, _TEXT_WIDTH)),
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
    if arch == "sd3":
        from diffusers import StableDiffusion3Pipeline

        clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=_scheduler(arch),
            vae=_seeded(seed, "vae", lambda: _autoencoder_kl(scaling_factor=1.5305, shift_factor=0.0609)),
            text_encoder=_seeded(seed, "text_encoder", lambda: _clip_text_model(clip_tok, with_projection=True)),
            tokenizer=clip_tok,
            text_encoder_2=_seeded(seed, "text_encoder_2", lambda: _clip_text_model(clip_tok, with_projection=True)),
            tokenizer_2=clip_tok,
            text_encoder_3=_seeded(seed, "text_encoder_3", lambda: _t5_encoder(t5_tok, _SD3_T5_WIDTH)),
            tokenizer_3=t5_tok,
        )
    from diffusers import QwenImagePipeline

    qwen_tok = tiny_qwen_tokenizer()
    return QwenImagePipeline(
        scheduler=_scheduler(arch),
        vae=_seeded(seed, "vae", _qwen_vae),
        text_encoder=_seeded(seed, "text_encoder", lambda: _qwen_text_encoder(qwen_tok)),
        tokenizer=qwen_tok,
        transformer=transformer,
    )


def build_tiny_pipeline(
    arch: str, out: str | Path, seed: int = 0, *, transformer_overrides: dict | None = None
) -> Path:
    """Write a complete tiny random ``arch`` pipeline to the folder ``out`` (atomically) and return ``out``.

    The folder is a normal diffusers pipeline (model_index.json, one subfolder per component, safetensors
    weights, float32) of 2-3.5 MB; ``DiffusionPipeline.from_pretrained(out)`` loads it and its stock call
    draws 64x64 images on CPU. An existing ``out`` is replaced only once the new one is complete.

    Args:
        arch: one of :data:`FAMILIES`.
        out: the pipeline folder to write.
        seed: same seed -> byte-identical weight files; the caller's torch RNG is left untouched.
        transformer_overrides: changes to :func:`tiny_transformer_config` (e.g. ``num_layers``).
    """
    _check_arch(arch)
    overrides = dict(transformer_overrides or {})
    tiny_transformer_config(arch, **overrides)  # validate before anything is written
    out = Path(out)
    # Replacing is for re-running the same command; never wipe a folder that is not a pipeline.
    if out.exists() and not (out.is_dir() and ((out / "model_index.json").is_file() or not any(out.iterdir()))):
        raise PPCLError(f"{out} exists and is not a pipeline folder: refusing to replace it")
    pipe = _build_pipeline(arch, seed, overrides)
    with atomic_path(out, directory=True) as tmp, _quiet_transformers_progress():
        pipe.save_pretrained(tmp)
        # generation defaults that fit a random 2 MB model (ppcl.arch.generation_defaults): the 64 px it is built
        # to draw instead of the family's 1024 px, and 4 steps (its images are noise at any step count; more
        # steps only cost time). encode and evaluate use them unless told otherwise.
        (tmp / "ppcl.json").write_text(json.dumps({"version": 1, "generation": {"height": 64, "width": 64,
                                                                                "steps": 4}}) + "\n")
    return out


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' per-file "Writing model shards" bars (noise for a 2 MB save); restore the setting."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
