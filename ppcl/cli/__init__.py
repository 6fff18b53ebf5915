"""The ``ppcl`` command.

Each subcommand lives in its own module ``ppcl/cli/<name>.py`` exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules import heavy libraries (torch, diffusers, kfp)
inside ``run`` only, so ``ppcl --help`` stays instant. A :class:`ppcl.errors.PPCLError` raised anywhere
becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under ppcl.cli; order is the order shown by --help.
COMMANDS: dict[str, str] = {
    "tiny": "tiny",
    "synth": "synth",
    "shard": "shard",
    "encode": "encode",
    "probe": "probe",
    "select": "select",
    "plan": "plan",
    "distill": "distill",
    "export": "export",
    "evaluate": "evaluate",
    "report": "report",
    "pipeline": "pipeline",
    "demo": "demo",
    "compare": "compare",
    "bench": "bench",
    "cluster": "cluster",
}


def _load(name: str):
    try:
        return importlib.import_module(f"ppcl.cli.{COMMANDS[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"ppcl.cli.{COMMANDS[name]}":
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from ppcl.errors import PPCLError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        from ppcl.storage import refuse_uri_credentials

        for dest, value in vars(args).items():  # a secret in a flag ends up in logs and process listings
            if isinstance(value, (str, list)) and "://" in str(value):
                refuse_uri_credentials(value, f"--{dest.replace('_', '-')}")
        return int(args._module.run(args) or 0)
    except PPCLError as e:
        print(f"ppcl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ppcl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
