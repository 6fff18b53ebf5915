"""``ppcl encode``: data shards -> cache of latents and prompt embeddings (teacher's VAE and text encoders)."""

from __future__ import annotations

import argparse

HELP = "encode data shards into a cache of VAE latents and prompt embeddings with the teacher's encoders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ppcl.settings import EncodeSettings, add_settings_arguments

    parser.add_argument("--model", required=True, help="diffusers pipeline folder (the teacher)")
    parser.add_argument("--data", required=True, help="output of `ppcl shard` (folder or s3:// prefix)")
    parser.add_argument("--out", required=True, help="cache folder or s3:// prefix")
    add_settings_arguments(parser, EncodeSettings)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ppcl.settings import EncodeSettings, settings_from_args

    cfg = settings_from_args(EncodeSettings, args)  # checked before torch is even imported

    import torch

    from ppcl.data.encode import encode_shards

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = encode_shards(
        args.model, args.data, args.out, resolution=cfg.resolution, batch_size=cfg.batch_size, device=device,
        dtype=cfg.dtype, max_sequence_length=cfg.max_sequence_length, negative_prompt=cfg.negative_prompt,
        progress=not args.no_progress,
    )  # fmt: skip
    from ppcl.tracking import log_command

    log_command("encode", {"samples": manifest.samples, "shards": len(manifest.shards),
                           "resolution": manifest.resolution}, args.out, cfg.model_dump(mode="json"))  # fmt: skip
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in manifest.tensors.items())
    print(f"{manifest.samples} samples in {len(manifest.shards)} shards at {manifest.resolution} px: {shapes} -> {args.out}")
    return 0
