"""``ppcl cluster``: the cluster side: render overlays, render/submit the multi-node distillation TrainJob."""

from __future__ import annotations

import argparse
import shlex

HELP = "cluster side: render manifests, render or submit the multi-node distillation TrainJob"


def _trainjob_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="training nodes (pods), >= 1 (default 1)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs = torchrun processes per node, >= 1 (default 1)")
    p.add_argument("--image", default=None, help="runtime image (default $PPCL_IMAGE or ghcr.io/ppcl/ppcl:<version>)")
    p.add_argument("--model", required=True, help="teacher pipeline: s3:// folder or hub id")
    p.add_argument("--plan", required=True, help="s3:// URI of plan.json")
    p.add_argument("--data", required=True, help="s3:// URI of the latent/text-embedding cache")
    p.add_argument("--out-uri", required=True, help="s3:// folder for plugs and checkpoints (same on retry = resume)")
    p.add_argument("--name", default=None, help="TrainJob name (default derived from --out-uri)")
    p.add_argument("--cpu", default="32", help="CPU per node, requests = limits (default 32)")
    p.add_argument("--memory", default="256Gi", help="memory per node, requests = limits (default 256Gi)")
    p.add_argument("--distill-args", default="", help="more `ppcl distill` arguments, one string, e.g. '--steps 2000'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("render", help="kubectl kustomize an overlay (checks its secret env files first)")
    p.add_argument("overlay", help="overlay folder or name under manifests/overlays (dev, production)")
    p = sub.add_parser("render-trainjob", help="print the multi-node distillation TrainJob as YAML")
    _trainjob_args(p)
    p = sub.add_parser("submit-trainjob", help="create the TrainJob, stream its logs, wait; exit 1 if it fails")
    _trainjob_args(p)
    p.add_argument("--namespace", default=None, help="namespace (default: the pod's, or the kubeconfig context's)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: never)")


def _spec(args: argparse.Namespace):
    from ppcl import cluster
    from ppcl.errors import PPCLError
    from ppcl.trainjob import TrainJobSpec

    try:
        extra = shlex.split(args.distill_args)
    except ValueError as e:
        raise PPCLError(f"--distill-args: {e}") from e
    return TrainJobSpec(
        model=args.model, plan=args.plan, data=args.data, out_uri=args.out_uri, nodes=args.nodes,
        gpus=cluster.GPU_POOL.accelerator_count if args.gpus is None else args.gpus,
        image=args.image, name=args.name, cpu=args.cpu, memory=args.memory, extra_args=extra,
    )


def run(args: argparse.Namespace) -> int:
    if args.cluster_command == "render":
        from ppcl.cluster import render_overlay

        print(render_overlay(args.overlay), end="")
        return 0
    from ppcl import trainjob

    spec = _spec(args)
    if args.cluster_command == "render-trainjob":
        print(trainjob.to_yaml(trainjob.render_trainjob(spec)), end="")
        return 0
    trainjob.submit(spec, namespace=args.namespace, timeout_s=args.timeout)
    return 0
