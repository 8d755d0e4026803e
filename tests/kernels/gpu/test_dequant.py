"""kernels/gpu/dequant.py against quant/dequant.py: bit-exact in float32 (and float16, bfloat16 on a GPU).

Both compute each value with the same float32 operations in the same order and round it once to the output
dtype, so every bit must agree, on random blocks (all quant bit patterns, fp16 scales over the whole finite
range with subnormals) and on blocks from quant/quantize.py.
"""
import numpy as np
import pytest
import torch

from dslocal.kernels.gpu.dequant import LAYOUT, dequantize
from dslocal.quant import dequant as ref
from dslocal.quant.ggml import TYPE_INFO, GGMLType
from dslocal.quant.quantize import quantize

T = GGMLType
ON_GPU = torch.cuda.is_available()
BLOCK_TYPES = [t for t, layout in LAYOUT.items() if layout.plain is None]
# The interpreter rounds float32 to bfloat16 wrongly (it works on raw bit patterns): bf16 only on a GPU.
OUT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# Byte offsets of the fp16 fields (d, dmin, m) in each block (ggml-common.h); all other bytes are quants.
F16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
# fp16 bit patterns every run sees: +-0, smallest and largest subnormal, smallest normal, +-largest finite, 1.
F16_SPECIAL = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00], np.uint16)


def random_blocks(rng, t: GGMLType, shape) -> np.ndarray:
    """uint8 (*shape, type_size): random quant bytes; fp16 fields random finite, the first ones F16_SPECIAL."""
    n = int(np.prod(shape))
    blocks = rng.integers(0, 256, (n, TYPE_INFO[t].type_size), dtype=np.uint8)
    for at in F16_FIELDS[t]:
        bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] ^= 0x4000     # inf / NaN -> finite
        bits[:len(F16_SPECIAL)] = F16_SPECIAL[:n]
        blocks[:, at:at + 2] = bits.astype("<u2").view(np.uint8).reshape(n, 2)
    return blocks.reshape(*shape, -1)


def assert_same_bits(got: torch.Tensor, want: np.ndarray, what: str):
    want_t = torch.from_numpy(want).to(got.dtype)        # round to nearest even, as the kernel's store does
    got = got.cpu()
    assert got.shape == want_t.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want_t.shape)}"
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    same = got.view(bits) == want_t.view(bits)
    n_diff = int((~same).sum())
    print(f"{what}: {got.numel()} values, {n_diff} differ")
    first = np.unravel_index(int((~same).view(-1).int().argmax()), same.shape)
    assert n_diff == 0, f"{what}: first difference at {tuple(map(int, first))}"


# fp16 scales up to 65504 give values past fp16's range: inf in both, which numpy warns about
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(t, dtype, device):
    rng = np.random.default_rng(int(t))
    # 2 x 3 rows of 5 blocks: more than one program, and a last program that is partly masked
    raw = random_blocks(rng, t, (2, 3, 5)).reshape(2, 3, -1)
    want = ref.dequantize(raw, t)
    got = dequantize(torch.from_numpy(raw).to(device), t, dtype)
    assert got.dtype == dtype and got.device.type == device
    assert_same_bits(got, want, f"{t.name} -> {dtype}")


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_quantized_blocks_bit_exact(t, device):
    rng = np.random.default_rng(100 + int(t))
    values = rng.standard_normal((3, 2 * TYPE_INFO[t].block_size), dtype=np.float32)
    raw = quantize(values, t)                                # (3, 2 * type_size)
    assert_same_bits(dequantize(torch.from_numpy(raw).to(device), t, torch.float32), ref.dequantize(raw, t),
                     f"{t.name} quantized")


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_plain_types(t, device):
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (4, 6 * TYPE_INFO[t].type_size), dtype=np.uint8)
    raw[:, TYPE_INFO[t].type_size - 1::TYPE_INFO[t].type_size] &= 0x3F   # finite: clear the top exponent bits
    for dtype in OUT_DTYPES:
        assert_same_bits(dequantize(torch.from_numpy(raw).to(device), t, dtype), ref.dequantize(raw, t),
                         f"{t.name} -> {dtype}")


def test_errors(device):
    raw = torch.zeros(2, 144, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="IQ2_XXS has no GPU dequantizer"):
        dequantize(raw, T.IQ2_XXS)
    with pytest.raises(ValueError, match="not whole Q6_K blocks"):
        dequantize(raw, T.Q6_K)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(raw.to(torch.int8), T.Q4_K)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(torch.zeros(144, 2, dtype=torch.uint8, device=device).T, T.Q4_K)
    assert dequantize(raw[:0], T.Q4_K, torch.float32).shape == (0, 256)
