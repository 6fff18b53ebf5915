"""The ``ppcl`` command.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``: ``ppcl/cli/<name>.py`` for the library's commands, ``ppcl_kfp/cli/<name>.py`` for those
that drive the Kubeflow DAG (``pipeline``, ``demo``). Modules import heavy libraries (torch, diffusers, kfp)
inside ``run`` only, so ``ppcl --help`` stays instant. A :class:`ppcl.errors.PPCLError` raised anywhere
becomes one line on stderr and exit status 2, and so does an OSError that describes the user's environment
(read-only mount, permission, full disk: :data:`ppcl.outputs.ENVIRONMENT_ERRNOS`); other OSErrors are bugs and
keep their traceback.

Every (sub)command with an ``--out`` option gets ``--overwrite`` here, and runs inside
:func:`ppcl.outputs.guard`: the one output rule (new path, or a previous output of the same command; never a
folder holding other ppcl outputs) and the exclusive lock on ``--out``.

Why :data:`COMMANDS` holds full module paths as strings: the ``ppcl`` command is the one place where the
library and the DAG layer above it (``ppcl_kfp``, which imports ppcl) meet. Naming the DAG commands' modules
as strings, imported only when the parser is built, keeps ppcl/ free of any import of the layer above
(tests/test_layers.py), and a command whose module is not installed (ppcl without ppcl_kfp, as in the runtime
image) is left out of ``ppcl --help`` instead of breaking every other command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module that implements it; order is the order shown by --help.
COMMANDS: dict[str, str] = {
    "tiny": "ppcl.cli.tiny",
    "synth": "ppcl.cli.synth",
    "shard": "ppcl.cli.shard",
    "encode": "ppcl.cli.encode",
    "probe": "ppcl.cli.probe",
    "select": "ppcl.cli.select",
    "plan": "ppcl.cli.plan",
    "distill": "ppcl.cli.distill",
    "export": "ppcl.cli.export",
    "lora": "ppcl.cli.lora",
    "evaluate": "ppcl.cli.evaluate",
    "report": "ppcl.cli.report",
    "card": "ppcl.cli.card",
    "pipeline": "ppcl_kfp.cli.pipeline",
    "demo": "ppcl_kfp.cli.demo",
    "compare": "ppcl.cli.compare",
    "bench": "ppcl.cli.bench",
    "cluster": "ppcl.cli.cluster",
}

#: Commands with a long loop: each gets ``--no-progress`` here (bars on a terminal, periodic plain lines in a log:
#: :mod:`ppcl.progress`); the command passes ``progress=not args.no_progress`` on.
PROGRESS_COMMANDS = ("synth", "shard", "encode", "probe", "distill", "evaluate")
#: Stages that log to MLflow when run by hand, as in the pipeline (:func:`ppcl.tracking.command_tracking`): each
#: gets ``--no-tracking`` and calls :func:`ppcl.tracking.log_command` when it is done.
TRACKED_COMMANDS = ("shard", "encode", "probe", "select", "distill", "export", "evaluate")


def _load(name: str):
    """The module of command ``name``, or None when it (or its package) is not installed."""
    module = COMMANDS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        # only the command's own module (or a package above it) missing means "not part of this install";
        # a missing dependency inside it is a real error
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppcl",
        description="Pluggable pruning with contiguous layer distillation for MMDiT diffusion transformers.",
    )
    from ppcl import __version__

    parser.add_argument("--version", action="version", version=f"ppcl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        if module is None:  # a command whose module is not part of this build
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
        _add_overwrite(p, name)
        if name in PROGRESS_COMMANDS and "--no-progress" not in p._option_string_actions:
            p.add_argument("--no-progress", action="store_true",
                           help="no progress output (default: a bar on a terminal, else a plain line every "
                                "$PPCL_PROGRESS_INTERVAL s, default 30, with rate and ETA)")  # fmt: skip
        if name in TRACKED_COMMANDS:
            p.add_argument("--no-tracking", action="store_true",
                           help="do not log this run to MLflow (default: $MLFLOW_TRACKING_URI, else the local "
                                "store ./ppcl-runs/mlflow.db that ppcl compare and the demo use)")  # fmt: skip
    return parser


def _add_overwrite(parser: argparse.ArgumentParser, command: str) -> None:
    """``--overwrite`` on ``parser`` and on each of its nested subcommands that has ``--out``; records the
    command's name (``select``, ``pipeline compile``) for the output rule."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                _add_overwrite(sub, f"{command} {sub_name}")
    if "--out" in parser._option_string_actions and "--overwrite" not in parser._option_string_actions:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing --out that is not a previous output of this command "
                                 "(never a folder holding other ppcl outputs)")  # fmt: skip
        parser.set_defaults(_out_command=command)


def _os_error_line(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def main(argv: list[str] | None = None) -> int:
    from ppcl.errors import PPCLError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from ppcl import outputs

    try:
        from ppcl.storage import refuse_uri_credentials

        for dest, value in vars(args).items():  # a secret in a flag ends up in logs and process listings
            if isinstance(value, (str, list)) and "://" in str(value):
                refuse_uri_credentials(value, f"--{dest.replace('_', '-')}")
        with outputs.guard(getattr(args, "_out_command", args.command), getattr(args, "out", None),
                           overwrite=getattr(args, "overwrite", False), resume=getattr(args, "resume", False)):
            if args.command not in TRACKED_COMMANDS:
                return int(args._module.run(args) or 0)
            from ppcl.tracking import command_tracking

            with command_tracking(not args.no_tracking):
                return int(args._module.run(args) or 0)
    except PPCLError as e:
        print(f"ppcl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in outputs.ENVIRONMENT_ERRNOS:
            raise
        print(f"ppcl {args.command}: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ppcl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
