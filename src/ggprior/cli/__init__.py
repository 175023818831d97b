"""The ``ggprior`` command: one subcommand per stage (thin wrappers over the Python API)."""

from __future__ import annotations

from . import fit  # noqa: F401  (registers subcommands on app)
from . import compress  # noqa: F401
from .app import app


def main() -> None:
    """Console-script entry point."""
    app()
