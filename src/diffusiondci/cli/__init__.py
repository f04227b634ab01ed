"""The ``diffusiondci`` command line: one subcommand per stage of the paper.

Each command is a thin call into its stage; errors a user can fix are printed as one line
(``error: <file>: <what to do>``) with exit status 2 and no traceback.

The Typer app, the preset rule and the option helpers every command shares are in
:mod:`~diffusiondci.cli.common`; the commands, by job, in :mod:`~diffusiondci.cli.data_commands`
(``prepare``, ``import-patches``), :mod:`~diffusiondci.cli.train_commands` (``train-encoder``,
``train-dsdm``, ``train-seg``) and :mod:`~diffusiondci.cli.use_commands` (``sample``, ``probe``,
``demo``, ``report``, ``segment``, ``rasterize``, ``evaluate-seg``, ``experiment``), registered in
that order (the order of ``diffusiondci --help``). ``python -m diffusiondci.cli`` (e.g. under
``torchrun``) runs :func:`main` like the ``diffusiondci`` program.
"""

from __future__ import annotations

import sys

import typer

from ..errors import UserInputError
from . import data_commands, train_commands, use_commands  # noqa: F401  (importing registers the commands)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except UserInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume (add --resume for train-* commands)", err=True)
        sys.exit(130)
