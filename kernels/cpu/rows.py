"""Dot products of a tile of weight rows with a few activation rows, straight from GGUF blocks (Numba).

K-quants: activations are quantized once per call to 11-bit integers held in int16, in blocks of 256 (one
float scale per block, like llama.cpp's Q8_K, which has 8 bits), with int32 sums over groups of 16 for the
min terms. The weights of a 256-value super-block are unpacked once into an int16 scratch with the
sub-block scales folded in (kernels/cpu/blocks.py) and dotted with each token of the tile: one integer
loop `sum(int32(wq[l]) * int32(x16[l]))`, which LLVM compiles to vpmaddwd (16 products summed in pairs
per 256-bit instruction on Emerald Rapids, 512-bit on Zen 4), and one horizontal sum per super-block.
32-value block types (Q4_0 .. Q8_0) and F32 / F16 / BF16: a chunk of 256 values is dequantized to float32
and dotted in float32 with the unquantized activations, four tokens per pass (vfmadd231ps).

Single-core microbenchmarks on Zen 4 that chose this (Q4_K, 256 rows of 2048, cached; NOTES.md): float32
dequantize-and-dot 7.4 G weights/s, int8 activations with a horizontal sum per 32 values 10.3, the int16
scratch with folded scales 13.4. For the 32-value types the int16 path needs a horizontal sum and a float
scale per 32 values, which LLVM left scalar; the float path was faster and is exact.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from dslocal.kernels.cpu.blocks import (BF16, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
                                        Q6_K, Q8_0, _unpack_bf16, _unpack_f16, _unpack_f32, _unpack_q2_k,
                                        _unpack_q3_k, _unpack_q4_0, _unpack_q4_1, _unpack_q4_k, _unpack_q5_0,
                                        _unpack_q5_1, _unpack_q5_k, _unpack_q6_k, _unpack_q8_0, _byte, _f16,
                                        _k4_scale_min)

i16, i32, u64, f32 = np.int16, np.int32, np.uint64, np.float32
QB = 256          # activation values per float scale
GROUP = 16        # activation values per int32 sum
# Activations are rounded to 11-bit integers (|q| <= 1023), not 8-bit ones: the dot loops multiply int16 by
# int16 anyway, so the extra bits cost nothing, and they cut the rounding error of silu(g) * u (heavy-tailed,
# so its block maxima sit far from its typical values) about 65-fold. The largest weight in the int16
# scratch is 4064 (Q6_K: 127 * 32), and 256 * 4064 * 1023 < 2**31, so a super-block's dot fits int32.
XMAX = 1023
LANES = 32        # values per sub-block loop, passed down from Python as an argument (see blocks.py)

# bytes per block and values per block, indexed by type id (a tuple, so Numba folds it into constants)
_TYPE_SIZE = tuple({F32: 4, F16: 2, BF16: 2, Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34,
                    Q2_K: 84, Q3_K: 110, Q4_K: 144, Q5_K: 176, Q6_K: 210}.get(t, 0) for t in range(31))
_BLOCK = tuple(256 if t in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) else 32 if _TYPE_SIZE[t] > 4 else 1
               for t in range(31))


def activation_shapes(n: int, d: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Shapes of x16, xd, xs for n activation rows of d values."""
    return (n, d), (n, -(-d // QB)), (n, d // GROUP)


@njit(cache=True, nogil=True)
def quantize_row(x, t, x16, xd, xs):
    """Row t of x (N, D) f32 -> x16[t] (D,) 11-bit integers as int16, xd[t] (ceil(D/256),) scales,
    xs[t] (D//16,) int32 group sums. Round to nearest; a non-finite block gets a NaN scale."""
    D = x.shape[1]
    for c in range(xd.shape[1]):
        o = QB * c
        n = min(QB, D - o)
        amax, bad = f32(0), f32(0)
        for l in range(n):
            amax = max(amax, abs(x[t, o + l]))
            bad += x[t, o + l] * f32(0)  # NaN once an inf or NaN went by (max() would skip a NaN)
        if bad != 0 or not amax < np.inf:   # let a non-finite value reach the output, not an int overflow
            xd[t, c] = np.nan
            for l in range(n):
                x16[t, o + l] = 0
            continue
        d = amax / f32(XMAX)
        inv = f32(1) / d if amax > 0 else f32(0)
        xd[t, c] = d
        for l in range(n):
            x16[t, o + l] = i16(np.rint(x[t, o + l] * inv))
    for g in range(xs.shape[1]):
        s = i32(0)
        for l in range(GROUP):
            s = i32(s + x16[t, GROUP * g + l])
        xs[t, g] = s


@njit(cache=True, nogil=True)
def rows_dot(t, w, e, r0, r1, src, n_src, x16, xd, xs, xf, res, lanes):
    """res[i, r - r0] = row r of expert e (of GGML type t) . activation row src[i], i < n_src, r0 <= r < r1.

    w: uint8 (E, R, row_bytes) raw GGUF blocks; src: int64 (>= n_src,) rows of x16 / xd / xs / xf;
    x16 int16 (N, D), xd f32 (N, ceil(D/256)), xs int32 (N, D/16), xf f32 (N, D); res f32 (>= n_src, >= r1-r0).
    lanes: LANES, the values of a sub-block, as an argument LLVM cannot see (see kernels/cpu/blocks.py).
    One compiled kernel per type: LLVM vectorised the same loops far less reliably in one function of all types.
    One activation row (decode) skips the scratch for Q4_K and Q8_0: the weights go straight into the dot.
    """
    if n_src == 1 and t == Q4_K:
        _rows1_q4_k(w, e, r0, r1, src[0], x16, xd, xs, res, lanes)
    elif n_src == 1 and t == Q8_0:
        _rows1_q8_0(w, e, r0, r1, src[0], xf, res, lanes)
    elif t == Q4_K:
        _rows_q4_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, lanes)
    elif t == Q5_K:
        _rows_q5_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, lanes)
    elif t == Q6_K:
        _rows_q6_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, lanes)
    elif t == Q2_K:
        _rows_q2_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, lanes)
    elif t == Q3_K:
        _rows_q3_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, lanes)
    elif t == Q8_0:
        _rows_q8_0(w, e, r0, r1, src, n_src, xf, res, lanes)
    elif t == Q4_0:
        _rows_q4_0(w, e, r0, r1, src, n_src, xf, res, lanes)
    elif t == Q4_1:
        _rows_q4_1(w, e, r0, r1, src, n_src, xf, res, lanes)
    elif t == Q5_0:
        _rows_q5_0(w, e, r0, r1, src, n_src, xf, res, lanes)
    elif t == Q5_1:
        _rows_q5_1(w, e, r0, r1, src, n_src, xf, res, lanes)
    elif t == BF16:
        _rows_bf16(w, e, r0, r1, src, n_src, xf, res, lanes)
    elif t == F16:
        _rows_f16(w, e, r0, r1, src, n_src, xf, res, lanes)
    else:
        _rows_f32(w, e, r0, r1, src, n_src, xf, res, lanes)


@njit(inline="always")
def _dot_k(c, d, dmin, wq, mins, src, n_src, x16, xd, xs, res, j, L):
    """res[i, j] += super-block c of a K-quant row (wq, mins, d, dmin) . activation row src[i]. The loop
    runs to 8 * L (256) for the reason in blocks.py. One token per loop on purpose: with one int32
    accumulator LLVM emits vpmaddwd (16 products summed in pairs per instruction); four tokens sharing
    each load of wq turned it into vpmovsxwd + vpmulld, twice the instructions."""
    for i in range(n_src):
        s = src[i]
        a = i32(0)
        for l in range(8 * L):   # unsigned index: no wraparound code, so LLVM vectorises (see blocks.py)
            a = i32(a + i32(wq[l]) * i32(x16[s, u64(QB * c + l)]))
        res[i, j] += _k_scale(c, d, dmin, a, mins, s, xd, xs, L)


@njit(inline="always")
def _k_scale(c, d, dmin, isum, mins, s, xd, xs, L):
    """xd * (d * isum - dmin * sum_g mins[g] * xs[g]) for super-block c and activation row s."""
    msum = i32(0)
    for g in range(L >> 1):
        msum = i32(msum + mins[g] * xs[s, u64(16 * c + g)])
    return xd[s, c] * (d * f32(isum) - dmin * f32(msum))


@njit(inline="always")
def _dot_f(c, n, wf, src, n_src, xf, res, j):
    """res[i, j] += the n float32 weights of chunk c . activation row src[i] (unquantized); four tokens
    share each load of wf."""
    i = 0
    while i + 4 <= n_src:
        s0, s1, s2, s3 = src[i], src[i + 1], src[i + 2], src[i + 3]
        a0, a1, a2, a3 = f32(0), f32(0), f32(0), f32(0)
        for l in range(n):
            v, o = wf[l], u64(QB * c + l)
            a0 += v * xf[s0, o]
            a1 += v * xf[s1, o]
            a2 += v * xf[s2, o]
            a3 += v * xf[s3, o]
        res[i, j] += a0
        res[i + 1, j] += a1
        res[i + 2, j] += a2
        res[i + 3, j] += a3
        i += 4
    while i < n_src:
        s = src[i]
        a = f32(0)
        for l in range(n):
            a += wf[l] * xf[s, u64(QB * c + l)]
        res[i, j] += a
        i += 1


@njit(inline="always")
def _zero(res, n_src, j):
    for i in range(n_src):
        res[i, j] = 0


# K-quants: per super-block one integer dot per token, then d * isum - dmin * mins . sums

@njit(cache=True, nogil=True)
def _rows_q4_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, L):
    wq, mins = np.empty(QB, np.int16), np.empty(16, np.int32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range(w.shape[2] // 144):
            d, dmin = _unpack_q4_k(w, e, r, c, wq, mins, L)
            _dot_k(c, d, dmin, wq, mins, src, n_src, x16, xd, xs, res, r - r0, L)


@njit(cache=True, nogil=True)
def _rows_q5_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, L):
    wq, mins = np.empty(QB, np.int16), np.empty(16, np.int32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range(w.shape[2] // 176):
            d, dmin = _unpack_q5_k(w, e, r, c, wq, mins, L)
            _dot_k(c, d, dmin, wq, mins, src, n_src, x16, xd, xs, res, r - r0, L)


@njit(cache=True, nogil=True)
def _rows_q6_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, L):
    wq, mins = np.empty(QB, np.int16), np.empty(16, np.int32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range(w.shape[2] // 210):
            d, dmin = _unpack_q6_k(w, e, r, c, wq, mins, L)
            _dot_k(c, d, dmin, wq, mins, src, n_src, x16, xd, xs, res, r - r0, L)


@njit(cache=True, nogil=True)
def _rows_q2_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, L):
    wq, mins = np.empty(QB, np.int16), np.empty(16, np.int32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range(w.shape[2] // 84):
            d, dmin = _unpack_q2_k(w, e, r, c, wq, mins, L)
            _dot_k(c, d, dmin, wq, mins, src, n_src, x16, xd, xs, res, r - r0, L)


@njit(cache=True, nogil=True)
def _rows_q3_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, L):
    wq, mins = np.empty(QB, np.int16), np.empty(16, np.int32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range(w.shape[2] // 110):
            d, dmin = _unpack_q3_k(w, e, r, c, wq, mins, L)
            _dot_k(c, d, dmin, wq, mins, src, n_src, x16, xd, xs, res, r - r0, L)


# One activation row (decode, T = 1): no token shares the unpacked weights, so writing them to a scratch and
# reading them back is pure cost. Q4_K: eight int32 sums, one per sub-block, of nibble * x16 (each product
# fits int16: 15 * 1023), scaled once per super-block. Q8_0: one float sum per block, scaled by d.
# One core, 512 rows of 2048 in L2, G weights/s: Q4_K 10.1 -> 10.9 (Zen 4), 7.3 -> 7.6 (GPU box); Q8_0
# 5.2 -> 7.7, 5.4 -> 5.6. The V3 Q4_K decode layer on the GPU box: 1.17-1.19x (NOTES.md).

@njit(cache=True, nogil=True)
def _rows1_q4_k(w, e, r0, r1, s, x16, xd, xs, res, L):
    for r in range(r0, r1):
        acc = f32(0)
        for c in range(w.shape[2] // 144):
            o, xo, g = c * 144, QB * c, 16 * c
            s0, m0 = _k4_scale_min(w, e, r, o + 4, 0)
            s1, m1 = _k4_scale_min(w, e, r, o + 4, 1)
            s2, m2 = _k4_scale_min(w, e, r, o + 4, 2)
            s3, m3 = _k4_scale_min(w, e, r, o + 4, 3)
            s4, m4 = _k4_scale_min(w, e, r, o + 4, 4)
            s5, m5 = _k4_scale_min(w, e, r, o + 4, 5)
            s6, m6 = _k4_scale_min(w, e, r, o + 4, 6)
            s7, m7 = _k4_scale_min(w, e, r, o + 4, 7)
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = i32(0)
            for l in range(L):   # layout as in blocks.py::_unpack_q4_k
                v0, v1 = _byte(w, e, r, o + 16 + l), _byte(w, e, r, o + 48 + l)
                v2, v3 = _byte(w, e, r, o + 80 + l), _byte(w, e, r, o + 112 + l)
                a0 = i32(a0 + i32(i16(v0 & 15) * x16[s, u64(xo + l)]))
                a1 = i32(a1 + i32(i16(v0 >> 4) * x16[s, u64(xo + 32 + l)]))
                a2 = i32(a2 + i32(i16(v1 & 15) * x16[s, u64(xo + 64 + l)]))
                a3 = i32(a3 + i32(i16(v1 >> 4) * x16[s, u64(xo + 96 + l)]))
                a4 = i32(a4 + i32(i16(v2 & 15) * x16[s, u64(xo + 128 + l)]))
                a5 = i32(a5 + i32(i16(v2 >> 4) * x16[s, u64(xo + 160 + l)]))
                a6 = i32(a6 + i32(i16(v3 & 15) * x16[s, u64(xo + 192 + l)]))
                a7 = i32(a7 + i32(i16(v3 >> 4) * x16[s, u64(xo + 224 + l)]))
            isum = s0 * a0 + s1 * a1 + s2 * a2 + s3 * a3 + s4 * a4 + s5 * a5 + s6 * a6 + s7 * a7
            msum = (m0 * (xs[s, g] + xs[s, g + 1]) + m1 * (xs[s, g + 2] + xs[s, g + 3])
                    + m2 * (xs[s, g + 4] + xs[s, g + 5]) + m3 * (xs[s, g + 6] + xs[s, g + 7])
                    + m4 * (xs[s, g + 8] + xs[s, g + 9]) + m5 * (xs[s, g + 10] + xs[s, g + 11])
                    + m6 * (xs[s, g + 12] + xs[s, g + 13]) + m7 * (xs[s, g + 14] + xs[s, g + 15]))
            acc += xd[s, c] * (_f16(w, e, r, o) * f32(isum) - _f16(w, e, r, o + 2) * f32(msum))
        res[0, r - r0] = acc


# Float-dotted types: dequantize a chunk to float32 and dot it with the unquantized activations; fastmath's
# reassociation lets LLVM keep 16-lane partial sums (and contract d * q + m into one FMA).
FAST = {"reassoc", "contract"}

@njit(cache=True, nogil=True, fastmath=FAST)
def _rows1_q8_0(w, e, r0, r1, s, xf, res, L):
    for r in range(r0, r1):
        acc = f32(0)
        for j in range(w.shape[2] // 34):   # block_q8_0 as in blocks.py::_unpack_q8_0
            o = j * 34
            a = f32(0)
            for l in range(L):
                v = _byte(w, e, r, o + 2 + l)
                a += f32(i32(v - ((v & 128) << 1))) * xf[s, u64(32 * j + l)]
            acc += _f16(w, e, r, o) * a
        res[0, r - r0] = acc


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_q8_0(w, e, r0, r1, src, n_src, xf, res, L):
    n_vals, wf = _n_values(w, Q8_0), np.empty(QB, np.float32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_q8_0(w, e, r, c, n, wf, L)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_q4_0(w, e, r0, r1, src, n_src, xf, res, L):
    n_vals, wf = _n_values(w, Q4_0), np.empty(QB, np.float32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_q4_0(w, e, r, c, n, wf, L)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_q4_1(w, e, r0, r1, src, n_src, xf, res, L):
    n_vals, wf = _n_values(w, Q4_1), np.empty(QB, np.float32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_q4_1(w, e, r, c, n, wf, L)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_q5_0(w, e, r0, r1, src, n_src, xf, res, L):
    n_vals, wf = _n_values(w, Q5_0), np.empty(QB, np.float32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_q5_0(w, e, r, c, n, wf, L)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_q5_1(w, e, r0, r1, src, n_src, xf, res, L):
    n_vals, wf = _n_values(w, Q5_1), np.empty(QB, np.float32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_q5_1(w, e, r, c, n, wf, L)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_bf16(w, e, r0, r1, src, n_src, xf, res, L):
    n_vals, wb = _n_values(w, BF16), np.empty(QB, np.uint32)
    wf = wb.view(np.float32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_bf16(w, e, r, c, n, wb)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_f16(w, e, r0, r1, src, n_src, xf, res, L):
    n_vals, wb = _n_values(w, F16), np.empty(QB, np.uint32)
    wf = wb.view(np.float32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_f16(w, e, r, c, n, wb, wf)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_f32(w, e, r0, r1, src, n_src, xf, res, L):
    n_vals, wb = _n_values(w, F32), np.empty(QB, np.uint32)
    wf = wb.view(np.float32)
    for r in range(r0, r1):
        _zero(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_f32(w, e, r, c, n, wb)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(inline="always")
def _n_values(w, t):
    return w.shape[2] // _TYPE_SIZE[t] * _BLOCK[t]

