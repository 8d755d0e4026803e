"""kernels/cpu/rows.py::rows_dot for one token (a decode step). Long rows (PREFETCH_MAX_ROW_BYTES or more)
are read in streams, four rows a quarter of the range apart, the rows left over in one more pass with a
row repeated; short rows one at a time. Each row must come out the same whichever stream or leftover it
fell in, and equal to the dot of the dequantized row with the quantized activations it was given.

Tolerance: both sides multiply the same quantized weights by the same quantized activations; the kernel
sums int32 lanes per block and float32 per row, the reference in float64, so only float32 rounding of
the block sums differs (relative ~1e-7 per block); bound 1e-5 of the row's magnitude.
"""
import numpy as np
import pytest

from dslocal.kernels.cpu import rows
from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import GGMLType
from dslocal.quant.quantize import quantize

T_ = GGMLType
R = 23    # rows of the expert: ranges below cut it into 1..23 rows


def activations(x: np.ndarray, t: GGMLType):
    """x (1, D) quantized as rows_dot reads it for type t: (x16, xd, xs) in 11 bits and x8q in 8 bits where
    t takes bytes (an empty x8q otherwise), plus the values those integers stand for, (D,) float64."""
    s16, sd, ss = rows.activation_shapes(1, x.shape[1])
    x16, xd, xs = np.empty(s16, np.int16), np.empty(sd, np.float32), np.empty(ss, np.int32)
    rows.quantize_row(x, 0, x16, xd, xs)
    x8, xd8, xs8 = np.empty(s16, np.int8), np.empty(sd, np.float32), np.empty(ss, np.int32)
    rows.quantize_row(x, 0, x8, xd8, xs8, rows.XMAX8)
    per = rows.QB
    if int(t) in rows.BYTE_DOT:
        values, scales, x8q = x8, xd8, (x8, xd8, xs8)
    elif int(t) in rows.BYTE_DOT32:     # 8 bits, a scale per 32 values
        s8, sd32, so = rows.activation_shapes32(1, x.shape[1])
        x8, xd32, xo = np.empty(s8, np.int8), np.empty(sd32, np.float32), np.empty(so, np.int32)
        rows.quantize_row32(x, 0, x8, xd32, xo)
        values, scales, x8q, per = x8, xd32, (x8, xd32, xo), 32
    else:
        values, scales, x8q = x16, xd, (x8[:0], xd8[:0], xs8[:0])
    exact = values[0].astype(np.float64) * np.repeat(scales[0].astype(np.float64), per)[:x.shape[1]]
    return (x16, xd, xs), x8q, exact


def _quantized_in_numpy(x: np.ndarray, per: int, qmax: int):
    """x (D,) f32 in blocks of `per` values as rows.py's quantizers define them: a scale max|x| / qmax per
    block, integers rint(x * (1 / scale)) (float32 throughout), and a NaN scale with zeros for a block that
    holds an inf or a NaN."""
    q, d = np.zeros(x.size, np.int32), []
    for o in range(0, x.size, per):
        b = x[o:o + per]
        if not np.isfinite(b).all():
            d.append(np.float32(np.nan))
            continue
        scale = np.float32(np.abs(b).max()) / np.float32(qmax)
        inv = np.float32(1) / scale if scale > 0 else np.float32(0)
        q[o:o + per] = np.rint(b * inv)
        d.append(scale)
    return q, np.array(d, np.float32)


def test_activation_quantizers_match_numpy():
    """quantize_row (11 and 8 bits, a scale per 256 values, 16-value sums) and quantize_row32 against numpy,
    bit for bit, on rows with -0, subnormals, the largest floats, infinities, NaNs and a last block of 128."""
    rng = np.random.default_rng(3)
    N, D = 9, 1408 + 256
    x = (rng.standard_normal((N, D)) * rng.uniform(1e-3, 1e3, (N, 1))).astype(np.float32)
    x[1, 5], x[2, 300], x[3, 1600] = np.inf, -np.inf, np.nan
    x[4] = 0
    x[5, :64] = -0.0
    x[6, 100:140] = np.float32(1e-42)
    x[7, 7], x[8, 33] = np.float32(3.4e38), -np.float32(3.4e38)
    for qmax, dtype in ((rows.XMAX, np.int16), (rows.XMAX8, np.int8)):
        s, sd, ss = rows.activation_shapes(N, D)
        q, d, sums = np.empty(s, dtype), np.empty(sd, np.float32), np.empty(ss, np.int32)
        for t in range(N):
            rows.quantize_row(x, t, q, d, sums, qmax)
            want_q, want_d = _quantized_in_numpy(x[t], rows.QB, qmax)
            assert np.array_equal(q[t], want_q) and np.array_equal(d[t], want_d, equal_nan=True), (t, qmax)
            assert np.array_equal(sums[t], want_q.reshape(-1, rows.GROUP).sum(axis=1)), (t, qmax)
    s, sd, so = rows.activation_shapes32(N, D)
    q, d, off = np.empty(s, np.int8), np.empty(sd, np.float32), np.empty(so, np.int32)
    for t in range(N):
        rows.quantize_row32(x, t, q, d, off)
        want_q, want_d = _quantized_in_numpy(x[t], 32, rows.XMAX8)
        assert np.array_equal(q[t], want_q) and np.array_equal(d[t], want_d, equal_nan=True), t
        want_off = np.zeros((D // 32, 8), np.int32)
        want_off[:, 0] = -16 * want_q.reshape(-1, 32).sum(axis=1)
        assert np.array_equal(off[t], want_off.ravel()), t


# long rows (four streams): Q4_K 4096 values = 2304 bytes, Q8_0 2048 = 2176, Q2_K 7168 = 2352, Q4_0 4096 =
# 2304, Q4_1 4096 = 2560; short rows (one at a time): Q6_K 1024 = 840, Q5_0 1408 = 968 (V2-Lite's down rows),
# Q4_0 1408 = 792, Q5_1 1408 = 1056
@pytest.mark.parametrize("t, D", [(T_.Q4_K, 4096), (T_.Q8_0, 2048), (T_.Q2_K, 7168), (T_.Q6_K, 1024),
                                  (T_.Q5_0, 1408), (T_.Q4_0, 4096), (T_.Q4_0, 1408), (T_.Q5_1, 1408),
                                  (T_.Q4_1, 4096)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_one_token_rows_in_streams(t, D):
    rng = np.random.default_rng(int(t))
    w = quantize(rng.standard_normal((2, R, D), dtype=np.float32) / np.float32(D ** 0.5), t)
    long = w.shape[2] >= rows.PREFETCH_MAX_ROW_BYTES
    assert long == (t in (T_.Q4_K, T_.Q8_0, T_.Q2_K) or D == 4096)
    x = rng.standard_normal((1, D), dtype=np.float32)
    (x16, xd, xs), x8q, exact = activations(x, t)
    want = dequantize(w[1], t).astype(np.float64) @ exact                        # expert 1, (R,)
    src = np.zeros(4, np.int64)
    whole = np.full((4, R), np.nan, np.float32)
    rows.rows_dot(int(t), w, 1, 0, R, src, 1, x16, xd, xs, x, whole, x8q)
    assert np.abs(whole[0] - want).max() < 1e-5 * np.abs(want).max()
    # every cut: ranges of 1..9 rows (all leftover, streams with and without leftovers) give the same bits
    for n in range(1, 10):
        for r0 in range(0, R, n):
            r1 = min(r0 + n, R)
            part = np.full((4, R), np.nan, np.float32)
            rows.rows_dot(int(t), w, 1, r0, r1, src, 1, x16, xd, xs, x, part, x8q)
            assert np.array_equal(part[0, :r1 - r0], whole[0, r0:r1]), (n, r0)
            assert np.isnan(part[0, r1 - r0:]).all() and np.isnan(part[1:]).all()   # nothing else written


# Several tokens on 8-bit input: TILE8_MIN or more go in tiles of eight whose lanes are the tokens (the last
# tile partly empty), fewer one at a time. Short rows (2048 values for the K-quants, 1408 for the 32-value
# types) keep the compiles short; the types are all five K-quants (sub-blocks of 32: Q4_K, Q5_K; of 16: Q6_K,
# Q2_K, Q3_K), the four 32-value types that take 8-bit input (offsets -8 / -16, mins), and Q8_0 (offset -128),
# whose rows take 11-bit input, so that only rows_dot_tiles on tiles from interleave8 reaches its tiles.
@pytest.mark.parametrize("t", [T_.Q4_K, T_.Q5_K, T_.Q6_K, T_.Q2_K, T_.Q3_K, T_.Q4_0, T_.Q5_0, T_.Q4_1, T_.Q5_1,
                               T_.Q8_0], ids=lambda v: v.name)
def test_several_tokens_in_tiles_of_eight(t):
    rng = np.random.default_rng(10 + int(t))
    by32 = int(t) in rows.BYTE_DOT32 or t == T_.Q8_0
    D, N, per = (1408, 13, 32) if by32 else (2048, 13, rows.QB)
    w = quantize(rng.standard_normal((2, R, D), dtype=np.float32) / np.float32(D ** 0.5), t)
    x = rng.standard_normal((N, D), dtype=np.float32) * rng.uniform(0.1, 10, (N, 1)).astype(np.float32)
    s8, sd, ss = rows.activation_shapes32(N, D) if by32 else rows.activation_shapes(N, D)
    x8, xd8, xs8 = np.empty(s8, np.int8), np.empty(sd, np.float32), np.empty(ss, np.int32)
    for i in range(N):
        if by32:
            rows.quantize_row32(x, i, x8, xd8, xs8)
        else:
            rows.quantize_row(x, i, x8, xd8, xs8, rows.XMAX8)
    exact = x8.astype(np.float64) * np.repeat(xd8.astype(np.float64), per, axis=1)[:, :D]
    want = dequantize(w[1], t).astype(np.float64) @ exact.T                     # (R, N)
    unused = (np.empty((0, D), np.int16), np.empty((0, -(-D // 256)), np.float32), np.empty((0, D // 16), np.int32))
    # token 3 twice in one tile and once more in the next; the first tile full, the second partly
    src = np.array([5, 0, 12, 3, 3, 7, 1, 9, 11, 3, 6, 4, 8, 2], np.int64)

    def dot(r0, r1, n, res):
        if t != T_.Q8_0:
            rows.rows_dot(int(t), w, 1, r0, r1, src, n, *unused, x, res, (x8, xd8, xs8))
        else:   # two tiles from the third on, as a layer interleaves them
            tiles = rows.tile_buffers(2 + (n + 7) // 8, D, per)
            rows.interleave8(x8, xd8, xs8, src, 0, n, *tiles, 2)
            rows.rows_dot_tiles(int(t), w, 1, r0, r1, *tiles, 2, n, res)

    for n in (3, rows.TILE8_MIN, 8, 12):
        res = np.full((16, R), np.nan, np.float32)
        dot(0, R, n, res)
        got, ref = res[:n].T, want[:, src[:n]]
        assert np.abs(got - ref).max(axis=0).max() < 1e-5 * np.abs(ref).max(), n
        assert np.isnan(res[n:]).all()
        if n >= 8:                                                   # lanes and tiles compute alike
            assert np.array_equal(res[3], res[4]) and (n < 10 or np.array_equal(res[3], res[9]))
        # cuts into ranges of 1..5 rows (a last pass short of four rows repeats its last row) give the same bits
        for k in range(1, 6):
            for r0 in range(0, R, k):
                r1 = min(r0 + k, R)
                part = np.full((16, R), np.nan, np.float32)
                dot(r0, r1, n, part)
                assert np.array_equal(part[:n, :r1 - r0], res[:n, r0:r1]), (n, k, r0)
