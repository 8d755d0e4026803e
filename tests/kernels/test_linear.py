"""kernels/cpu/linear.py::linear (a dense weight's GGUF blocks times a few rows) and heads (a stack of such
weights, each times rows of its own) against x @ W.T on the dequantized weight (quant/dequant.py), for every
weight type.

The activation side is rounded as in the routed experts (tests/kernels/test_moe.py, whose tolerances this
follows): x in 8 bits per 256 values for the K-quants (one rounding: ~6e-5 of the signal for Gaussian x,
bound 3e-4), 11 bits for the 32-value types (~1e-6, bound 5e-5), none for float weights (bound 1e-10).
"""
import numpy as np
import pytest

from dslocal.kernels.cpu.linear import MAX_ROWS, heads, linear
from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import GGMLType as T
from dslocal.quant.quantize import quantize

K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K]
BLOCK32 = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
FLOATS = [T.BF16, T.F16, T.F32]
BOUND = {**{t: 3e-4 for t in K_QUANTS}, **{t: 5e-5 for t in BLOCK32}, **{t: 1e-10 for t in FLOATS}}


def nse(y, want) -> float:
    y, want = np.asarray(y, np.float64), np.asarray(want, np.float64)
    return float(((y - want) ** 2).sum() / (want ** 2).sum())


@pytest.mark.parametrize("t", K_QUANTS + BLOCK32 + FLOATS, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
def test_linear_matches_the_dequantized_product(t, rows):
    rng = np.random.default_rng(int(t) * 10 + rows)
    n_in, n_out = 512, 333                       # an odd number of output rows: uneven chunks
    blocks = quantize(rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(n_in ** 0.5), t)
    w = dequantize(blocks, t).astype(np.float64)                      # (n_out, n_in)
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    y = linear(x, blocks, t)
    assert y.shape == (rows, n_out) and y.dtype == np.float32
    assert nse(y, x.astype(np.float64) @ w.T) < BOUND[t]


@pytest.mark.parametrize("t", [T.Q4_K, T.Q8_0, T.Q5_0, T.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3])
def test_heads_match_each_weights_dequantized_product(t, rows):
    """5 weights of 77 rows (chunks that span two weights), as MLA's per-head products with the latent."""
    rng = np.random.default_rng(int(t) * 10 + rows)
    H, n_in, n_out = 5, 256, 77
    blocks = quantize(rng.standard_normal((H * n_out, n_in), dtype=np.float32) / np.float32(n_in ** 0.5), t)
    w = dequantize(blocks, t).astype(np.float64).reshape(H, n_out, n_in)
    x = rng.standard_normal((H, rows, n_in), dtype=np.float32)
    y = heads(x, blocks.reshape(H, n_out, -1), t)
    assert y.shape == (H, rows, n_out) and y.dtype == np.float32
    for h in range(H):
        assert nse(y[h], x[h].astype(np.float64) @ w[h].T) < BOUND[t]


def test_bad_arguments_are_clear_errors():
    blocks = quantize(np.ones((8, 256), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="1 to"):
        linear(np.ones((MAX_ROWS + 1, 256), np.float32), blocks, T.Q4_K)
    with pytest.raises(ValueError, match="blocks must be"):
        linear(np.ones((1, 512), np.float32), blocks, T.Q4_K)
    with pytest.raises(ValueError, match="heads takes"):
        heads(np.ones((3, 1, 256), np.float32), blocks.reshape(2, 4, -1), T.Q4_K)
