"""Generalized-Gaussian initialization (paper eq. 6), in the style of ``torch.nn.init``.

    W ~ GG(0, beta_w, gamma),  beta_w = sqrt(xi / fan * Gamma(1/gamma) / Gamma(3/gamma)),

so Var[W] = xi / fan. gamma = 2 is exactly He (Kaiming normal) initialization.

xi, the activation correction, is decided as follows:
- nonlinearities torch knows (linear, conv*, sigmoid, tanh, relu, leaky_relu, selu):
  xi = ``torch.nn.init.calculate_gain(nonlinearity, a) ** 2``, so gamma = 2 reproduces
  ``kaiming_normal_`` bit for bit in variance (1 for linear/sigmoid, 2 for relu,
  2 / (1 + a^2) for leaky_relu, 25/9 for tanh);
- gelu and silu, which torch gives no gain: the He argument itself, xi = 1 / E[f(z)^2] for
  z ~ N(0, 1) (ReLU gives 2 by the same rule), computed by quadrature:
  gelu 2.3517, silu 2.8108 (see :data:`XI_SECOND_MOMENT`).

Whole models (:func:`gg_init_`): every weight matrix of ``nn.Linear``, ``nn.Conv*`` and
transformers' GPT-2 ``Conv1D`` (stored (in, out), so fan-in is ``shape[0]`` there, while
``nn.Linear.weight`` is (out, in) with fan-in ``shape[1]``). Embeddings by default keep their
standard deviation and take the GG shape (``embeddings="shape"``); ``"keep"`` leaves them.
An output head whose weight is tied to the input embedding is initialised once, as the
embedding. Norms and biases keep the model's own initialization.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from scipy import integrate, stats
from torch import nn

from . import gg
from .runtime import is_conv1d

TORCH_NONLINEARITIES = (
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "sigmoid", "tanh", "relu", "leaky_relu", "selu",
)
_ACTIVATIONS = {
    "gelu": lambda z: 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0))),
    "silu": lambda z: z / (1.0 + math.exp(-z)),
}


@cache
def _second_moment_xi(nonlinearity: str) -> float:
    f = _ACTIVATIONS[nonlinearity]
    m2, _ = integrate.quad(lambda z: f(z) ** 2 * stats.norm.pdf(z), -40.0, 40.0, limit=200)
    return 1.0 / m2


XI_SECOND_MOMENT = {name: _second_moment_xi(name) for name in _ACTIVATIONS}


def xi_for(nonlinearity: str = "relu", a: float = 0.0) -> float:
    """The variance factor xi for an activation (see the module docstring)."""
    if nonlinearity in XI_SECOND_MOMENT:
        return XI_SECOND_MOMENT[nonlinearity]
    if nonlinearity not in TORCH_NONLINEARITIES:
        known = ", ".join(TORCH_NONLINEARITIES + tuple(XI_SECOND_MOMENT))
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; known: {known}")
    return nn.init.calculate_gain(nonlinearity, a) ** 2


def _fans(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"fan in/out needs a tensor of at least 2 dimensions, got shape {shape}")
    rf = math.prod(shape[2:])
    out_f, in_f = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    return in_f * rf, out_f * rf


def gg_beta(gamma: float, fan: int, xi: float = 2.0) -> float:
    """beta_w of eq. 6: the GG scale giving variance xi / fan at shape gamma."""
    return float(gg.beta_from_std(math.sqrt(xi / fan), gamma))


def gg_(
    tensor: torch.Tensor,
    gamma: float = 2.0,
    nonlinearity: str = "relu",
    a: float = 0.0,
    mode: str = "fan_in",
    generator: torch.Generator | None = None,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """Fill ``tensor`` in place with GG(0, beta_w, gamma) values, Var = xi / fan (eq. 6).

    ``mode`` is ``"fan_in"`` or ``"fan_out"``; ``transposed=True`` reads the shape as
    (in, out, ...) as transformers' ``Conv1D`` stores it. Sampling is done in float64 in log
    space and cast once, so gamma as small as 0.05 gives no inf/nan in float32.
    """
    if gamma <= 0:
        raise ValueError(f"gg_: gamma must be positive, got {gamma}")
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"gg_: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = _fans(tuple(tensor.shape), transposed)
    fan = fan_in if mode == "fan_in" else fan_out
    beta = gg_beta(gamma, fan, xi_for(nonlinearity, a))
    return gg_std_(tensor, gamma, beta=beta, generator=generator)


def gg_std_(
    tensor: torch.Tensor, gamma: float, *, std: float | None = None, beta: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``tensor`` with GG(0, beta, gamma) values, given the scale ``beta`` or the ``std``."""
    if (std is None) == (beta is None):
        raise ValueError("gg_std_: give exactly one of std and beta")
    if beta is None:
        beta = float(gg.beta_from_std(std, gamma))
    with torch.no_grad():
        gen_device = generator.device if generator is not None else tensor.device
        values = gg.sample(tensor.shape, 0.0, beta, gamma, generator=generator, dtype=tensor.dtype,
                            device=gen_device)
        tensor.copy_(values)
    return tensor


def gg_init_(
    model: nn.Module,
    gamma: float,
    nonlinearity: str = "relu",
    a: float = 0.0,
    mode: str = "fan_in",
    *,
    embeddings: str = "shape",
    generator: torch.Generator | None = None,
) -> list[str]:
    """GG-initialise every weight matrix of ``model`` in place; returns the names touched.

    Linear, convolution and GPT-2 Conv1D weights get eq. 6 with xi from ``nonlinearity``.
    Embeddings: ``"shape"`` re-samples them from a GG with the same standard deviation they
    have now (the model's own init scale, GG shape); ``"keep"`` leaves them. Weights shared
    by several modules (tied heads) are initialised once. Norms and biases are untouched.
    """
    if embeddings not in ("shape", "keep"):
        raise ValueError(f"gg_init_: embeddings must be 'shape' or 'keep', got {embeddings!r}")
    done: set[int] = set()
    names: list[str] = []
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in done:
            continue
        if isinstance(module, nn.Embedding):
            if embeddings == "keep":
                done.add(id(weight))
                continue
            std = float(weight.detach().float().std())
            if std > 0:
                gg_std_(weight, gamma, std=std, generator=generator)
            if module.padding_idx is not None:  # as torch and transformers do: the padding row stays zero
                with torch.no_grad():
                    weight[module.padding_idx].zero_()
        elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_conv1d(module):
            transposed = is_conv1d(module) or isinstance(module, nn.modules.conv._ConvTransposeNd)
            gg_(weight, gamma, nonlinearity, a, mode, generator, transposed=transposed)
        else:
            continue
        done.add(id(weight))
        names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names
