"""ggprior: generalized-Gaussian priors across a language model's life.

Statistics (:mod:`ggprior.ggd`, :mod:`ggprior.stats`, :mod:`ggprior.hooks`), GG initialization
(:mod:`ggprior.init`), rate-constrained training (:mod:`ggprior.train`, :mod:`ggprior.distributed`),
DeepShape (:mod:`ggprior.deepshape`), compression (:mod:`ggprior.quant`, :mod:`ggprior.coding`,
:mod:`ggprior.compression`, :mod:`ggprior.container`), number formats (:mod:`ggprior.rf8`,
:mod:`ggprior.formats`) and the end-to-end :mod:`ggprior.pipeline`. Submodules whose name equals
a function's (``ggprior.train``, ``ggprior.deepshape``) keep their module names here.
"""

from .compression import measure, quantized_state_dict
from .container import ContainerError, load_compressed, read_header, save_compressed
from .data import get_tokenizer, load_task, task_info
from .deepshape import deepshape_, reshape_values
from .distributed import GCTConfig, gct_hook, wrap_ddp
from .formats import FORMATS as WEIGHT_FORMATS
from .formats import convert as to_format
from .ggd import GGFit, cdf, entropy, fit, logpdf, pdf, ppf, refine_mle, sample, variance
from .hooks import activation_statistics, gradient_statistics
from .init import gg_, gg_init_, xi_for
from .models import build_model, initialize_, load_minilm
from .pipeline import PipelineConfig, run_pipeline
from .quant import QuantError, dequantize, quantize, step_for_bits, step_for_rel_error
from .rf8 import RF8Linear, to_rf8
from .sources import SourceError, open_source
from .stats import fit_model
from .train import BackSlash, Callback, TrainConfig, TrainError, evaluate, make_rate_callback
from .train.act import ACT, activation_bits

__version__ = "0.1.0"
