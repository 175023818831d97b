"""``python -m ggprior``: the same as the ``ggprior`` command."""

from .cli import main

main()
