"""RF8, the paper's 8-bit residual floating-point format (SPEC.md section 6).

One byte per value::

    bit 7     | bits 6..2                                  | bits 1..0
    sign S    | exponent field: bit 6 = sign of E, 5..2=|E| | residual R

    value = (-1)^S * 2^E * (1 + 2^-(R + 1)),   E in -15..15,  R in 0..3

so each octave holds the four magnitudes 1.0625, 1.125, 1.25, 1.5 times 2^E; the largest
magnitude is 1.5 * 2^15 = 49152, the smallest non-zero one 1.0625 * 2^-15 (about 3.24e-5).
The paper's worked example -0.39 -> sign 1, exponent 10010, residual 00 -> -0.375 is code 0xC8.

Decisions on the points SPEC.md leaves OPEN (docs/rf8.md has the reasoning and measurements):

* Zero. The exponent field has two encodings of E = 0 (00000 and 10000). 10000 ("-0") means
  zero: codes 0x40 (+0) and 0xC0 (-0) are the canonical zeros; 0x41-0x43 and 0xC1-0xC3 are
  non-canonical zeros (they decode to +-0 and are never produced by the encoder).
* Exact powers of two (no second 1-bit within 4 places of the first). The residual saturates at
  its largest distance, d = 4: |x| in [2^E, 1.0625 * 2^E) encodes as 1.0625 * 2^E (R = 3),
  the nearest code (error <= 6.25%), instead of falling to 1.5 * 2^(E-1) (error up to 25%).
* Rounding. ``mode="truncate"`` (the paper's "remainder truncated", format ``rf8``) keeps the
  first bit and the position of the second and drops the rest, i.e. rounds the magnitude down
  to a code, except for the rule above. ``mode="nearest"`` (format ``rf8-round``) picks the code
  nearest in value, ties toward zero. Both use the same decode table.
* Range. Magnitudes above 49152 (and +-inf) saturate to +-49152 ("clipped to the nearest
  bound"). Below the range: truncation gives +-0 for |x| < 2^-15; nearest rounding gives +-0 up
  to half the smallest code and the smallest code above that. The sign of zero is kept.
* NaN has no code: encoding a NaN raises ``ValueError`` naming the tensor.
* Scaling: none. RF8's grid is the same in every octave, so a power-of-two scale changes only
  where the 31-octave range sits, and 2^-15..2^15 already holds trained weights.
* Encoding reads the value as float32 (float64 input is rounded to float32 first).

Multiplication. :func:`multiply_alg2` is Algorithm 2 as printed (an approximation). What the
printed text leaves undefined is fixed as follows: (a) R1 = R2 = 0 gives R = R1 - 1 = -1; it is
taken modulo 4 as a 2-bit unit would (R = 3, product 1.0625 * 2^(E1+E2+1), 5.6% below the exact
2.25 * 2^(E1+E2)); (b) a zero operand gives zero with sign S1 xor S2; (c) an exponent above 15
saturates to +-49152 and one below -15 gives +-0. :func:`multiply` is the exact product rounded
to RF8 through a 256 x 256 table; :func:`exact_products` holds the unrounded products.

The authors' public reference code rounds differently (e1 = round(log2|w|), r = |w| - 2^e1,
e2 = round(log2|r|), keep 2^e1 + sign(r) 2^e2 when e1 - e2 <= 4, else 2^e1). Its levels
{0.75, 0.875, 0.9375, 1, 1.0625, 1.125, 1.25, 1.5} * 2^e1 overlap between neighbouring e1
(0.75 * 2^e1 = 1.5 * 2^(e1-1)), leaving 7 distinct magnitudes an octave:
{1, 1.0625, 1.125, 1.25, 1.5, 1.75, 1.875} * 2^k. That does not fit RF8's 1+5+2 layout, but a
byte holds 18 octaves of it: :func:`encode_authors` stores sign + a 7-bit index (0 = zero,
1..126 = octave * 7 + level) and a per-tensor power-of-two scale placing the top octave at the
tensor's largest rounded magnitude; values more than 18 octaves below it flush to zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

E_MAX = 15
ZERO_CODE = 0x40
NEG_ZERO_CODE = 0xC0
MAX_VALUE = 1.5 * 2.0**E_MAX
MIN_VALUE = 1.0625 * 2.0**-E_MAX
MODES = ("truncate", "nearest")

AUTHORS_LEVELS = (1.0, 1.0625, 1.125, 1.25, 1.5, 1.75, 1.875)
AUTHORS_OCTAVES = 18


def code_fields(code: int) -> tuple[int, int, int]:
    """(sign, exponent E, residual R) of a code; E is 0 for the zero codes (see :func:`is_zero_code`)."""
    if not 0 <= code <= 255:
        raise ValueError(f"RF8 code must be in 0..255, got {code}")
    s, ef, r = code >> 7, (code >> 2) & 0x1F, code & 3
    e = -(ef & 0xF) if ef & 0x10 else ef
    return s, e, r


def is_zero_code(code: int) -> bool:
    """True for the eight codes whose exponent field is 10000 (the redundant -0 exponent)."""
    return (code >> 2) & 0x1F == 0x10


def pack(sign: int, exponent: int, residual: int) -> int:
    """The code of sign S, exponent E in -15..15 and residual R in 0..3."""
    if sign not in (0, 1) or not -E_MAX <= exponent <= E_MAX or not 0 <= residual <= 3:
        raise ValueError(f"RF8 fields out of range: sign={sign}, exponent={exponent}, residual={residual}")
    ef = (0x10 | -exponent) if exponent < 0 else exponent
    return sign << 7 | ef << 2 | residual


def code_value(code: int) -> float:
    """The exact value of one code (Python float)."""
    s, e, r = code_fields(code)
    if is_zero_code(code):
        return -0.0 if s else 0.0
    v = math.ldexp(1.0 + 2.0 ** -(r + 1), e)
    return -v if s else v


def code_table() -> list[dict]:
    """One row per code 0..255: code (hex), bits ``s eeeee rr``, sign, exponent E (None for zero), residual R,
    the distance d = R + 1 of the second bit, and the value (docs/rf8.md prints this table)."""
    rows = []
    for c in range(256):
        s, e, r = code_fields(c)
        zero = is_zero_code(c)
        rows.append({"code": f"0x{c:02X}", "bits": f"{c >> 7} {(c >> 2) & 0x1F:05b} {c & 3:02b}", "sign": s,
                     "E": None if zero else e, "R": r, "d": None if zero else r + 1, "value": code_value(c)})
    return rows


_TABLES: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    if key not in _TABLES:
        _TABLES[key] = build()
    return _TABLES[key]


def decode_table(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 values of the codes, index = code (every value is exact in fp16, bf16 and fp32)."""
    dev = torch.device(device or "cpu")
    return _cached(
        ("decode", dtype, dev),
        lambda: torch.tensor([code_value(c) for c in range(256)], dtype=torch.float64).to(dev, dtype),
    )


def _nearest_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted non-negative magnitudes' codes and the midpoints between consecutive magnitudes."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        codes = [ZERO_CODE] + [pack(0, e, r) for e in range(-E_MAX, E_MAX + 1) for r in (3, 2, 1, 0)]
        mags = [code_value(c) for c in codes]
        if mags != sorted(mags):
            raise AssertionError("RF8 magnitudes are not sorted")
        mids = [(a + b) / 2 for a, b in zip(mags, mags[1:], strict=False)]
        return (torch.tensor(codes, dtype=torch.uint8, device=device),
                torch.tensor(mids, dtype=torch.float32, device=device))

    return _cached(("nearest", device), build)


def _reference_encode(a: torch.Tensor, mode: str) -> torch.Tensor:
    """The definition of both roundings on float32 values (NaN-free); :func:`encode` uses tables built from it."""
    bits = a.view(torch.int32)
    sign = (bits < 0).to(torch.uint8) << 7
    if mode == "nearest":
        codes, mids = _nearest_tables(a.device)
        return codes[torch.bucketize(a.abs(), mids)] | sign
    mag = bits & 0x7FFFFFFF
    e = (mag >> 23) - 127
    m = mag & 0x7FFFFF
    r = 3 - (m >= 1 << 22).int() - (m >= 1 << 21).int() - (m >= 1 << 20).int()
    ef = torch.where(e < 0, 0x10 - e, e)
    code = torch.where(e > E_MAX, pack(0, E_MAX, 0), ef << 2 | r)
    code = torch.where(e < -E_MAX, ZERO_CODE, code)
    return code.to(torch.uint8) | sign


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 values with the given bit patterns (int64 in 0..2^32-1)."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def _encode_lut(mode: str, device: torch.device) -> torch.Tensor:
    """Codes indexed by the float32 bits RF8 rounding depends on.

    truncate: sign, exponent and the 3 leading mantissa bits (``bits >> 20``, 4096 entries).
    nearest: sign, exponent, 5 leading mantissa bits and whether any lower bit is set (32768
    entries): every midpoint between codes has at most 5 mantissa bits, so values sharing an
    index lie between the same two midpoints, or exactly on one (lower bits all zero).
    """

    def build() -> torch.Tensor:
        i = torch.arange(1 << 12 if mode == "truncate" else 1 << 15, dtype=torch.int64)
        bits = i << 20 if mode == "truncate" else (i >> 1) << 18 | (i & 1)
        vals = _from_bits(bits)
        vals = torch.where(torch.isnan(vals), torch.copysign(torch.tensor(float("inf")), vals), vals)
        return _reference_encode(vals, mode).to(device)

    return _cached(("encode", mode, device), build)


def _check_nan(x: torch.Tensor, name: str) -> None:
    if bool(torch.isnan(x).any()):
        n = int(torch.isnan(x).sum())
        raise ValueError(f"{name}: {n} NaN value(s) of {x.numel()}; RF8 has no NaN code")


def encode(x: torch.Tensor, mode: str = "truncate", *, name: str = "tensor") -> torch.Tensor:
    """Float tensor -> uint8 RF8 codes of the same shape, on the same device.

    ``mode`` is ``"truncate"`` (the paper) or ``"nearest"``; see the module docstring for zero,
    powers of two, saturation and NaN (a ``ValueError`` naming ``name``). One table lookup per
    value, indexed by the float32 bits the rounding depends on.
    """
    if mode not in MODES:
        raise ValueError(f"{name}: unknown RF8 rounding mode {mode!r}; expected one of {MODES}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: RF8 encodes floating-point tensors, got {x.dtype}")
    a = x.detach().to(torch.float32).contiguous()
    _check_nan(a, name)
    bits = a.view(torch.int32).reshape(-1)
    if mode == "truncate":
        idx = (bits >> 20) & 0xFFF
    else:
        idx = ((bits >> 17) & 0x7FFE) | ((bits & 0x3FFFF) != 0).int()
    return _encode_lut(mode, a.device).index_select(0, idx).view(a.shape)


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 RF8 codes -> values (a 256-entry table lookup), same shape and device."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"RF8 codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int32)
    return decode_table(dtype, codes.device).index_select(0, flat).view(codes.shape)


def quantize(x: torch.Tensor, mode: str = "truncate") -> torch.Tensor:
    """Round trip: the RF8 value of every element, in ``x``'s dtype."""
    return decode(encode(x, mode), x.dtype)


def _fields_t(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    c = codes.to(torch.int32)
    s, ef, r = c >> 7, (c >> 2) & 0x1F, c & 3
    e = torch.where(ef >= 0x10, 0x10 - ef, ef)
    return s, e, r, ef == 0x10


def _pack_t(s: torch.Tensor, e: torch.Tensor, r: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    over = e > E_MAX
    zero = zero | (e < -E_MAX)
    e = e.clamp(-E_MAX, E_MAX)
    r = torch.where(over, 0, r)
    ef = torch.where(e < 0, 0x10 - e, e)
    code = torch.where(zero, 0x10 << 2, ef << 2 | r)
    return (s << 7 | code).to(torch.uint8)


def multiply_alg2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Algorithm 2 of the paper on uint8 codes (broadcasting), undefined cases fixed as documented."""
    sa, ea, ra, za = _fields_t(a)
    sb, eb, rb, zb = _fields_t(b)
    differ = ra != rb
    both0 = (ra == 0) & (rb == 0)
    r = torch.where(differ, 2, torch.where(both0, (ra - 1) % 4, torch.minimum(ra, rb)))
    e = ea + eb + (differ | both0).int()
    return _pack_t(sa ^ sb, e, r, za | zb)


def _all_pairs(device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(256, dtype=torch.uint8, device=device)
    return c[:, None].expand(256, 256), c[None, :].expand(256, 256)


def exact_products(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """256 x 256 table: decode(a) * decode(b), exact (float32 and float64 hold every product)."""
    t = decode_table(torch.float64)
    return (t[:, None] * t[None, :]).to(dtype)


def alg2_table() -> torch.Tensor:
    """256 x 256 uint8 table of :func:`multiply_alg2` over every pair of codes."""
    return _cached(("alg2",), lambda: multiply_alg2(*_all_pairs()))


def product_table(mode: str = "nearest") -> torch.Tensor:
    """256 x 256 uint8 table: the exact product of two codes rounded to RF8 with ``mode``."""
    return _cached(("product", mode), lambda: encode(exact_products(torch.float32), mode))


def multiply(a: torch.Tensor, b: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """RF8 x RF8 -> RF8 codes: the exact product rounded with ``mode`` (a table lookup)."""
    t = product_table(mode).to(a.device)
    return t[a.to(torch.int64), b.to(torch.int64)]


def alg2_error() -> dict:
    """Relative error of Algorithm 2 against the exact product over every pair of non-zero codes.

    Pairs whose exact product lies outside RF8's range (E1 + E2 outside -15..14) are left out,
    since there the error is saturation, not the algorithm. The RF8-rounded exact products
    (truncate, nearest) are measured on the same pairs for comparison. ``by_residual`` is the
    4 x 4 matrix of Algorithm 2's signed relative error by (R1, R2); it does not depend on E.
    """
    a, b = _all_pairs()
    _, ea, ra, za = _fields_t(a)
    _, eb, rb, zb = _fields_t(b)
    keep = ~za & ~zb & (ea + eb >= -E_MAX) & (ea + eb <= E_MAX - 1)
    exact = exact_products()[keep]
    out: dict = {"pairs": int(keep.sum())}
    t64 = decode_table(torch.float64)
    for label, table in (("alg2", alg2_table()), ("truncate", product_table("truncate")),
                         ("nearest", product_table("nearest"))):
        rel = (t64[table[keep].long()] - exact) / exact
        out[label] = {
            "mean_abs_rel": float(rel.abs().mean()), "rms_rel": float(rel.pow(2).mean().sqrt()),
            "max_abs_rel": float(rel.abs().max()), "exact_fraction": float((rel == 0).double().mean()),
        }
    rel_all = (t64[alg2_table().long()] - exact_products()) / exact_products()
    out["by_residual"] = [
        [float(rel_all[pack(0, 0, r1), pack(0, 0, r2)]) for r2 in range(4)] for r1 in range(4)
    ]
    return out


def _authors_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    def build() -> torch.Tensor:
        mags = [0.0] + [lv * 2.0 ** (k - AUTHORS_OCTAVES + 1) for k in range(AUTHORS_OCTAVES) for lv in AUTHORS_LEVELS]
        mags += [0.0] * (128 - len(mags))
        t = torch.tensor(mags + [-m for m in mags], dtype=torch.float64)
        return t.to(device, dtype)

    return _cached(("authors", dtype, device), build)


def authors_round(x: torch.Tensor) -> torch.Tensor:
    """The authors' reference rounding of every element (unbounded exponent), in float32."""
    a = x.detach().to(torch.float32).abs()
    e1 = torch.round(torch.log2(a))
    p1 = torch.exp2(e1)
    r = a - p1
    e2 = torch.round(torch.log2(r.abs()))
    keep = (r != 0) & (e1 - e2 <= 4)
    out = torch.where(keep, p1 + torch.sign(r) * torch.exp2(e2), p1)
    out = torch.where(a == 0, 0.0, out)
    return torch.copysign(out, x.detach().to(torch.float32))


def encode_authors(x: torch.Tensor, *, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Float tensor -> (uint8 codes, float32 scalar scale 2^top) in the authors' rounding variant.

    Infinities saturate to the largest finite magnitude; NaN raises ``ValueError``.
    """
    if not x.is_floating_point():
        raise TypeError(f"{name}: RF8 encodes floating-point tensors, got {x.dtype}")
    a = x.detach().to(torch.float32).contiguous()
    _check_nan(a, name)
    finite = a[torch.isfinite(a)]
    amax = float(finite.abs().max()) if finite.numel() else 0.0
    sign = (a.contiguous().view(torch.int32) < 0).to(torch.uint8) << 7
    if amax == 0.0:
        return sign, torch.tensor(1.0, device=a.device)
    mag = authors_round(a.clamp(-amax, amax)).abs()
    m, ex = torch.frexp(mag)
    top = int(ex.max()) - 1
    octave = ex - 1 - top + AUTHORS_OCTAVES - 1
    levels = torch.tensor(AUTHORS_LEVELS, dtype=torch.float32, device=a.device)
    idx = 1 + octave * len(AUTHORS_LEVELS) + torch.bucketize(2 * m, levels)
    idx = torch.where((mag == 0) | (octave < 0), 0, idx)
    scale = torch.tensor(2.0**top, dtype=torch.float32, device=a.device)
    return idx.to(torch.uint8) | sign, scale


def decode_authors(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(uint8 codes, scale) of :func:`encode_authors` -> values."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"RF8 codes must be uint8, got {codes.dtype}")
    t = _authors_table(torch.float32, codes.device)
    return (t[codes.to(torch.int32)] * scale.to(codes.device, torch.float32)).to(dtype)


class RF8Linear(nn.Module):
    """A linear layer whose weight is stored as RF8 codes: one byte a weight, decoded in forward.

    ``state_dict`` holds ``weight_codes`` (uint8, out x in) and ``bias`` (float, unquantized).
    The forward pass decodes the weight to the input's dtype (exact in fp32/fp16/bf16) in blocks
    of rows, so the decoded copy never exceeds ``block_elems`` values.
    """

    block_elems = 1 << 20

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "truncate",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown RF8 rounding mode {mode!r}; expected one of {MODES}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight_codes", torch.full((out_features, in_features), ZERO_CODE,
                                                        dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, mode: str = "truncate", *, name: str = "linear") -> RF8Linear:
        """Encode an ``nn.Linear`` (or a transformers ``Conv1D``) into a new RF8Linear."""
        w, b = linear_weight(linear)
        out = cls(w.shape[1], w.shape[0], b is not None, mode=mode, device=w.device,
                  dtype=b.dtype if b is not None else torch.float32)
        out.weight_codes.copy_(encode(w, mode, name=f"{name}.weight"))
        if b is not None:
            out.bias.data.copy_(b.detach())
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (float32, a new tensor; read-only view of the codes)."""
        return decode(self.weight_codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = max(1, self.block_elems // max(1, self.in_features))
        if rows >= self.out_features:
            return F.linear(x, decode(self.weight_codes, x.dtype), bias)
        parts = []
        for i in range(0, self.out_features, rows):
            w = decode(self.weight_codes[i:i + rows], x.dtype)
            parts.append(F.linear(x, w, None if bias is None else bias[i:i + rows]))
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}")


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): weight (in, out), y = x @ W + b; detected without importing it."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D``: the layers the weight formats replace."""
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def linear_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as out x in, bias) of a linear-like layer."""
    if isinstance(m, nn.Linear):
        return m.weight.detach(), m.bias
    if _is_conv1d(m):
        return m.weight.detach().t(), m.bias
    raise TypeError(f"not a linear layer: {type(m).__name__}")


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


def to_rf8(model: nn.Module, mode: str = "truncate",
           skip: Callable[[str], bool] | Iterable[str] | None = None) -> nn.Module:
    """Convert every linear layer of ``model`` (BERT, GPT-2 ``Conv1D``, LLaMA, ...) to :class:`RF8Linear`
    in place and return the model. Embeddings and norms are left as they are. A weight tied to an
    embedding (an LM head) is quantized in the head only; the embedding keeps its float copy.
    """
    if mode not in MODES:
        raise ValueError(f"unknown RF8 rounding mode {mode!r}; expected one of {MODES}")
    replace_linear_layers(model, lambda n, m: RF8Linear.from_linear(m, mode, name=n), skip)
    return model
