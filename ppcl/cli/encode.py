"""``ppcl encode``: data shards -> cache of latents and prompt embeddings (teacher's VAE and text encoders)."""

from __future__ import annotations

import argparse

HELP = "encode data shards into a cache of VAE latents and prompt embeddings with the teacher's encoders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline folder (the teacher)")
    parser.add_argument("--data", required=True, help="output of `ppcl shard` (folder or s3:// prefix)")
    parser.add_argument("--out", required=True, help="cache folder or s3:// prefix")
    parser.add_argument(
        "--resolution", type=int, default=None,
        help="square training resolution in pixels: shorter side resized to R, centre-cropped "
        "(default: the pipeline's default sample size)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="samples per encoder call (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="encoder precision (default: as saved)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from ppcl.data.encode import encode_shards

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = encode_shards(
        args.model, args.data, args.out, resolution=args.resolution, batch_size=args.batch_size,
        device=device, dtype=args.dtype, progress=not args.no_progress,
    )  # fmt: skip
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in manifest.tensors.items())
    print(f"{manifest.samples} samples in {len(manifest.shards)} shards at {manifest.resolution} px: {shapes} -> {args.out}")
    return 0
