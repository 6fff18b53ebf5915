"""``ppcl probe``: streaming similarity statistics of a teacher -> DIR/probe.json, cka_heatmap.png, trend.png."""

from __future__ import annotations

import argparse

HELP = "probe block similarity (CKA, linear probes, trend, interval probes) -> DIR/probe.json + plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ppcl.settings import ProbeSettings, add_settings_arguments

    parser.add_argument("--model", required=True, help="diffusers pipeline directory (the teacher)")
    parser.add_argument("--data", default=None, help="latent cache (ppcl encode); default: built-in synthetic set")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    add_settings_arguments(parser, ProbeSettings)  # --device and --dtype among them


def run(args: argparse.Namespace) -> int:
    from ppcl.settings import ProbeSettings, settings_from_args

    cfg = settings_from_args(ProbeSettings, args)  # checked before torch is even imported

    from ppcl.probe import run_probe

    result = run_probe(args.model, args.out, data=args.data, progress=not args.no_progress, **cfg.model_dump())
    from ppcl.tracking import log_command

    ckas = [b.cka for b in result.blocks if b.cka is not None]
    log_command("probe", {"blocks": len(result.blocks), "intervals": len(result.intervals),
                          "forwards": result.calibration.forwards,
                          "mean_cka": sum(ckas) / len(ckas) if ckas else None, "min_cka": min(ckas) if ckas else None},
                args.out, cfg.model_dump(mode="json"))  # fmt: skip
    exact = "exact" if result.projection.exact else f"projected to {result.projection.dim}"
    print(f"probed {len(result.blocks)} blocks of {result.family} over {result.calibration.forwards} forwards "
          f"({exact} moments); wrote {args.out}/probe.json, cka_heatmap.png, trend.png")
    if result.trained is not None:
        t = result.trained
        print(f"trained-plug probe: {len(t.intervals)} intervals x {t.steps} steps in {t.seconds:.0f}s "
              "(probe.json field trained; ppcl select --score trained)")
    return 0
