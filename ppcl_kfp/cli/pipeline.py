"""``ppcl pipeline compile|run --local|submit``: the Kubeflow pipeline, compiled, run here, or sent to a cluster.

One YAML config (:mod:`ppcl.config`) drives all three; it is validated before anything runs or is written.
"""

from __future__ import annotations

import argparse

HELP = "compile the Kubeflow pipeline, run it locally (kfp.local), or submit it to a Kubeflow Pipelines host"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("compile", help="write the compiled pipeline YAML (default pipelines/ppcl_pipeline.yaml)")
    c.add_argument("--out", help="output YAML file (default: pipelines/ppcl_pipeline.yaml in the checkout)")
    c.add_argument("--config", help="YAML config whose resources and values become the compiled defaults")
    c.add_argument("--components", action="store_true",
                   help="also recompile components/<stage>/component.yaml")  # fmt: skip
    r = sub.add_parser("run", help="run the whole DAG here with kfp.local (no cluster)")
    r.add_argument("--local", action="store_true", required=True, help="run locally (the only mode of `run`)")
    r.add_argument("--config", help="YAML config (teacher required)")
    r.add_argument("--run-id", help="run folder name under run_root (default: <name>-<date>-<time>-<hex>)")
    s = sub.add_parser("submit", help="submit a run to Kubeflow Pipelines; prints the run's URL")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080/pipeline")
    s.add_argument("--config", help="YAML config (teacher and data.source required)")
    s.add_argument("--experiment", default=None, help="KFP experiment (default: tracking.experiment of the config)")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    s.add_argument("--run-name", default=None, help="run name (default: <name>-<date>-<time>-<hex>)")


def _compile(args: argparse.Namespace) -> int:
    from ppcl.config import load_config
    from ppcl_kfp.dag import compile_components, compile_pipeline

    config = load_config(args.config) if args.config else None
    if args.components:
        for stage, path in compile_components().items():
            print(f"{stage}: {path}")
    out = compile_pipeline(args.out, config)
    print(f"compiled pipeline -> {out}")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ppcl.config import load_config
    from ppcl_kfp.dag import find_outputs, new_run_id, prepare_run_dir, run_local

    config = load_config(args.config)
    run_dir = prepare_run_dir(config, Path(config.run_root) / (args.run_id or new_run_id(config.name)))
    kfp_run = run_local(config, run_dir)
    outputs = find_outputs(kfp_run)
    print(f"run folder: {run_dir}")
    if "report" in outputs:
        print(f"report: {outputs['report'] / 'report.html'}")
    return 0


def submit(config, host: str, *, experiment: str | None = None, namespace: str | None = None,
           run_name: str | None = None, client=None) -> str:
    """Submit ``config`` to the KFP API at ``host``; returns the run's URL. ``client``: a kfp.Client (tests)."""
    import kfp

    from ppcl.errors import PPCLError
    from ppcl_kfp.dag import load_pipeline_module, new_run_id

    if not config.data.source:
        raise PPCLError("config: field 'data.source' is required to submit (a cluster has no synthetic default)")
    module = load_pipeline_module()
    pipeline = module.make_pipeline(config)
    try:
        client = client or kfp.Client(host=host, namespace=namespace)
        result = client.create_run_from_pipeline_func(
            pipeline, arguments=module.pipeline_arguments(config), run_name=run_name or new_run_id(config.name),
            experiment_name=experiment or config.tracking.experiment, namespace=namespace,
        )  # fmt: skip
    except PPCLError:
        raise
    except Exception as e:  # connection refused, 401/403/404 from the API: one line naming the host
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PPCLError(f"submitting to {host} failed: {type(e).__name__}: {reason}") from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


def _submit(args: argparse.Namespace) -> int:
    from ppcl.config import load_config

    config = load_config(args.config)
    url = submit(config, args.host, experiment=args.experiment, namespace=args.namespace, run_name=args.run_name)
    print(f"submitted: {url}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"compile": _compile, "run": _run_local, "submit": _submit}[args.action](args)
