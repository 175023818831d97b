"""Number formats for weights: one registry (:mod:`.registry`: rf8, rf8-round, rf8-authors, fp16,
bf16, fp8 and int8), the RF8 codec (:mod:`.rf8`) and its analysis (:mod:`.rf8_analysis`),
error measures (:mod:`.metrics`), one quantized ``Linear`` for every format (:mod:`.layers`),
whose weight is the tensor subclass :class:`~.quant_tensor.QuantWeight` (:mod:`.quant_tensor`), and
its fused decode-and-multiply kernels for the 8-bit formats (:mod:`.lut_kernels`),
module surgery (:mod:`.surgery`) and quantized safetensors files (:mod:`.files`).
Imports ``io`` (and :mod:`ggprior.runtime`) only.
"""

from .files import (
    ALIAS_KEY,
    META_KEY,
    QUANTIZED_FILE,
    QuantizedFile,
    default_select,
    load_quantized,
    load_quantized_model,
    open_quantized,
    parse_select,
    save_quantized,
    save_quantized_model,
)
from .layers import QuantLinear, RF8Linear, layer_format, make_layer, quantized_layers, to_format, to_rf8, weight_bytes
from .metrics import error_stats, mean_relative_error, relative_error, sqnr_db
from .quant_tensor import QuantWeight
from .registry import FORMATS, RF8_MODES, Format, QTensor, decode, encode, get_format, roundtrip
