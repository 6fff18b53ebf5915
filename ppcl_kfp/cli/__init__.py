"""The ``ppcl`` commands that drive the DAG (``pipeline``, ``demo``); registered in :data:`ppcl.cli.COMMANDS`.

Same module protocol as :mod:`ppcl.cli`: ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``.
"""
