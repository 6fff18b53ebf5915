"""``ppcl tiny``: write a complete tiny random diffusers pipeline (FLUX.1, SD3.5 or Qwen-Image) for tests and demos."""

from __future__ import annotations

import argparse

HELP = "write a complete tiny random diffusers pipeline (flux, sd3, qwenimage) that loads and draws 64x64 on CPU"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # No argparse `choices`: an unknown family must be the usual one-line PPCLError (exit 2), not a usage dump.
    parser.add_argument("--arch", required=True, help="model family: flux, sd3 or qwenimage")
    parser.add_argument("--out", required=True, help="output pipeline folder (new, or an earlier `ppcl tiny` output)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed -> identical files (default 0)")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ppcl.errors import PPCLError
    from ppcl.arch.tiny import FAMILIES, build_tiny_pipeline

    if args.arch not in FAMILIES:  # checked before torch/diffusers are imported, so bad input fails instantly
        raise PPCLError(f"unknown family {args.arch!r}: expected one of {', '.join(FAMILIES)}")
    t0 = time.perf_counter()
    out = build_tiny_pipeline(args.arch, args.out, seed=args.seed)
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print(f"wrote tiny {args.arch} pipeline to {out} ({size / 1e6:.2f} MB) in {dt:.1f}s")
    return 0
