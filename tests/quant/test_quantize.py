"""quant/quantize.py: byte identity with gguf-py's quantizers, round trips through gguf-py's dequantizers."""
import gguf.quants
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

from dslocal.quant.ggml import TYPE_INFO, GGMLType
from dslocal.quant.quantize import quantize

T = GGMLType
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
LEGACY_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES

# Relative RMS error rmse / rms(x) of quantize -> gguf.quants.dequantize on N(0, 1), 256 x 4096, seed 0.
# "min/max" is a simple per-sub-block min/max quantizer (docs gguf-deepseek2.md section 6); llama.cpp's
# searches must beat it.
#
#   type   measured   bound     min/max
#   F32    0          0
#   F16    0.00021    0.00022
#   BF16   0.00166    0.0017
#   Q4_0   0.0859     0.087
#   Q4_1   0.0783     0.079
#   Q5_0   0.0427     0.043
#   Q5_1   0.0378     0.038
#   Q8_0   0.00535    0.0054
#   Q2_K   0.2966     0.30      0.33
#   Q3_K   0.1507     0.152
#   Q4_K   0.0714     0.072     0.078
#   Q5_K   0.0361     0.0365    0.038
#   Q6_K   0.0177     0.0179    0.021
REL_RMSE_BOUND = {
    T.F32: 0.0, T.F16: 0.00022, T.BF16: 0.0017,
    T.Q4_0: 0.087, T.Q4_1: 0.079, T.Q5_0: 0.043, T.Q5_1: 0.038, T.Q8_0: 0.0054,
    T.Q2_K: 0.30, T.Q3_K: 0.152, T.Q4_K: 0.072, T.Q5_K: 0.0365, T.Q6_K: 0.0179,
}
MIN_MAX_REL_RMSE = {T.Q2_K: 0.33, T.Q4_K: 0.078, T.Q5_K: 0.038, T.Q6_K: 0.021}

# llama.cpp tests/test-quantize-fns.cpp: x[i] = 0.1 + 2 cos(i), 4096 values, sqrt(sum of squared errors) / n
# must stay below 0.002 (Q2_K 0.0075, Q3_K 0.004). Measured here:
#   F16 0.000004  BF16 0.000036  Q4_0 0.00112  Q4_1 0.00114  Q5_0 0.00059  Q5_1 0.00056  Q8_0 0.000074
#   Q2_K 0.00467  Q3_K 0.00251  Q4_K 0.00098  Q5_K 0.00053  Q6_K 0.00026
LLAMA_TOTAL_ERROR_BOUND = {T.Q2_K: 0.0075, T.Q3_K: 0.0040}

# Shapes for the byte-identity tests: leading axes of 0-2 dims, rows of 1-40 blocks of 32 (seeded).
_shape_rng = np.random.default_rng(7)
SHAPES = [(1, 32), (2, 3, 96)] + [
    (*map(int, _shape_rng.integers(1, 5, size=_shape_rng.integers(0, 3))), 32 * int(_shape_rng.integers(1, 41)))
    for _ in range(4)]


def gguf_type(ggml_type: GGMLType) -> GGMLQuantizationType:
    return GGMLQuantizationType(int(ggml_type))


def decode(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """The oracle: gguf-py's dequantizer (F32/F16 included: it views the bytes)."""
    return gguf.quants.dequantize(raw, gguf_type(ggml_type))


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    rms = np.sqrt(np.mean(x * x))
    return float(np.sqrt(np.mean((x - y) ** 2)) / (rms if rms else 1.0))


def make_data(kind: str, rng: np.random.Generator, shape) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    rows = x.reshape(-1, shape[-1])
    if kind == "zero_rows":            # every other row zero, and one zero block inside the others
        rows[::2] = 0
        rows[1::2, :32] = 0
    elif kind == "large":
        x *= np.float32(1e4)
    elif kind == "small":              # scales land in fp16's subnormal range
        x *= np.float32(1e-6)
    elif kind == "halves":             # k/2 with a 127 in every block: Q8_0 gets d = 1 and exact .5 ties
        x[...] = rng.integers(-254, 255, size=shape) / 2
        rows[:, ::32] = 127
    elif kind == "mixed_rows":         # constant, negative-only and outlier rows
        rows[0::3] = np.float32(0.37)
        rows[1::3] = -np.abs(rows[1::3])
        rows[2::3, -1] = 300
    return x


@pytest.mark.parametrize("kind", ["gauss", "zero_rows", "large", "small", "halves", "mixed_rows"])
@pytest.mark.parametrize("ggml_type", FLOAT_TYPES + LEGACY_TYPES, ids=lambda t: t.name)
def test_bytes_match_gguf(ggml_type, kind):
    rng = np.random.default_rng(100 + int(ggml_type))
    for shape in SHAPES:
        x = make_data(kind, rng, shape)
        got = quantize(x, ggml_type)
        want = np.ascontiguousarray(gguf.quants.quantize(x, gguf_type(ggml_type))).view(np.uint8)
        assert got.dtype == np.uint8 and got.shape == want.shape, (shape, got.shape, want.shape)
        differ = np.flatnonzero(got != want)
        assert differ.size == 0, f"{ggml_type.name} {kind} {shape}: {differ.size} bytes differ, first {differ[0]}"


@pytest.mark.parametrize("ggml_type", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_types_match_gguf_on_every_bit_pattern(ggml_type):
    """Random float32 bit patterns: NaNs (quiet and signalling), infinities, subnormals, rounding carries."""
    bits = np.random.default_rng(3).integers(0, 1 << 32, size=(64, 1024), dtype=np.uint32)
    x = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        got = quantize(x, ggml_type)
        want = np.ascontiguousarray(gguf.quants.quantize(x, gguf_type(ggml_type))).view(np.uint8)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip_error_on_gaussian(ggml_type):
    x = np.random.default_rng(0).standard_normal((256, 4096), dtype=np.float32)
    raw = quantize(x, ggml_type)
    assert raw.shape == (256, 4096 // TYPE_INFO[ggml_type].block_size * TYPE_INFO[ggml_type].type_size)
    err = rel_rmse(x, decode(raw, ggml_type))
    bound = REL_RMSE_BOUND[ggml_type]
    print(f"{ggml_type.name:5s} relative RMSE {err:.5f} (bound {bound})")
    assert err <= bound
    if ggml_type in MIN_MAX_REL_RMSE:
        assert err < MIN_MAX_REL_RMSE[ggml_type]


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_llama_cpp_total_error(ggml_type):
    """The 'absolute quantization error' check of llama.cpp's test-quantize-fns, with its thresholds."""
    n = 4096
    x = (0.1 + 2 * np.cos(np.arange(n, dtype=np.float32))).astype(np.float32)
    y = decode(quantize(x, ggml_type), ggml_type)
    total = np.sqrt(np.sum((x.astype(np.float64) - y) ** 2)) / n
    print(f"{ggml_type.name:5s} total error {total:.6f}")
    assert total < LLAMA_TOTAL_ERROR_BOUND.get(ggml_type, 0.002)


def edge_rows(n: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(5).standard_normal(n, dtype=np.float32)
    outlier = g.copy()
    outlier[n // 3] = 1000
    return {"zeros": np.zeros(n, np.float32), "outlier": outlier, "constant": np.full(n, 0.7, np.float32),
            "negative_constant": np.full(n, -1.3, np.float32), "negative_only": -np.abs(g)}


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_edge_rows_round_trip(ggml_type):
    rows = edge_rows(1024)
    # Divisions by zero, overflows and invalid operations on the way would raise here.
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        raw = quantize(np.stack(list(rows.values())), ggml_type)
    y = decode(raw, ggml_type)
    assert np.isfinite(y).all()
    errs = {name: rel_rmse(x, y[i]) for i, (name, x) in enumerate(rows.items())}
    print(ggml_type.name, {k: round(v, 5) for k, v in errs.items()})
    assert np.all(y[0] == 0)
    # fp16 scales are exact to 2^-11 and bf16 values to 2^-8, so a constant survives to that.
    assert errs["constant"] < 4e-3 and errs["negative_constant"] < 4e-3
    # The outlier only spoils its own block: measured at most 0.033 (Q2_K, Q4_K, Q5_K).
    assert errs["outlier"] < 0.05
    assert errs["negative_only"] <= 1.1 * REL_RMSE_BOUND[ggml_type]


@pytest.mark.parametrize("ggml_type", K_TYPES, ids=lambda t: t.name)
def test_k_quants_keep_leading_axes_and_ignore_chunking(ggml_type):
    """Quantizing a tensor several chunks long gives the bytes of quantizing each row alone."""
    x = np.random.default_rng(11).laplace(size=(5, 2, 32768)).astype(np.float32)
    whole = quantize(x, ggml_type)
    assert whole.shape == (5, 2, 32768 // 256 * TYPE_INFO[ggml_type].type_size)
    by_row = np.stack([quantize(row, ggml_type) for row in x.reshape(10, -1)])
    assert np.array_equal(whole.reshape(10, -1), by_row)


def test_input_is_converted_to_float32_first():
    x = np.random.default_rng(2).standard_normal((3, 512))
    for ggml_type in (T.Q8_0, T.Q4_K, T.BF16):
        assert np.array_equal(quantize(x, ggml_type), quantize(x.astype(np.float32), ggml_type))
    assert quantize(x[0, :256], T.Q6_K).shape == (210,)


@pytest.mark.parametrize("ggml_type, n_cols", [(T.Q4_0, 100), (T.Q8_0, 16), (T.Q4_K, 512 + 32), (T.Q6_K, 128)])
def test_bad_row_length_raises(ggml_type, n_cols):
    with pytest.raises(ValueError, match=f"blocks of {TYPE_INFO[ggml_type].block_size}.*{n_cols}"):
        quantize(np.zeros((2, n_cols), np.float32), ggml_type)


@pytest.mark.parametrize("ggml_type, name", [(T.Q8_K, "Q8_K"), (T.IQ4_XS, "IQ4_XS"), (T.I32, "I32"),
                                             (99, "type 99")])
def test_unsupported_type_raises(ggml_type, name):
    with pytest.raises(ValueError, match=name):
        quantize(np.zeros((1, 256), np.float32), ggml_type)


def test_scalar_raises():
    with pytest.raises(ValueError, match="scalar"):
        quantize(np.float32(1.0), T.F32)
