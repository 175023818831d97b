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

Multiplication (Algorithm 2) and the authors' rounding variant: :mod:`ggprior.formats.rf8_analysis`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

E_MAX = 15
ZERO_CODE = 0x40
NEG_ZERO_CODE = 0xC0
MAX_VALUE = 1.5 * 2.0**E_MAX
MIN_VALUE = 1.0625 * 2.0**-E_MAX
MODES = ("truncate", "nearest")


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


def roundtrip(x: torch.Tensor, mode: str = "truncate") -> torch.Tensor:
    """Round trip: the RF8 value of every element, in ``x``'s dtype."""
    return decode(encode(x, mode), x.dtype)
