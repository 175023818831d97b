"""The ``ggprior`` command: one subcommand per stage (thin wrappers over the Python API).

Every module in this package other than :mod:`.app` registers its subcommands on
:data:`ggprior.cli.app.app` when imported; they are all imported here.
"""

from __future__ import annotations

import importlib
import pkgutil

from .app import app

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "app":
        importlib.import_module(f"{__name__}.{_module.name}")


def main() -> None:
    """Console-script entry point."""
    app()
