"""The typer application every subcommand module registers on, and the CLI's conventions.

Every command reads ``ggprior VERB SOURCE OUT [options]``. Modules here import the library inside
each command (so ``ggprior --help`` stays fast) and print through :data:`console`, which treats
every string as plain text (``markup=False``): paths, tensor names and error messages are data,
not rich markup.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(
    name="ggprior",
    help="Generalized-Gaussian priors for language models: fit, init, train, reshape, compress, RF8.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True, markup=False)


@app.callback()
def _root() -> None:
    """Generalized-Gaussian priors for language models: fit, init, train, reshape, compress, RF8."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error (as plain text) and exit non-zero."""
    console.print(Text.assemble(("error:", "bold red"), " ", str(message)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def renamed(value: object, old: str, new: str) -> None:
    """Fail with a line naming the new spelling when the old option ``old`` was given (``value`` not None)."""
    if value is not None:
        fail(f"{old} is gone: {new}")


def need(value: object, what: str, usage: str) -> None:
    """Fail when a positional argument is missing, showing the usage line."""
    if value is None:
        fail(f"missing {what}: usage: {usage}")
