"""RF8 arithmetic and the authors' rounding: Algorithm 2, exact products, and the reference-code variant.

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

import torch

from .rf8 import E_MAX, _cached, _check_nan, decode_table, encode, pack

AUTHORS_LEVELS = (1.0, 1.0625, 1.125, 1.25, 1.5, 1.75, 1.875)
AUTHORS_OCTAVES = 18


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
