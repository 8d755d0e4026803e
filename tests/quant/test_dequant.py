"""quant/dequant.py against gguf-py's numpy dequantizers: bit-exact on random and on quantized blocks."""
import gguf.quants
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

import dslocal.quant.dequant as dq
from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import SUPPORTED, TYPE_INFO, GGMLType

T = GGMLType
BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]

# Byte offsets of the fp16 fields (d, dmin, m) in each block (ggml-common.h); all other bytes are quants.
F16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
# fp16 bit patterns every run must see: +-0, smallest and largest subnormal, smallest normal, largest finite.
F16_SPECIAL = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00], np.uint16)


def reference(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    return gguf.quants.dequantize(raw, GGMLQuantizationType(int(ggml_type)))


def assert_bit_exact(got: np.ndarray, want: np.ndarray, ggml_type: GGMLType) -> None:
    assert got.dtype == np.float32 and want.dtype == np.float32, (ggml_type.name, got.dtype, want.dtype)
    assert got.shape == want.shape, f"{ggml_type.name}: shape {got.shape} != {want.shape}"
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        i = np.unravel_index(np.argmin(same), same.shape)
        raise AssertionError(f"{ggml_type.name}: {np.count_nonzero(~same)} values differ, first at index "
                             f"{tuple(map(int, i))}: got {got[i]!r}, gguf {want[i]!r}")


def finite_f16_bits(rng: np.random.Generator, shape) -> np.ndarray:
    """uint16 fp16 bit patterns, uniform over all finite values' bits: every exponent, sign, subnormals."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    inf_or_nan = (bits & 0x7C00) == 0x7C00
    bits[inf_or_nan] ^= 0x4000                 # clear the top exponent bit: a finite value
    return bits


def random_blocks(rng: np.random.Generator, ggml_type: GGMLType, n_blocks: int, f16_bits=None) -> np.ndarray:
    """uint8 (n_blocks, type_size): random quant bytes, fp16 fields from f16_bits(rng, n_blocks)."""
    f16_bits = f16_bits or finite_f16_bits
    blocks = rng.integers(0, 256, size=(n_blocks, TYPE_INFO[ggml_type].type_size), dtype=np.uint8)
    for at in F16_FIELDS[ggml_type]:
        bits = f16_bits(rng, n_blocks)
        bits[:len(F16_SPECIAL)] = F16_SPECIAL[:n_blocks]
        blocks[:, at:at + 2] = bits.astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf(ggml_type):
    rng = np.random.default_rng(1000 + ggml_type)
    blocks = random_blocks(rng, ggml_type, 4096)
    blocks.setflags(write=False)               # dequantize must never write to its input
    assert_bit_exact(dequantize(blocks, ggml_type), reference(blocks, ggml_type), ggml_type)


@pytest.mark.parametrize("ggml_type", [T.F16, T.BF16], ids=lambda t: t.name)
def test_every_16_bit_pattern_matches_gguf(ggml_type):
    raw = np.arange(1 << 16, dtype="<u2").view(np.uint8)      # (131072,): one row of 65536 values
    got = dequantize(raw, ggml_type)
    assert_bit_exact(got, reference(raw, ggml_type), ggml_type)
    n_mantissa_bits = 10 if ggml_type == T.F16 else 7
    assert np.isnan(got).sum() == 2 * (2**n_mantissa_bits - 1)   # both signs, every nonzero mantissa


def test_f32_is_reinterpreted():
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(4, 4 * 1000), dtype=np.uint8)
    assert_bit_exact(dequantize(raw, T.F32), reference(raw, T.F32), T.F32)


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_quantized_gaussian_matches_gguf(ggml_type):
    rng = np.random.default_rng(2000 + ggml_type)
    x = rng.standard_normal((64, 1024), dtype=np.float32) * np.float32(0.02)   # weight-like scale
    raw = gguf.quants.quantize(x, GGMLQuantizationType(int(ggml_type)))
    got = dequantize(raw, ggml_type)
    assert_bit_exact(got, reference(raw, ggml_type), ggml_type)
    rel_rms = np.sqrt(np.mean((got - x) ** 2) / np.mean(x ** 2))
    assert rel_rms < {T.Q8_0: 0.01, T.Q5_0: 0.06, T.Q5_1: 0.06}.get(ggml_type, 0.12), (ggml_type.name, rel_rms)


def small_scales(rng: np.random.Generator, shape) -> np.ndarray:
    """fp16 bits of realistic k-quant super-block scales: |N(0, 1)| * 1e-3, a few of them negative."""
    d = np.abs(rng.standard_normal(shape)) * 1e-3 * np.where(rng.random(shape) < 0.05, -1, 1)
    return d.astype(np.float16).view(np.uint16)


@pytest.mark.parametrize("ggml_type", K_TYPES, ids=lambda t: t.name)
def test_k_blocks_with_realistic_scales_match_gguf(ggml_type):
    rng = np.random.default_rng(3000 + ggml_type)
    blocks = random_blocks(rng, ggml_type, 2048, f16_bits=small_scales).reshape(32, -1)   # 32 rows of 64
    assert_bit_exact(dequantize(blocks, ggml_type), reference(blocks, ggml_type), ggml_type)


@pytest.mark.parametrize("ggml_type", sorted(SUPPORTED), ids=lambda t: t.name)
def test_leading_axes_are_kept(ggml_type, tmp_path):
    info = TYPE_INFO[ggml_type]
    rng = np.random.default_rng(4000 + ggml_type)
    n_blocks = 2 if info.block_size > 1 else 6                 # a row of 2 blocks, or of 6 plain values
    if ggml_type in F16_FIELDS:
        blocks = random_blocks(rng, ggml_type, 3 * 5 * n_blocks)
    else:
        blocks = rng.integers(0, 256, size=(3 * 5 * n_blocks, info.type_size), dtype=np.uint8)
    path = tmp_path / "rows.bin"
    blocks.tofile(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(3, 5, n_blocks * info.type_size))
    got = dequantize(raw, ggml_type)
    assert got.shape == (3, 5, n_blocks * info.block_size)
    assert_bit_exact(got, reference(np.asarray(raw), ggml_type), ggml_type)
    strided = dequantize(raw[:, ::2], ggml_type)                # rows that are not one contiguous run
    assert_bit_exact(strided, got[:, ::2], ggml_type)


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_chunked_dequantization_matches_one_pass(ggml_type, monkeypatch):
    rng = np.random.default_rng(5000 + ggml_type)
    if ggml_type == T.F16:
        raw = finite_f16_bits(rng, (7, 999)).astype("<u2").view(np.uint8)
    else:
        raw = random_blocks(rng, ggml_type, 7 * 37).reshape(7, -1)
    whole = dequantize(raw, ggml_type)
    monkeypatch.setattr(dq, "_CHUNK_VALUES", 3 * TYPE_INFO[ggml_type].block_size + 1)   # ragged last chunk
    assert_bit_exact(dequantize(raw, ggml_type), whole, ggml_type)


@pytest.mark.parametrize("ggml_type", sorted(set(GGMLType) - SUPPORTED), ids=lambda t: t.name)
def test_unsupported_type_is_refused_by_name(ggml_type):
    raw = np.zeros((1, TYPE_INFO[ggml_type].type_size if ggml_type in TYPE_INFO else 1), np.uint8)
    with pytest.raises(ValueError, match=rf"\b{ggml_type.name}\b is not supported"):
        dequantize(raw, ggml_type)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not whole Q4_K blocks"):
        dequantize(np.zeros((2, 145), np.uint8), T.Q4_K)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(np.zeros((2, 144), np.int8), T.Q4_K)
