"""GGUF blocks -> small int16 / float32 scratch that the dot loops of kernels/cpu/rows.py vectorise.

Each `_unpack_*` reads the blocks of one 256-value chunk of one weight row, straight from the raw GGUF bytes
w: uint8 (E, rows, row_bytes), and writes the chunk's quants to a scratch the dot loops reuse for every token:

- K-quants (256-value super-blocks): wq int16 (256,) = sub-block scale * quant, so that a whole super-block is
  one integer dot product, and the float part is `d * isum - dmin * sum_g mins[g] * xsum[g]` over 16 groups of
  16 values (mins are 0 where the type has none). Every wq fits int16: at most 63 * 31 (Q5_K) or
  127 * 32 (Q6_K), and a 256-term dot with 11-bit activations stays inside int32 (256 * 4064 * 1023 < 2**31).
- 32-value block types and F32 / F16 / BF16: wf float32, the weights themselves, dequantized in the order of
  quant/dequant.py (so bit for bit the same values); these are dotted in float32 (see kernels/cpu/rows.py).

Layouts follow ggml-common.h; quant/dequant.py has the same formats as bit diagrams. Three habits make LLVM
vectorise these loops (seen in the assembly; on one Zen 4 core the unsigned index alone took Q6_K
unpacking from 200 to 17 us per 1024 blocks):
- the loops over the 32 (or 16) values of a sub-block run to L (or L >> 1), L = 32 passed in from Python:
  with a constant trip count LLVM unrolls them completely before its loop vectorizer runs, and the SLP
  vectorizer that then sees them cannot prove that the scratch and the weights do not overlap, so they
  stayed scalar; with an unknown trip count the loop vectorizer adds a runtime overlap check and vectorises;
- bytes are read through `_byte`, whose index is unsigned: Numba then emits no negative-index wraparound
  select, which LLVM could not prove away and turned into byte-by-byte gathers;
- Numba widens every integer operation to 64 bits, so values are cast back to int32 / int16 on purpose,
  which lets LLVM keep 16-bit lanes (vpmovzxbw / vpmullw on 16 or 32 lanes) instead of 64-bit ones.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from dslocal.quant.ggml import GGMLType

i16, i32, u32, u64, f32 = np.int16, np.int32, np.uint32, np.uint64, np.float32

# fp16 -> float32 without a float16 type in Numba: value = mantissa * 2**(exponent - 25), subnormals at 2**-24
_POW2 = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 31)] + [np.inf], np.float32)

# Type ids as plain ints for the branches inside compiled code (ggml_type values).
F32, F16, BF16 = int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q5_0),
                                int(GGMLType.Q5_1), int(GGMLType.Q8_0))
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (int(GGMLType.Q2_K), int(GGMLType.Q3_K), int(GGMLType.Q4_K),
                                int(GGMLType.Q5_K), int(GGMLType.Q6_K))


@njit(inline="always")
def _byte(w, e, r, i):
    """Byte i of row r of expert e as int32 (unsigned index: no wraparound code in the loops)."""
    return i32(w[e, r, u64(i)])


@njit(inline="always")
def _f16(w, e, r, o):
    """The little-endian fp16 at byte o of row r of expert e, as float32 (infinities kept, NaN as inf)."""
    h = (_byte(w, e, r, o + 1) << 8) | _byte(w, e, r, o)
    x = (h >> 10) & 31
    v = f32(i32((h & 1023) | (1024 if x else 0))) * _POW2[x]
    return -v if h & 0x8000 else v


# --- K-quants: chunk c of a row is super-block c; wq int16 (256,), mins int32 (16,) -------------------

@njit(inline="always")
def _k4_scale_min(w, e, r, o, j):
    """Scale and min of sub-block j from the 12 bytes at o (get_scale_min_k4, ggml-quants.c)."""
    if j < 4:
        return _byte(w, e, r, o + j) & 63, _byte(w, e, r, o + 4 + j) & 63
    lo = _byte(w, e, r, o + 4 + j)
    return (lo & 15) | ((_byte(w, e, r, o + j - 4) >> 6) << 4), (lo >> 4) | ((_byte(w, e, r, o + j) >> 6) << 4)


@njit(inline="always")
def _unpack_q4_k(w, e, r, c, wq, mins, L):
    # block_q4_K, 144 bytes: d @0, dmin @2, scales[12] @4, qs[128] @16 (value 64k + l = lo nibble of
    # qs[32k + l], value 64k + 32 + l = hi nibble); w = d * sc_j * q - dmin * m_j, sub-blocks of 32.
    # One loop over l writes all 8 sub-blocks: one runtime overlap check per super-block, not eight.
    o = c * 144
    s0, m0 = _k4_scale_min(w, e, r, o + 4, 0)
    s1, m1 = _k4_scale_min(w, e, r, o + 4, 1)
    s2, m2 = _k4_scale_min(w, e, r, o + 4, 2)
    s3, m3 = _k4_scale_min(w, e, r, o + 4, 3)
    s4, m4 = _k4_scale_min(w, e, r, o + 4, 4)
    s5, m5 = _k4_scale_min(w, e, r, o + 4, 5)
    s6, m6 = _k4_scale_min(w, e, r, o + 4, 6)
    s7, m7 = _k4_scale_min(w, e, r, o + 4, 7)
    _mins_by_32(mins, m0, m1, m2, m3, m4, m5, m6, m7)
    for l in range(L):
        v0, v1 = _byte(w, e, r, o + 16 + l), _byte(w, e, r, o + 48 + l)
        v2, v3 = _byte(w, e, r, o + 80 + l), _byte(w, e, r, o + 112 + l)
        wq[l], wq[32 + l] = i16(i16(v0 & 15) * i16(s0)), i16(i16(v0 >> 4) * i16(s1))
        wq[64 + l], wq[96 + l] = i16(i16(v1 & 15) * i16(s2)), i16(i16(v1 >> 4) * i16(s3))
        wq[128 + l], wq[160 + l] = i16(i16(v2 & 15) * i16(s4)), i16(i16(v2 >> 4) * i16(s5))
        wq[192 + l], wq[224 + l] = i16(i16(v3 & 15) * i16(s6)), i16(i16(v3 >> 4) * i16(s7))
    return _f16(w, e, r, o), _f16(w, e, r, o + 2)


@njit(inline="always")
def _unpack_q5_k(w, e, r, c, wq, mins, L):
    # block_q5_K, 176 bytes: d @0, dmin @2, scales[12] @4, qh[32] @16 (bit b of qh[l] is bit 4 of value
    # 32b + l), qs[128] @48 as in Q4_K
    o = c * 176
    s0, m0 = _k4_scale_min(w, e, r, o + 4, 0)
    s1, m1 = _k4_scale_min(w, e, r, o + 4, 1)
    s2, m2 = _k4_scale_min(w, e, r, o + 4, 2)
    s3, m3 = _k4_scale_min(w, e, r, o + 4, 3)
    s4, m4 = _k4_scale_min(w, e, r, o + 4, 4)
    s5, m5 = _k4_scale_min(w, e, r, o + 4, 5)
    s6, m6 = _k4_scale_min(w, e, r, o + 4, 6)
    s7, m7 = _k4_scale_min(w, e, r, o + 4, 7)
    _mins_by_32(mins, m0, m1, m2, m3, m4, m5, m6, m7)
    for l in range(L):
        h = _byte(w, e, r, o + 16 + l) << 4     # bit b of qh moves to bit 4 + b
        v0, v1 = _byte(w, e, r, o + 48 + l), _byte(w, e, r, o + 80 + l)
        v2, v3 = _byte(w, e, r, o + 112 + l), _byte(w, e, r, o + 144 + l)
        wq[l] = i16(i16((v0 & 15) | (h & 16)) * i16(s0))
        wq[32 + l] = i16(i16((v0 >> 4) | ((h >> 1) & 16)) * i16(s1))
        wq[64 + l] = i16(i16((v1 & 15) | ((h >> 2) & 16)) * i16(s2))
        wq[96 + l] = i16(i16((v1 >> 4) | ((h >> 3) & 16)) * i16(s3))
        wq[128 + l] = i16(i16((v2 & 15) | ((h >> 4) & 16)) * i16(s4))
        wq[160 + l] = i16(i16((v2 >> 4) | ((h >> 5) & 16)) * i16(s5))
        wq[192 + l] = i16(i16((v3 & 15) | ((h >> 6) & 16)) * i16(s6))
        wq[224 + l] = i16(i16((v3 >> 4) | ((h >> 7) & 16)) * i16(s7))
    return _f16(w, e, r, o), _f16(w, e, r, o + 2)


@njit(inline="always")
def _mins_by_32(mins, m0, m1, m2, m3, m4, m5, m6, m7):
    """mins per 16 values from the 8 mins of 32-value sub-blocks."""
    mins[0], mins[1], mins[2], mins[3], mins[4], mins[5], mins[6], mins[7] = m0, m0, m1, m1, m2, m2, m3, m3
    mins[8], mins[9], mins[10], mins[11], mins[12], mins[13], mins[14], mins[15] = m4, m4, m5, m5, m6, m6, m7, m7


@njit(inline="always")
def _i8(v):
    return i16(v - ((v & 128) << 1))


@njit(inline="always")
def _unpack_q6_k(w, e, r, c, wq, mins, L):
    # block_q6_K, 210 bytes: ql[128] @0, qh[64] @128, scales int8[16] @192, d @208; in half h, value
    # 128h + 32k + l has low bits from ql[64h + 32(k&1) + l] (hi nibble for k >= 2) and high bits 2k..2k+1
    # of qh[32h + l]; w = d * sc * (q - 32), sub-blocks of 16. (One loop per sub-block here: a single loop
    # writing all 16 was 2.5 times slower on Zen 4.)
    o = c * 210
    for g in range(16):
        mins[g] = 0
    for h in range(2):
        for k in range(4):
            for half in range(2):   # values l < 16 have scale byte 8h + 2k, the rest the next one
                sc = _i8(_byte(w, e, r, o + 192 + 8 * h + 2 * k + half))
                for l in range(half * (L >> 1), (half + 1) * (L >> 1)):
                    lo = (_byte(w, e, r, o + 64 * h + 32 * (k & 1) + l) >> (4 * (k >> 1))) & 15
                    q = (lo | (((_byte(w, e, r, o + 128 + 32 * h + l) >> (2 * k)) & 3) << 4)) - 32
                    wq[128 * h + 32 * k + l] = i16(i16(q) * sc)
    return _f16(w, e, r, o + 208), f32(0)


@njit(inline="always")
def _unpack_q2_k(w, e, r, c, wq, mins, L):
    # block_q2_K, 84 bytes: scales[16] @0 (lo nibble scale, hi nibble min), qs[64] @16 (value 128h + 32k + l
    # = bits 2k..2k+1 of qs[32h + l]), d @80, dmin @82; w = d * sc * q - dmin * m, sub-blocks of 16
    o = c * 84
    for g in range(16):
        mins[g] = _byte(w, e, r, o + g) >> 4
    for h in range(2):
        for k in range(4):
            for half in range(2):
                sc = i16(_byte(w, e, r, o + 8 * h + 2 * k + half) & 15)
                for l in range(half * (L >> 1), (half + 1) * (L >> 1)):
                    q = (_byte(w, e, r, o + 16 + 32 * h + l) >> (2 * k)) & 3
                    wq[128 * h + 32 * k + l] = i16(i16(q) * sc)
    return _f16(w, e, r, o + 80), _f16(w, e, r, o + 82)


@njit(inline="always")
def _q3_scale(w, e, r, o, s):
    """Scale s of a Q3_K block whose scales[12] are at o: 4 low bits, 2 high bits, stored + 32."""
    lo = (_byte(w, e, r, o + s % 8) >> (4 * (s // 8))) & 15
    hi = (_byte(w, e, r, o + 8 + s % 4) >> (2 * (s // 4))) & 3
    return i16((lo | (hi << 4)) - 32)


@njit(inline="always")
def _unpack_q3_k(w, e, r, c, wq, mins, L):
    # block_q3_K, 110 bytes: hmask[32] @0 (bit b of hmask[l] set: value 32b + l keeps +4), qs[64] @32 as in
    # Q2_K, scales[12] @96 (see _q3_scale), d @108; w = d * (sc - 32) * (q - 4 * (1 - hbit)), sub-blocks of 16
    o = c * 110
    for g in range(16):
        mins[g] = 0
    for h in range(2):
        for k in range(4):
            for half in range(2):
                sc = _q3_scale(w, e, r, o + 96, 8 * h + 2 * k + half)
                for l in range(half * (L >> 1), (half + 1) * (L >> 1)):
                    q = (_byte(w, e, r, o + 32 + 32 * h + l) >> (2 * k)) & 3
                    q -= 4 - 4 * ((_byte(w, e, r, o + l) >> (4 * h + k)) & 1)
                    wq[128 * h + 32 * k + l] = i16(i16(q) * sc)
    return _f16(w, e, r, o + 108), f32(0)


# --- float-dotted types: chunk c of a row is values 256c .. 256c + n - 1 into wf float32 (256,) ----------
# (wb, where given, is a uint32 view of wf for types whose values are assembled from bits)

@njit(inline="always")
def _unpack_q8_0(w, e, r, c, n, wf, L):
    # block_q8_0, 34 bytes: d @0, qs int8[32] @2; w = d * q
    for j in range(n // 32):
        o = (8 * c + j) * 34
        d = _f16(w, e, r, o)
        for l in range(L):
            v = _byte(w, e, r, o + 2 + l)
            wf[32 * j + l] = d * f32(i32(v - ((v & 128) << 1)))


@njit(inline="always")
def _unpack_q4_0(w, e, r, c, n, wf, L):
    # block_q4_0, 18 bytes: d @0, qs[16] @2 (value l = lo nibble of qs[l], value l + 16 = hi nibble);
    # w = d * (q - 8)
    for j in range(n // 32):
        o = (8 * c + j) * 18
        d = _f16(w, e, r, o)
        for l in range(L >> 1):
            v = _byte(w, e, r, o + 2 + l)
            wf[32 * j + l] = d * (f32(i32(v & 15)) - f32(8))
            wf[32 * j + 16 + l] = d * (f32(i32(v >> 4)) - f32(8))


@njit(inline="always")
def _unpack_q4_1(w, e, r, c, n, wf, L):
    # block_q4_1, 20 bytes: d @0, m @2, qs[16] @4 as in Q4_0; w = d * q + m
    for j in range(n // 32):
        o = (8 * c + j) * 20
        d, m = _f16(w, e, r, o), _f16(w, e, r, o + 2)
        for l in range(L >> 1):
            v = _byte(w, e, r, o + 4 + l)
            wf[32 * j + l] = d * f32(i32(v & 15)) + m
            wf[32 * j + 16 + l] = d * f32(i32(v >> 4)) + m


@njit(inline="always")
def _u32le(w, e, r, o):
    """The little-endian uint32 at byte o (the qh bits of Q5_0 / Q5_1, the bits of an F32)."""
    return (u32(_byte(w, e, r, o)) | (u32(_byte(w, e, r, o + 1)) << 8) |
            (u32(_byte(w, e, r, o + 2)) << 16) | (u32(_byte(w, e, r, o + 3)) << 24))


@njit(inline="always")
def _unpack_q5_0(w, e, r, c, n, wf, L):
    # block_q5_0, 22 bytes: d @0, qh u32 @2, qs[16] @6 (low 4 bits as in Q4_0); w = d * (q - 16)
    for j in range(n // 32):
        o = (8 * c + j) * 22
        d, qh = _f16(w, e, r, o), i32(_u32le(w, e, r, o + 2))
        for l in range(L >> 1):
            v = _byte(w, e, r, o + 6 + l)
            lo = (v & 15) | (((qh >> (l & 15)) & 1) << 4)
            hi = (v >> 4) | (((qh >> ((l & 15) + 16)) & 1) << 4)
            wf[32 * j + l] = d * (f32(i32(lo)) - f32(16))
            wf[32 * j + 16 + l] = d * (f32(i32(hi)) - f32(16))


@njit(inline="always")
def _unpack_q5_1(w, e, r, c, n, wf, L):
    # block_q5_1, 24 bytes: d @0, m @2, qh u32 @4, qs[16] @8; w = d * q + m
    for j in range(n // 32):
        o = (8 * c + j) * 24
        d, m, qh = _f16(w, e, r, o), _f16(w, e, r, o + 2), i32(_u32le(w, e, r, o + 4))
        for l in range(L >> 1):
            v = _byte(w, e, r, o + 8 + l)
            lo = (v & 15) | (((qh >> (l & 15)) & 1) << 4)
            hi = (v >> 4) | (((qh >> ((l & 15) + 16)) & 1) << 4)
            wf[32 * j + l] = d * f32(i32(lo)) + m
            wf[32 * j + 16 + l] = d * f32(i32(hi)) + m


@njit(inline="always")
def _unpack_f32(w, e, r, c, n, wb):
    for l in range(n):
        wb[l] = _u32le(w, e, r, 4 * (256 * c + l))


@njit(inline="always")
def _unpack_bf16(w, e, r, c, n, wb):
    for l in range(n):   # bf16 is the top half of a float32 (ggml_bf16_to_fp32)
        o = 2 * (256 * c + l)
        wb[l] = (u32(_byte(w, e, r, o)) << 16) | (u32(_byte(w, e, r, o + 1)) << 24)


@njit(inline="always")
def _unpack_f16(w, e, r, c, n, wb, wf):
    for l in range(n):   # fp16: move sign, exponent and mantissa into place, then rescale the exponent
        o = 2 * (256 * c + l)
        h = u32(_byte(w, e, r, o)) | (u32(_byte(w, e, r, o + 1)) << 8)
        b = ((h & 0x7FFF) << 13) | ((h & 0x8000) << 16)
        wb[l] = b | u32(0x7F800000) if (h & 0x7C00) == 0x7C00 else b
    for l in range(n):   # 2**112 = 2**(127 - 15): exact for normals and subnormals; inf and NaN stay
        wf[l] *= f32(5.192296858534828e33)
