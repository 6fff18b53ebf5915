"""``ppcl probe``: streaming similarity statistics of a teacher -> DIR/probe.json, cka_heatmap.png, trend.png."""

from __future__ import annotations

import argparse

HELP = "probe block similarity (CKA, linear probes, trend, interval probes) -> DIR/probe.json + plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline directory (the teacher)")
    parser.add_argument("--data", default=None, help="latent cache (ppcl encode); default: built-in synthetic set")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples N (default 32)")
    parser.add_argument("--timesteps", type=int, default=4,
                        help="noise levels K per sample: stratified, shifted like the scheduler (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per forward (default 4)")
    parser.add_argument("--resolution", type=int, default=256, help="synthetic image side in px (default 256)")
    parser.add_argument("--probe-dim", default="auto",
                        help="moment width: 'auto' (exact if moments fit 4 GiB), 0 (exact) or a projection width")
    parser.add_argument("--max-interval", type=int, default=12, help="longest interval probed, in blocks (12)")
    parser.add_argument("--ridge", type=float, default=1e-4, help="relative ridge of the linear probes (1e-4)")
    parser.add_argument("--hsic-tokens", type=int, default=256, help="tokens per forward for the CKA matrix (256)")
    parser.add_argument("--seed", type=int, default=0, help="calibration/noise/projection seed (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from ppcl.probe import run_probe

    probe_dim = args.probe_dim if args.probe_dim == "auto" else args.probe_dim
    result = run_probe(
        args.model, args.out, data=args.data, samples=args.samples, timesteps=args.timesteps,
        batch_size=args.batch_size, resolution=args.resolution, probe_dim=probe_dim,
        max_interval=args.max_interval, ridge=args.ridge, hsic_tokens=args.hsic_tokens, seed=args.seed,
        device=args.device,
    )
    exact = "exact" if result.projection.exact else f"projected to {result.projection.dim}"
    print(f"probed {len(result.blocks)} blocks of {result.family} over {result.calibration.forwards} forwards "
          f"({exact} moments); wrote {args.out}/probe.json, cka_heatmap.png, trend.png")
    return 0
