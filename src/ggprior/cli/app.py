"""The typer application every subcommand module registers on, and the CLI's conventions.

Every command reads ``ggprior VERB SOURCE OUT [options]``. Modules here import the library inside
each command (so ``ggprior --help`` stays fast) and print through :data:`console`, which treats
every string as plain text (``markup=False``): paths, tensor names and error messages are data,
not rich markup.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
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


THREADS_HELP = ("intra-op threads for torch and numba (default: GGPRIOR_THREADS, else the CPUs this process may "
                "use that are idle now)")


@app.callback()
def _root(
    threads: int = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
) -> None:
    """Generalized-Gaussian priors for language models: fit, init, train, reshape, compress, RF8."""
    if "--help" in sys.argv[1:]:
        return  # a subcommand's --help: no torch import, no idle-CPU measurement
    from ..threads import configure_threads  # imports torch: only once a command runs

    try:
        configure_threads(threads)
    except ValueError as e:  # GGPRIOR_THREADS not a positive integer
        fail(f"GGPRIOR_THREADS: {e}")


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


OVERWRITE_HELP = "replace OUT if it exists"


def check_output(out: Path, inputs: tuple[object, ...], *, overwrite: bool, writes: tuple[Path, ...] = ()) -> None:
    """Fail before anything is written when OUT (or a file ``writes`` names inside it) is one of ``inputs``
    (the same file or folder, symlinks resolved), or when OUT exists (a file, or a folder with files in it)
    and ``overwrite`` is off."""
    for target in (out, *writes):
        for given in inputs:
            if given is None or not Path(str(given)).exists():
                continue
            src = Path(str(given))
            same = os.path.samefile(src, target) if target.exists() else src.resolve() == target.resolve()
            if same:
                fail(f"{target}: is the input {given}; write the output to another path")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        if not overwrite:
            fail(f"{out}: already exists (pass --overwrite to replace it)")
