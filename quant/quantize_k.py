"""K-quant quantizers: numpy versions of llama.cpp's quantize_row_q{2,3,4,5,6}_K_ref (ggml/src/ggml-quants.c).

Each takes float32 super-blocks (n_blocks, 256) and returns their raw bytes (n_blocks, type_size); the
dispatch is in quant/quantize.py. The per-sub-block searches run on all sub-blocks at once: their loops over
candidate scales, or over elements, stay short Python loops whose every step is vectorised over sub-blocks.
Arithmetic is float32 in C's order of operations, nearest_int is np.rint (both round half to even), and sums
add element after element as C's loops do; so the bytes equal the C reference built without FMA contraction.
"""
from __future__ import annotations

import numpy as np

GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: a group whose largest |x| is below this is all zero
F32 = np.float32


# ---------------------------------------------------------------------------------------------- helpers
# The searches take sub-blocks as columns, x (n, S) for S sub-blocks of n values: per-sub-block scalars are
# (S,) arrays that broadcast without reshaping, and a sum over axis 0 adds row after row, the order of C's
# `for (i = 0; i < n; ++i) sum += ...` (numpy sums along a contiguous axis pairwise, which rounds differently).

def _columns(blocks: np.ndarray, n: int) -> np.ndarray:
    """float32 (n_blocks, 256) -> (n, S): sub-blocks of n values as columns, S = n_blocks * 256 / n."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _round_clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """MAX(lo, MIN(hi, nearest_int(v))), as float32 integers."""
    return np.clip(np.rint(v), lo, hi)


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 of v (m,): the stored bytes uint8 (m, 2) and the value read back, float32 (m,)."""
    h = v.astype("<f2")
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _divide_or_zero(a: float, b: np.ndarray) -> np.ndarray:
    """a / b where b > 0, else 0 (C's `max > 0 ? 63.f/max : 0.f`)."""
    ok = b > 0
    return np.where(ok, F32(a) / np.where(ok, b, F32(1)), F32(0))


def _signed_absmax(v: np.ndarray, axis: int) -> np.ndarray:
    """The entry of largest magnitude along axis, sign kept, the first one on ties; axis removed."""
    i = np.expand_dims(np.abs(v).argmax(axis=axis), axis)
    return np.take_along_axis(v, i, axis=axis).squeeze(axis)


def _or_shifted(parts: np.ndarray, shifts, axis: int) -> np.ndarray:
    """uint8: OR of `parts << shift` along axis, shifts one per index of that axis; axis removed."""
    shape = [1] * parts.ndim
    shape[axis] = -1
    shifted = parts.astype(np.uint8) << np.asarray(shifts, dtype=np.uint8).reshape(shape)
    return np.bitwise_or.reduce(shifted, axis=axis)


# -------------------------------------------------------------------------------- sub-block searches

# make_qkx2_quants: fit x ~ scale * L - the_min (L in 0..nmax, the_min >= 0) under weights w. Start from the
# min/max grid, then try nstep + 1 inverse scales (rmin + rdelta*is + nmax) / (max - min); refit scale and
# min of each rounding by weighted least squares and keep the one of least weighted squared (use_mad:
# absolute) error. As in C, each candidate grid is laid from the best min found so far, not the data's min.
def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, w float32 (n, S) -> scale (S,), the_min (S,), L float32 (n, S)."""
    lo = np.minimum(x.min(axis=0), 0)       # min is clamped to <= 0 so that 0 stays representable
    hi = x.max(axis=0)
    flat = hi == lo                         # C: L = 0, scale 0, the_min = -min
    sum_w = w.sum(axis=0)
    sum_x = (w * x).sum(axis=0)

    def error(scale, mn, L):
        diff = scale * L + mn - x
        return (w * (np.abs(diff) if use_mad else diff * diff)).sum(axis=0)

    iscale = F32(nmax) / np.where(flat, F32(1), hi - lo)
    scale = F32(1) / iscale
    mn = lo
    L = _round_clip(iscale * (x - mn), 0, nmax)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        span = hi - mn
        ok = span > 0
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / np.where(ok, span, F32(1))
        laux = _round_clip(iscale * (x - mn), 0, nmax)
        wl = w * laux
        sum_l, sum_l2, sum_xl = wl.sum(axis=0), (wl * laux).sum(axis=0), (wl * x).sum(axis=0)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok &= det > 0
        det = np.where(ok, det, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0             # a positive min is not allowed: refit the scale alone
        this_min = np.where(positive, F32(0), this_min)
        this_scale = np.where(positive, sum_xl / np.where(ok, sum_l2, F32(1)), this_scale)
        cur = error(this_scale, this_min, laux)
        better = ok & (cur < best)
        L = np.where(better, laux, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    return np.where(flat, F32(0), scale), -mn, np.where(flat, F32(0), L)


# make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): symmetric, x ~ scale * (L - nmax), L in 0..2*nmax-1.
# The signed extreme maps to -nmax (so scale < 0 when it is positive); 19 inverse scales
# -(nmax + 0.1*is) / max are tried, each refit by least squares with weights x^2, keeping the largest
# sumlx^2 / suml2, i.e. the least weighted error.
def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (n, S) -> scale (S,), L float32 (n, S)."""
    xmax = _signed_absmax(x, axis=0)
    zero = np.abs(xmax) < GROUP_MAX_EPS     # C: L = 0, scale 0
    xmax = np.where(zero, F32(1), xmax)
    w = x * x
    wx = w * x

    def fit(iscale):
        l = _round_clip(iscale * x, -nmax, nmax - 1)
        return l, (wx * l).sum(axis=0), (w * l * l).sum(axis=0)

    L, sumlx, suml2 = fit(F32(-nmax) / xmax)
    scale = sumlx / np.where(suml2 != 0, suml2, F32(1))    # 0 when suml2 is 0, since sumlx is 0 then too
    best = scale * sumlx
    for i in (*range(-9, 0), *range(1, 10)):
        l, slx, sl2 = fit(-(F32(nmax) + F32(0.1) * F32(i)) / xmax)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better, l, L)
        scale = np.where(better, slx / np.where(better, sl2, F32(1)), scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), L + nmax)


# make_q3_quants(n, nmax, x, L, do_rmse=true): from the extreme-value rounding of make_qx_quants, up to 5
# passes of coordinate descent move one L at a time to its best level given the rest (weights x^2). A pass
# is sequential over the n elements, so it loops over rows; a column whose pass changed nothing would change
# nothing in the next one either, so running all 5 passes everywhere equals C's early exit.
def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (n, S) -> scale (S,), L float32 (n, S)."""
    xmax = _signed_absmax(x, axis=0)
    zero = np.abs(xmax) < GROUP_MAX_EPS     # C: L = 0 (not +nmax), scale 0
    xmax = np.where(zero, F32(1), xmax)
    L = _round_clip((F32(-nmax) / xmax) * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = (wx * L).sum(axis=0), (w * L * L).sum(axis=0)
    for _ in range(5):
        for i in range(x.shape[0]):
            xi, wi, wxi, li = x[i], w[i], wx[i], L[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            new_l = _round_clip(xi * sl2 / np.where(pos, slx, F32(1)), -nmax, nmax - 1)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = pos & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), L + nmax)


# The last pass of every quantize_row_q*_K_ref: round each value against its sub-block's scale as stored
# (after the 6- or 8-bit and fp16 rounding), q = clip(nearest_int((x + offset) / step), lo, hi) + shift. A
# sub-block whose stored step is 0 keeps L from the search (C's `if (!d) continue;`).
def _requantize(x: np.ndarray, L: np.ndarray, step: np.ndarray, lo: int, hi: int, shift: int = 0,
                offset: np.ndarray | None = None) -> np.ndarray:
    """x, L float32 (n, J, m); step, offset (n, J) -> uint8 (n, J*m)."""
    step = step[:, :, None]
    if offset is not None:
        x = x + offset[:, :, None]
    q = _round_clip(x / np.where(step != 0, step, F32(1)), lo, hi) + shift
    return np.where(step != 0, q, L).astype(np.uint8).reshape(x.shape[0], -1)


# -------------------------------------------------------------------------------------------- Q4_K, Q5_K
# Both: 8 sub-blocks of 32, w = d * sc_j * q - dmin * m_j with 6-bit sc_j, m_j in a 12-byte field that
# get_scale_min_k4 unpacks (bits 7..0 of each byte):
#   byte 0-3  : s4-7 bits 5..4 | s0-3 bits 5..0       (s = sc)
#   byte 4-7  : m4-7 bits 5..4 | m0-3 bits 5..0
#   byte 8-11 : m4-7 bits 3..0 | s4-7 bits 3..0
# Values are in 4 chunks of 64; chunk c is sub-blocks 2c (low nibbles) and 2c+1 (high nibbles):
#   qs[32c + l] = q[64c + 32 + l] & 0xF (bits 7..4) | q[64c + l] & 0xF (bits 3..0)

def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins uint8 (n, 8) each -> the 12-byte field uint8 (n, 12)."""
    return np.concatenate([ls[:, :4] | (ls[:, 4:] >> 4) << 6,
                           lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                           (ls[:, 4:] & 0x0F) | (lm[:, 4:] & 0x0F) << 4], axis=1)


def _pack_low_nibbles(L: np.ndarray) -> np.ndarray:
    """uint8 (n, 256) -> qs uint8 (n, 128)."""
    L = (L & 0x0F).reshape(-1, 4, 2, 32)                        # (n, chunk, half, l)
    return (L[:, :, 0] | L[:, :, 1] << 4).reshape(-1, 128)


def _second_level(scales: np.ndarray, mins: np.ndarray, levels: int):
    """Sub-block scales and mins (n, S) as integer multiples 0..levels of d = max/levels, dmin likewise.

    Returns ls, lm (n, S) float32 integers, and d, dmin as fp16 bytes (n, 2) and float32 (n,).
    """
    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    ls = _round_clip(_divide_or_zero(levels, max_scale)[:, None] * scales, 0, levels)
    lm = _round_clip(_divide_or_zero(levels, max_min)[:, None] * mins, 0, levels)
    d_bytes, d = _f16(max_scale / F32(levels))
    dmin_bytes, dmin = _f16(max_min / F32(levels))
    return ls, lm, d_bytes, d, dmin_bytes, dmin


# The common part of quantize_row_q4_K_ref and quantize_row_q5_K_ref: make_qkx2_quants per sub-block with
# weights av_x + |x| (av_x the sub-block's RMS); then the 8 scales and 8 mins become 6-bit multiples of
# d = max_scale / 63 and dmin = max_min / 63, and every value is re-rounded against them.
def _quantize_qkx(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """float32 (n, 256) -> d, dmin uint8 (n, 2), scales uint8 (n, 12), L uint8 (n, 256) in 0..nmax."""
    n = blocks.shape[0]
    x = _columns(blocks, 32)                                    # (32, 8n)
    av_x = np.sqrt((x * x).sum(axis=0) / F32(32))
    w = av_x + np.abs(x)
    scales, mins, L = _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad=False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    ls, lm, d_bytes, d, dmin_bytes, dmin = _second_level(scales, mins, 63)
    L = _requantize(blocks.reshape(n, 8, 32), L.T.reshape(n, 8, 32), d[:, None] * ls, 0, nmax,
                    offset=dmin[:, None] * lm)
    return d_bytes, dmin_bytes, _pack_scales_k4(ls.astype(np.uint8), lm.astype(np.uint8)), L


# block_q4_K, 144 bytes: d f16 @0 | dmin f16 @2 | scales[12] @4 | qs[128] @16.  q 4 bits.
def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref, make_qkx2_quants(32, 15, rmin=-1, rdelta=0.1, nstep=20): (n, 256) -> (n, 144)."""
    d, dmin, scales, L = _quantize_qkx(blocks, 15, -1.0, 0.1, 20)
    return np.concatenate([d, dmin, scales, _pack_low_nibbles(L)], axis=1)


# block_q5_K, 176 bytes: d f16 @0 | dmin f16 @2 | scales[12] @4 | qh[32] @16 | qs[128] @48.  q 5 bits:
#   qs the low nibbles as in Q4_K;  qh[l] bit j = bit 4 of q[32j + l] (sub-block j)
def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref, make_qkx2_quants(32, 31, rmin=-0.5, rdelta=0.1, nstep=15): (n, 256) -> (n, 176)."""
    d, dmin, scales, L = _quantize_qkx(blocks, 31, -0.5, 0.1, 15)
    qh = _or_shifted((L >> 4).reshape(-1, 8, 32), range(8), axis=1)
    return np.concatenate([d, dmin, scales, qh, _pack_low_nibbles(L)], axis=1)


# ---------------------------------------------------------------------------------------------- Q6_K
# block_q6_K, 210 bytes: ql[128] @0 | qh[64] @128 | scales int8[16] @192 | d f16 @208.
# 16 sub-blocks of 16, w = d * sc_j * (q - 32), q 6 bits. Half h (values 128h..128h+127) owns ql[64h..+63]
# and qh[32h..+31]; with value v = 128h + 32k + l (k = 0..3, l = 0..31):
#   ql[64h + l]      = q(k=2) & 0xF (bits 7..4) | q(k=0) & 0xF (bits 3..0)
#   ql[64h + 32 + l] = q(k=3) & 0xF (bits 7..4) | q(k=1) & 0xF (bits 3..0)
#   qh[32h + l]      = q(k=3) >> 4 (bits 7..6) | q(k=2) >> 4 | q(k=1) >> 4 | q(k=0) >> 4 (bits 1..0)
def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref, make_qx_quants(16, 32, x, L, 1, NULL) per sub-block: (n, 256) -> (n, 210)."""
    n = blocks.shape[0]
    scales, L = _make_qx_quants(_columns(blocks, 16), 32)
    scales = scales.reshape(n, 16)
    max_scale = _signed_absmax(scales, axis=1)
    empty = np.abs(max_scale) < GROUP_MAX_EPS                  # C writes an all-zero block
    # 8-bit scales: the largest maps to -128, so d = max_scale / -128.
    iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d_bytes, d = _f16(np.where(empty, F32(0), F32(1) / iscale))
    sc = np.where(empty[:, None], F32(0), _round_clip(iscale[:, None] * scales, -128, 127))
    L = _requantize(blocks.reshape(n, 16, 16), L.T.reshape(n, 16, 16), d[:, None] * sc, -32, 31, shift=32)
    L = np.where(empty[:, None], 0, L).reshape(n, 2, 4, 32)   # (n, h, k, l)
    low = L & 0x0F
    ql = (low[:, :, 0:2] | low[:, :, 2:4] << 4).reshape(n, 128)
    qh = _or_shifted(L >> 4, (0, 2, 4, 6), axis=2).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d_bytes], axis=1)


# ---------------------------------------------------------------------------------------------- Q2_K, Q3_K
# Both: 16 sub-blocks of 16 and 2-bit planes; with value v = 128h + 32k + l (h = 0..1, k = 0..3):
#   qs[32h + l] = q(k=3) bits 7..6 | q(k=2) bits 5..4 | q(k=1) bits 3..2 | q(k=0) bits 1..0

def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """uint8 (n, 256), low 2 bits used -> qs uint8 (n, 64)."""
    return _or_shifted((L & 3).reshape(-1, 2, 4, 32), (0, 2, 4, 6), axis=2).reshape(-1, 64)


# block_q2_K, 84 bytes: scales[16] @0 | qs[64] @16 | d f16 @80 | dmin f16 @82.
#   scales[j] = m_j (bits 7..4) | sc_j (bits 3..0);  w = d * sc_j * q - dmin * m_j, q 2 bits
def quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_ref, make_qkx2_quants(16, 3, |x|, -0.5, 0.1, 15, use_mad): (n, 256) -> (n, 84)."""
    n = blocks.shape[0]
    x = _columns(blocks, 16)
    scales, mins, L = _make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    # 4-bit multiples of d = max_scale / 15 and dmin = max_min / 15.
    ls, lm, d_bytes, d, dmin_bytes, dmin = _second_level(scales, mins, 15)
    L = _requantize(blocks.reshape(n, 16, 16), L.T.reshape(n, 16, 16), d[:, None] * ls, 0, 3,
                    offset=dmin[:, None] * lm)
    packed_scales = ls.astype(np.uint8) | lm.astype(np.uint8) << 4
    return np.concatenate([packed_scales, _pack_2bit(L), d_bytes, dmin_bytes], axis=1)


# block_q3_K, 110 bytes: hmask[32] @0 | qs[64] @32 | scales[12] @96 | d f16 @108.
#   w = d * (s_j - 32) * (q - 4), q 3 bits: bits 1..0 in qs, bit 2 in hmask[l] bit k for value 32k + l.
#   s_j 6 bits:  byte j (j < 8)   bits 3..0 = s_j & 0xF;   byte j-8 (j >= 8) bits 7..4 = s_j & 0xF
#                byte 8 + j%4,    bits 2(j/4)+1..2(j/4) = s_j >> 4
def quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_ref, make_q3_quants(16, 4, x, L, true) per sub-block: (n, 256) -> (n, 110)."""
    n = blocks.shape[0]
    scales, L = _make_q3_quants(_columns(blocks, 16), 4)
    scales = scales.reshape(n, 16)
    max_scale = _signed_absmax(scales, axis=1)
    empty = max_scale == 0                                      # C: scales and d all zero
    # Signed 6-bit scales: the largest maps to -32, so d = max_scale / -32; stored as s_j + 32.
    iscale = F32(-32) / np.where(empty, F32(1), max_scale)
    d_bytes, d = _f16(np.where(empty, F32(0), F32(1) / iscale))
    s = np.where(empty[:, None], F32(0), _round_clip(iscale[:, None] * scales, -32, 31) + 32).astype(np.uint8)
    L = _requantize(blocks.reshape(n, 16, 16), L.T.reshape(n, 16, 16), d[:, None] * (s - F32(32)), -4, 3,
                    shift=4)
    hmask = _or_shifted((L >> 2).reshape(n, 8, 32), range(8), axis=1)
    low, high = s & 0x0F, s >> 4
    scales12 = np.concatenate([low[:, :8] | low[:, 8:] << 4,
                               _or_shifted(high.reshape(n, 4, 4), (0, 2, 4, 6), axis=1)], axis=1)
    return np.concatenate([hmask, _pack_2bit(L), scales12, d_bytes], axis=1)
