"""Quantization and entropy coding of weights, and the ``.ggz`` file.

* :mod:`.quantizer` - uniform scalar quantization, step rules, :func:`quantize_tensor` (the one
  step every coder shares: step, integers, histogram, GG fit);
* :mod:`.bits` - bit packing and the integer maps (zigzag, sign/magnitude);
* :mod:`.fixed`, :mod:`.expgolomb`, :mod:`.huffman`, :mod:`.ans` - the coders;
* :mod:`.histogram`, :mod:`.ggmodel` - histograms and the GG model of quantized integers;
* :mod:`.registry` - the coder names and one ``encode``/``decode`` interface over them;
* :mod:`.lengths` - code lengths of a whole model from histograms (:func:`measure`);
* :mod:`.rans` - the table-driven rANS coder (integer frequency tables stored in the file);
* :mod:`.header`, :mod:`.writer`, :mod:`.container` - the ``.ggz`` file: format and checks, writing,
  reading and the public API (:func:`save_compressed`, :func:`load_compressed`);
* :mod:`.allocate`, :mod:`.sensitivity`, :mod:`.target` - the GG-model bit allocation, its sensitivity weights
  (:func:`sensitivity_weights`, :func:`calibration_weights`: the Fisher of a model folder on text) and target sizes;
* :mod:`.channels` - a matrix's step shaped per row and column by the Fisher (:class:`ChannelScales`,
  :func:`channel_scales`);
* :mod:`.checkpoint` - a ``.ggz`` back to a Hugging Face folder or a model (:func:`decompress`, :func:`from_pretrained`).

Imports ``gg`` and ``io`` only.
"""

from .bits import CodingError
from .channels import ChannelScales, channel_scales
from .checkpoint import decompress, from_pretrained
from .container import (
    ContainerError,
    inspect_rows,
    load_compressed,
    load_integers,
    read_header,
    save_compressed,
    stored_bytes,
)
from .histogram import Histogram, histogram
from .lengths import measure, quantized_state_dict, summarize, tensor_bits
from .quantizer import QuantError, QuantizedTensor, dequantize, quantize, quantize_tensor
from .registry import CODERS, MEASURES
from .sensitivity import calibration_weights, sensitivity_weights
