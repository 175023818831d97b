"""Module surgery: find the linear layers of a model and replace them in place.

A linear layer is an ``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (:func:`ggprior.runtime.is_linear`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from ..runtime import is_conv1d, is_linear, linear_weight

__all__ = ["get_module", "is_conv1d", "is_linear", "linear_weight", "replace_linear_layers", "set_module"]


def replace_linear_layers(
    model: nn.Module, make: Callable[[str, nn.Module], nn.Module],
    skip: Callable[[str], bool] | Iterable[str] | None = None,
) -> list[str]:
    """Replace every linear layer (``nn.Linear``, transformers ``Conv1D``) ``m`` named ``name`` by
    ``make(name, m)``, in place. ``skip`` is a predicate on names or a collection of names to keep.
    Returns the names replaced. A layer reached under several names is replaced everywhere once.
    """
    if skip is None:
        skip_fn: Callable[[str], bool] = lambda n: False  # noqa: E731
    elif callable(skip):
        skip_fn = skip
    else:
        names = set(skip)
        skip_fn = names.__contains__
    done: dict[int, nn.Module] = {}
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not is_linear(child) or skip_fn(full):
                continue
            if id(child) not in done:
                done[id(child)] = make(full, child)
                replaced.append(full)
            setattr(parent, child_name, done[id(child)])
    return replaced


def get_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
