"""``ppcl evaluate``: FID, CLIP score, fidelity to the teacher, speed and memory; metrics.json + grid + report."""

from __future__ import annotations

import argparse

HELP = "evaluate pruned pipelines against the teacher: FID, CLIP score, fidelity, latency, memory, image grid"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="PRUNED",
                        help="pruned pipeline directory (repeat for several)")
    parser.add_argument("--teacher", required=True, metavar="PIPE", help="teacher pipeline directory")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="prompts: one per line, or .jsonl with a 'prompt' or 'caption' field")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: metrics.json, grid.png, report.html")
    parser.add_argument("--reference", metavar="IMAGES", help="folder of reference images for FID")
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="images per prompt (default 1)")
    parser.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--steps", type=int, default=20, metavar="S", help="denoising steps (default 20)")
    parser.add_argument("--resolution", type=int, default=512, metavar="R",
                        help="square generation resolution in pixels (default 512)")
    parser.add_argument("--height", type=int, help="generation height (overrides --resolution)")
    parser.add_argument("--width", type=int, help="generation width (overrides --resolution)")
    parser.add_argument("--guidance", type=float, metavar="G", help="guidance scale (default: the pipeline's)")
    parser.add_argument("--clip", metavar="PATH", help="CLIP model directory (or hub id) for CLIP score")
    parser.add_argument("--fid-features", metavar="SPEC",
                        help="FID feature extractor: clip | inception:WEIGHTS.pth | pkg.module:factory "
                             "(default: clip when --clip is given)")
    parser.add_argument("--fid-cache", metavar="DIR", help="reference statistics cache (default ~/.cache/ppcl/fid)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="images per pipeline call (default 4)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--latency-repeats", type=int, default=10, help="timed transformer forwards (default 10)")
    parser.add_argument("--latency-warmup", type=int, default=2, help="untimed forwards first (default 2)")
    parser.add_argument("--grid-samples", type=int, default=4, help="rows in grid.png (default 4)")
    parser.add_argument("--name", action="append", help="display name per --model, in order (default: folder name)")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ppcl.errors import PPCLError
    from ppcl.evaluate.generate import read_prompts
    from ppcl.evaluate.metrics import EvalSettings

    prompts = read_prompts(args.prompts)
    try:
        settings = EvalSettings(
            steps=args.steps, height=args.height or args.resolution, width=args.width or args.resolution,
            guidance=args.guidance, seeds=args.seeds, seed_offset=args.seed_offset, batch_size=args.batch_size,
            device=args.device, dtype=args.dtype, clip=args.clip, reference=args.reference,
            fid_features=args.fid_features, fid_cache_dir=args.fid_cache, latency_warmup=args.latency_warmup,
            latency_repeats=args.latency_repeats, grid_samples=args.grid_samples,
        )
    except ValidationError as e:
        err = e.errors()[0]
        raise PPCLError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None

    import torch

    from ppcl.evaluate.evaluation import evaluate_models
    from ppcl.evaluate.html import fmt

    # Scoped, not global: the CLI also runs in-process (tests, `ppcl demo`), where later training needs grad.
    with torch.no_grad():
        result = evaluate_models(args.model, args.teacher, prompts, args.out, settings, names=args.name)
    for m in result.metrics.models:
        f = m.fidelity
        extra = ""
        if f is not None:
            psnr = "inf (identical)" if f.latent_psnr_db is None else f"{f.latent_psnr_db:.2f} dB"
            extra = f"  latent PSNR {psnr}  cos {f.latent_cosine:.4f}"
        print(f"{m.name}: {m.parameters:,} params ({m.parameters_ratio:.3f})  "
              f"{m.latency.per_step_s * 1e3:.2f} ms/step  speedup {m.speedup:.2f}  FID {fmt(m.fid)}  "
              f"CLIP {fmt(m.clip_score)}{extra}")
    print(f"wrote {result.metrics_path}, {result.grid_path}, {result.report_path}")
    return 0
