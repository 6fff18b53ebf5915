"""``ppcl synth``: write a procedural captioned dataset (coloured shapes at positions) as an imagefolder."""

from __future__ import annotations

import argparse

HELP = "write a synthetic captioned image folder (coloured shapes, exact captions) with metadata.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (new, or an earlier `ppcl synth` output)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")


def run(args: argparse.Namespace) -> int:
    import time

    from ppcl.data.synth import write_synth

    t0 = time.perf_counter()
    out = write_synth(args.out, args.n, size=args.size, seed=args.seed, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} images ({args.size}px) to {out} in {dt:.1f}s ({args.n / dt:.0f} images/s)")
    return 0
