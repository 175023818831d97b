"""RF8: the code table, the paper's worked example, both roundings, the authors' variant, Algorithm 2, RF8Linear."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ggprior import formats
from ggprior.formats import rf8, rf8_analysis

DOC = Path(__file__).resolve().parents[2] / "docs" / "rf8.md"
LEVELS = (1.0625, 1.125, 1.25, 1.5)
in_range = st.floats(min_value=rf8.MIN_VALUE, max_value=rf8.MAX_VALUE, allow_nan=False, width=32)
any_float = st.floats(allow_nan=False, width=32)


def enc(values, mode="truncate"):
    return rf8.encode(torch.tensor(values, dtype=torch.float32), mode)


def q(values, mode="truncate"):
    return rf8.roundtrip(torch.tensor(values, dtype=torch.float32), mode).tolist()


# ---------------------------------------------------------------- the 256 codes

def test_every_code_decodes_to_the_layout_formula():
    table = rf8.decode_table(torch.float64)
    assert table.shape == (256,)
    for c in range(256):
        s, ef, r = c >> 7, (c >> 2) & 0x1F, c & 3
        if ef == 0x10:
            expected = 0.0
        else:
            e = -(ef - 0x10) if ef > 0x10 else ef
            expected = 2.0**e + 2.0 ** (e - (r + 1))  # 2^E + 2^(E-d), d = R + 1
        assert table[c].item() == (-expected if s else expected), hex(c)
        assert math.copysign(1.0, table[c].item()) == (-1.0 if s else 1.0)


def test_code_set_is_four_levels_in_each_of_31_octaves_plus_eight_zeros():
    table = rf8.decode_table(torch.float64)
    zeros = [c for c in range(256) if table[c] == 0]
    assert zeros == [0x40, 0x41, 0x42, 0x43, 0xC0, 0xC1, 0xC2, 0xC3]
    assert all(rf8.is_zero_code(c) for c in zeros)
    positive = sorted({v for v in table.tolist() if v > 0})
    assert positive == sorted(lv * 2.0**e for e in range(-15, 16) for lv in LEVELS)
    assert len(positive) == 124
    assert positive[0] == rf8.MIN_VALUE and positive[-1] == rf8.MAX_VALUE == 49152.0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert torch.equal(rf8.decode_table(dtype).double(), table)


def test_pack_and_fields_round_trip_every_non_zero_code():
    for c in range(256):
        if rf8.is_zero_code(c):
            continue
        assert rf8.pack(*rf8.code_fields(c)) == c
    with pytest.raises(ValueError, match="out of range"):
        rf8.pack(0, 16, 0)
    with pytest.raises(ValueError, match="0..255"):
        rf8.code_fields(256)


def test_docs_hold_the_full_code_table():
    text = DOC.read_text()
    for row in rf8.code_table():
        line = f"| {row['code']} | `{row['bits']}` |"
        assert line in text, row
        assert repr(row["value"]) in text.split(line, 1)[1].split("\n", 1)[0], row


# ---------------------------------------------------------------- encoding

@pytest.mark.parametrize("mode", rf8.MODES)
def test_paper_worked_example(mode):
    code = int(enc([-0.39], mode))
    assert code == 0xC8
    assert f"{code:08b}" == "1" + "10010" + "00"
    assert rf8.code_fields(code) == (1, -2, 0)
    assert rf8.decode(torch.tensor([code], dtype=torch.uint8)).item() == -0.375


@pytest.mark.parametrize("mode", rf8.MODES)
def test_every_code_value_encodes_to_its_code(mode):
    table = rf8.decode_table()
    codes = rf8.encode(table, mode)
    canonical = torch.tensor([rf8.ZERO_CODE if rf8.is_zero_code(c) and c < 128 else
                              rf8.NEG_ZERO_CODE if rf8.is_zero_code(c) else c for c in range(256)], dtype=torch.uint8)
    assert torch.equal(codes, canonical)


def test_truncation_keeps_the_first_two_bits():
    # 1.24 = 1.00111..b: second bit at d = 3 -> 1.125; 1.99 -> d = 1 -> 1.5; 0.2 = 1.1001..b * 2^-3 -> 1.5 * 2^-3
    assert q([1.24, 1.99, 0.2, -3.1, 1.3]) == [1.125, 1.5, 0.1875, -3.0, 1.25]


def test_exact_power_of_two_takes_the_smallest_residual_step():
    # no second bit within 4 places: saturate at d = 4 (1.0625 * 2^E), the nearest code
    assert q([1.0, 0.5, 2.0**-15, 1.03, -8.0]) == [1.0625, 0.53125, 1.0625 * 2.0**-15, 1.0625, -8.5]
    assert q([1.0, 1.03], "nearest") == [1.0625, 1.0625]


def test_round_to_nearest_with_ties_toward_zero():
    assert q([1.8, 1.82, 1.375, 1.3751, 1.09375, 0.95]) == [1.5, 1.5, 1.25, 1.25, 1.0625, 0.75]
    assert q([1.8, 1.82, 1.375, 1.3751, 1.09375, 0.95], "nearest") == [1.5, 2.125, 1.25, 1.5, 1.0625, 1.0625]


def test_zero_keeps_its_sign():
    for mode in rf8.MODES:
        assert enc([0.0, -0.0], mode).tolist() == [rf8.ZERO_CODE, rf8.NEG_ZERO_CODE]


@pytest.mark.parametrize("mode", rf8.MODES)
def test_saturation_above_the_range(mode):
    big = [49152.0, 60000.0, 1e30, float("inf"), -float("inf"), -1e6]
    assert q(big, mode) == [49152.0, 49152.0, 49152.0, 49152.0, -49152.0, -49152.0]
    assert q([1e300], mode) == [49152.0]  # float64 rounds to float32 inf first


def test_below_the_range():
    tiny = [2.0**-16, 1e-30, -1e-7, 1e-45]
    assert q(tiny) == [0.0, 0.0, -0.0, 0.0]
    half = rf8.MIN_VALUE / 2
    assert q([half, half * 1.0001, -half * 1.5, 2.0**-16 * 0.9], "nearest") == [
        0.0, rf8.MIN_VALUE, -rf8.MIN_VALUE, 0.0]


def test_bad_input_is_refused_with_the_tensor_name():
    with pytest.raises(ValueError, match=r"layer\.weight: 2 NaN"):
        rf8.encode(torch.tensor([1.0, float("nan"), float("nan")]), name="layer.weight")
    with pytest.raises(TypeError, match="floating-point"):
        rf8.encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="rounding mode"):
        rf8.encode(torch.tensor([1.0]), "floor")
    with pytest.raises(TypeError, match="uint8"):
        rf8.decode(torch.tensor([1, 2]))


@pytest.mark.parametrize("mode", rf8.MODES)
def test_lookup_encoder_matches_the_reference_definition_on_random_bit_patterns(mode):
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[~torch.isnan(x)]
    sticky = torch.tensor([1.09375, 1.09375 + 2**-20, 1.8125, 1.8125 - 2**-22, 0.53125 * 2**-15, 3e-5])
    x = torch.cat([x, sticky, -sticky])
    assert torch.equal(rf8.encode(x, mode), rf8._reference_encode(x.contiguous(), mode))


def test_shape_dtype_and_device_are_kept():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    c = rf8.encode(x)
    assert c.shape == x.shape and c.dtype == torch.uint8
    assert rf8.roundtrip(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert rf8.decode(c, torch.float16).dtype == torch.float16


# ---------------------------------------------------------------- properties

@given(in_range)
def test_truncation_error_bound(x):
    # |x| in [2^E, 1.0625 2^E) rounds up by < 6.25%; otherwise the magnitude rounds down by < 25%
    for v in (x, -x):
        y = q([v])[0]
        assert abs(y - v) < 0.25 * abs(v)
        assert abs(y) <= abs(v) or abs(y) <= 1.0625 * 2.0 ** math.floor(math.log2(abs(v)))


@given(in_range)
def test_nearest_error_bound_and_optimality(x):
    y = q([x], "nearest")[0]
    assert abs(y - x) <= (0.3125 / 1.8125) * abs(x) + 1e-12  # worst gap: 1.5 .. 2.125 (midpoint 1.8125)
    assert abs(y - x) <= abs(q([x])[0] - x)
    codes = rf8.decode_table(torch.float64)
    assert abs(y - x) == float((codes - x).abs().min())


@given(st.lists(any_float, min_size=2, max_size=50), st.sampled_from(rf8.MODES))
def test_monotone(xs, mode):
    xs = sorted(xs)
    ys = q(xs, mode)
    assert all(a <= b for a, b in zip(ys, ys[1:], strict=False))


@given(st.lists(any_float, min_size=1, max_size=50), st.sampled_from(rf8.MODES))
def test_sign_symmetry(xs, mode):
    c = enc(xs, mode)
    assert torch.equal(enc([-v for v in xs], mode), c ^ 0x80)


@given(st.lists(any_float, min_size=1, max_size=50), st.sampled_from(rf8.MODES))
def test_quantize_is_idempotent(xs, mode):
    once = rf8.roundtrip(torch.tensor(xs), mode)
    assert torch.equal(rf8.roundtrip(once, mode), once)


# ---------------------------------------------------------------- the authors' rounding variant

def test_authors_rounding_known_values():
    x = torch.tensor([-0.39, 1.0, 1.3, 1.01, 1.4, 0.0, 3.0])
    # 0.39: e1 = -1, r = -0.11, e2 = -3 -> 0.5 - 0.125; 1.01: e1 - e2 = 7 > 4 -> 2^e1
    assert rf8_analysis.authors_round(x).tolist() == [-0.375, 1.0, 1.25, 1.0, 1.5, 0.0, 3.0]


@given(st.floats(min_value=2.0**-60, max_value=2.0**60, width=32))
def test_authors_rounding_levels_and_error(x):
    y = rf8_analysis.authors_round(torch.tensor([x])).item()
    m, e = math.frexp(y)
    assert 2 * m in (1.0, 1.0625, 1.125, 1.25, 1.5, 1.75, 1.875)
    assert abs(y - x) <= 0.11 * x


def test_authors_codes_round_trip_and_flush_below_18_octaves():
    x = torch.cat([torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 0.02,
                   torch.tensor([0.0, -0.0, 1e-12, -3.0])])
    codes, scale = rf8_analysis.encode_authors(x, name="w")
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert math.log2(scale.item()).is_integer()
    ref = rf8_analysis.authors_round(x)
    kept = ref.abs() >= scale.item() * 2.0**-17
    back = rf8_analysis.decode_authors(codes, scale)
    assert torch.equal(back[kept], ref[kept])
    assert bool((back[~kept] == 0).all()) and back[-2].item() == 0.0 and back[-1].item() == -3.0
    assert int((codes & 0x7F).max()) <= 126
    with pytest.raises(ValueError, match="w: 1 NaN"):
        rf8_analysis.encode_authors(torch.tensor([float("nan"), 1.0]), name="w")


# ---------------------------------------------------------------- multiplication

def _alg2_python(a: int, b: int) -> float:
    """Algorithm 2 as printed, on fields, written independently of the module (R = -1 taken mod 4)."""
    (s1, e1, r1), (s2, e2, r2) = rf8.code_fields(a), rf8.code_fields(b)
    s = s1 ^ s2
    if rf8.is_zero_code(a) or rf8.is_zero_code(b):
        return -0.0 if s else 0.0
    if r1 != r2:
        r, e = 2, e1 + e2 + 1
    elif r1 == r2 == 0:
        r, e = (r1 - 1) % 4, e1 + e2 + 1
    else:
        r, e = min(r1, r2), e1 + e2
    if e > 15:
        v = rf8.MAX_VALUE
    elif e < -15:
        v = 0.0
    else:
        v = 2.0**e * (1 + 2.0 ** -(r + 1))
    return -v if s else v


def test_alg2_table_matches_the_printed_algorithm_on_all_pairs():
    got = rf8.decode_table(torch.float64)[rf8_analysis.alg2_table().long()]
    expected = torch.tensor([[_alg2_python(a, b) for b in range(256)] for a in range(256)], dtype=torch.float64)
    assert torch.equal(got, expected)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))


def test_alg2_error_report():
    rep = rf8_analysis.alg2_error()
    # non-zero codes: 248; exponent sums within -15..14
    n = sum(1 for e1 in range(-15, 16) for e2 in range(-15, 16) if -15 <= e1 + e2 <= 14) * 16 * 4
    assert rep["pairs"] == n
    # R1 = 1 (1.25), R2 = 2 (1.125): exact 1.40625, Algorithm 2 gives 1.125 * 2 = 2.25
    assert rep["by_residual"][1][2] == pytest.approx(2.25 / 1.40625 - 1)
    assert rep["by_residual"][0][0] == pytest.approx(1.0625 * 2 / 2.25 - 1)
    assert rep["alg2"]["mean_abs_rel"] > rep["truncate"]["mean_abs_rel"] > rep["nearest"]["mean_abs_rel"]
    assert rep["nearest"]["max_abs_rel"] <= 0.3125 / 1.8125 + 1e-12
    assert rep["alg2"]["exact_fraction"] == 0.0


def test_exact_product_rounds_the_true_product():
    a = enc([1.5, -1.5, 0.75, 1.0625, 40000.0])
    b = enc([1.5, 1.5, 0.0, 2.0**-15, 2.0])
    assert rf8.decode(rf8_analysis.multiply(a, b)).tolist() == [2.25, -2.25, 0.0, 1.125 * 2.0**-15, 49152.0]
    assert rf8_analysis.exact_products()[0xC8, 0xC8].item() == 0.375**2


# ---------------------------------------------------------------- RF8Linear

@pytest.mark.parametrize("mode", rf8.MODES)
def test_rf8_linear_stores_one_byte_a_weight_and_matches_decoded_linear(mode):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = formats.RF8Linear.from_linear(lin, mode)
    sd = layer.state_dict()
    assert set(sd) == {"weight_codes", "bias"}
    assert sd["weight_codes"].dtype == torch.uint8 and sd["weight_codes"].shape == (8, 16)
    assert torch.equal(layer.weight, rf8.roundtrip(lin.weight.detach(), mode))
    x = torch.randn(3, 5, 16)
    assert torch.allclose(layer(x), F.linear(x, layer.weight, lin.bias), atol=1e-6)
    twin = formats.RF8Linear(16, 8, mode=mode)
    twin.load_state_dict(sd)
    assert torch.equal(twin(x), layer(x))


def test_rf8_linear_blocks_rows_without_changing_the_result():
    torch.manual_seed(0)
    layer = formats.RF8Linear.from_linear(nn.Linear(64, 40, bias=False))
    x = torch.randn(4, 64)
    full = layer.reference_forward(x)
    layer.block_elems = layer.fused_block_elems = 64 * 7  # 7 rows a block, the last block short
    assert torch.allclose(layer.reference_forward(x), full, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(layer(x), full, atol=1e-5)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_to_rf8_replaces_linear_layers_and_honours_skip():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    formats.to_rf8(model, skip=["2"])
    assert isinstance(model[0], formats.RF8Linear) and isinstance(model[2], nn.Linear)
    with pytest.raises(ValueError, match="rounding mode"):
        formats.to_rf8(model, "up")
