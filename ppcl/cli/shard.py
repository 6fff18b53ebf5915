"""``ppcl shard``: image-text source -> deterministic Parquet shards + manifest.json."""

from __future__ import annotations

import argparse

HELP = "shard an image-text source (imagefolder, Parquet, WebDataset; local or s3://) into Parquet shards"


#: Settings only the pipeline uses (it synthesises a data set when no source is given; this command needs one).
PIPELINE_ONLY = ("source", "synth_samples", "synth_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ppcl.settings import ShardSettings, add_settings_arguments

    parser.add_argument("--source", required=True, help="folder, file or s3:// prefix of the raw data")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix (shards + manifest.json)")
    add_settings_arguments(parser, ShardSettings, exclude=PIPELINE_ONLY)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ppcl.data.shard import shard_source
    from ppcl.settings import ShardSettings, settings_from_args

    cfg = settings_from_args(ShardSettings, args, exclude=PIPELINE_ONLY)
    manifest, written = shard_source(
        args.source, args.out, cfg.shards, fmt=cfg.format, caption_column=cfg.caption_column,
        image_column=cfg.image_column, key_column=cfg.key_column, min_size=cfg.min_size,
        progress=not args.no_progress,
    )  # fmt: skip
    from ppcl.tracking import log_command

    log_command("shard", {"samples": manifest.accepted, "rejected": len(manifest.rejected), "read": manifest.read,
                          "shards": manifest.num_shards}, args.out, cfg.model_dump(mode="json"))  # fmt: skip
    print(
        f"{manifest.accepted} samples in {manifest.num_shards} shards ({written} written, "
        f"{manifest.num_shards - written} unchanged), {len(manifest.rejected)} rejected of {manifest.read} read "
        f"-> {args.out}"
    )
    return 0
