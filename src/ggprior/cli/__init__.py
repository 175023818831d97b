"""The ``ggprior`` command: one subcommand per stage (thin wrappers over the Python API).

Every module in this package other than :mod:`.app` registers its subcommands on
:data:`ggprior.cli.app.app` when imported; they are all imported here.
"""

from __future__ import annotations

import importlib
import pkgutil
import signal
import sys

from .app import app, console

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "app":
        importlib.import_module(f"{__name__}.{_module.name}")


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every ``finally`` and context manager runs."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    """Console-script entry point. SIGTERM unwinds like an error (temporary files and folders are removed,
    data-parallel workers stopped) and exits 143; SIGKILL cannot be caught (docs/reliability.md)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except Terminated:
        console.print("error: terminated (SIGTERM); partial outputs removed", highlight=False)
        sys.exit(128 + signal.SIGTERM)
