"""ggprior: generalized-Gaussian priors across a language model's life.

The public API is the names in ``__all__``; each is imported on first use (PEP 562), so
``import ggprior`` imports neither torch nor any submodule. Everything else lives in its
package: :mod:`ggprior.gg` (the distribution), :mod:`ggprior.io`, :mod:`ggprior.stats`,
:mod:`ggprior.init`, :mod:`ggprior.codec`, :mod:`ggprior.formats`, :mod:`ggprior.train`,
:mod:`ggprior.gct`, :mod:`ggprior.deepshape`, :mod:`ggprior.tasks`, :mod:`ggprior.report`,
:mod:`ggprior.pipeline` (see docs/architecture.md).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {
    # the distribution and statistics
    "GeneralizedGaussian": "ggprior.gg", "fit": "ggprior.gg", "GGFit": "ggprior.gg",
    "fit_model": "ggprior.stats", "activation_statistics": "ggprior.stats", "gradient_statistics": "ggprior.stats",
    # initialization and training
    "gg_": "ggprior.init", "gg_init_": "ggprior.init",
    "BackSlash": "ggprior.train", "ACT": "ggprior.train", "backslash_step_": "ggprior.train",
    "GCTConfig": "ggprior.gct", "GCTState": "ggprior.gct", "gct_hook": "ggprior.gct",
    # DeepShape
    "deepshape": "ggprior.deepshape", "deepshape_": "ggprior.deepshape",
    # coding and number formats
    "measure": "ggprior.codec", "save_compressed": "ggprior.codec", "load_compressed": "ggprior.codec",
    "from_pretrained": "ggprior.codec",
    "to_format": "ggprior.formats", "to_rf8": "ggprior.formats",
    # the main job
    "run_pipeline": "ggprior.pipeline", "PipelineConfig": "ggprior.pipeline",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ggprior' has no attribute {name!r}")
    module = importlib.import_module(home)
    if name == "deepshape":  # the subpackage owns this attribute; it is callable: ggprior.deepshape(model, ...)
        return module
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
