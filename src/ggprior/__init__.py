"""ggprior: generalized-Gaussian priors across a language model's life.

Measure GG statistics (:mod:`ggprior.ggd`, :mod:`ggprior.stats`), initialise from a GG prior
(:mod:`ggprior.init`), and the stages that build on them.
"""

from .compression import measure
from .container import ContainerError, load_compressed, save_compressed
from .ggd import GGFit, cdf, entropy, fit, logpdf, pdf, ppf, refine_mle, sample, variance
from .init import gg_, gg_init_, xi_for
from .quant import dequantize, quantize
from .sources import SourceError, open_source
from .stats import fit_model

__version__ = "0.1.0"
