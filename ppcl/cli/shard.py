"""``ppcl shard``: image-text source -> deterministic Parquet shards + manifest.json."""

from __future__ import annotations

import argparse

HELP = "shard an image-text source (imagefolder, Parquet, WebDataset; local or s3://) into Parquet shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="folder, file or s3:// prefix of the raw data")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix (shards + manifest.json)")
    parser.add_argument("--shards", type=int, required=True, help="number of output shards")
    parser.add_argument(
        "--format", default="auto", choices=["auto", "imagefolder", "parquet", "webdataset"],
        help="source format (default: detect from the files)",
    )  # fmt: skip
    parser.add_argument(
        "--caption-column", default=None,
        help="caption field/column (default: the first of caption, text, prompt); for WebDataset the "
        "caption member's extension or JSON field",
    )  # fmt: skip
    parser.add_argument("--image-column", default=None, help="Parquet image column (default: image)")
    parser.add_argument("--key-column", default=None, help="Parquet key column (default: key if present)")
    parser.add_argument("--min-size", type=int, default=0, help="reject images whose smaller side is below PX")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ppcl.data.shard import shard_source

    manifest, written = shard_source(
        args.source, args.out, args.shards, fmt=args.format, caption_column=args.caption_column,
        image_column=args.image_column, key_column=args.key_column, min_size=args.min_size,
        progress=not args.no_progress,
    )  # fmt: skip
    print(
        f"{manifest.accepted} samples in {manifest.num_shards} shards ({written} written, "
        f"{manifest.num_shards - written} unchanged), {len(manifest.rejected)} rejected of {manifest.read} read "
        f"-> {args.out}"
    )
    return 0
