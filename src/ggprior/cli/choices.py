"""The names the commands' help and defaults show, written out so ``ggprior --help`` imports no library
module (tests/cli/test_cli_conventions.py checks them against the library's registries)."""

FORMATS = ("rf8", "rf8-round", "rf8-authors", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2", "fp8-e4m3-scaled",
           "fp8-e5m2-scaled", "int8")  # ggprior.formats.FORMATS
CODERS = ("fl", "eg", "huffman", "ans", "ans-hist")  # ggprior.codec.registry.CODERS
SELECT = ("matrices", "linear", "all")  # ggprior.deepshape.SELECT
TAILS = ("scale", "keep", "reshape")  # ggprior.deepshape.TAILS
BIN_WIDTH = 2.0**-13  # ggprior.deepshape.BIN_WIDTH
N_MIN = 1e-3  # ggprior.deepshape.N_MIN
INIT_SCHEMES = ("default", "he", "xavier", "gg")  # ggprior.tasks.models.INIT_SCHEMES
RATES = ("none", "backslash", "l1", "l2")  # ggprior.train.backslash.RATES
METHODS = ("allreduce", "fp16", "powersgd", "gct")  # ggprior.gct.METHODS
QUANT_STEP = 2.0**-8  # ggprior.train.run.QUANT_STEP
INCLUDE = ("all", "matrices")  # ggprior.codec.quantizer.INCLUDE_CHOICES
