"""Entropy coders for quantized weights: exact code lengths from histograms, and real bitstreams.

* :mod:`.fixed` - fixed-length (FL) code;
* :mod:`.expgolomb` - Exp-Golomb of order k (zigzag for signed values);
* :mod:`.huffman` - canonical Huffman;
* :mod:`.ans` - rANS (constriction) under the fitted GG model or the histogram;
* :mod:`.histogram`, :mod:`.ggmodel` - histograms and the GG model of quantized integers;
* :mod:`.registry` - one ``encode``/``decode`` interface over every coder (used by the container).
"""

from .bits import CodingError
from .histogram import Histogram, histogram

__all__ = ["CodingError", "Histogram", "histogram"]
