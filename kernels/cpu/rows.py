"""Dot products of a range of weight rows with a few activation rows, straight from GGUF blocks (Numba).

Quantized types: activations are quantized once per call to integers: 11 bits held in int16 in blocks of 256
(one float scale per block), with int32 sums over groups of 16 for the mins and offsets; for the K-quants 8
bits in the same blocks (llama.cpp's Q8_K), for Q4_0 / Q5_0 / Q4_1 / Q5_1 8 bits in blocks of 32 (Q8_0). Each
weight block is dotted with them in 256-bit integer vectors (kernels/cpu/blocks.py), the block's float scales
applied to 8 int32 lanes, and one horizontal sum per row and token. From TILE8_MIN tokens on 8-bit input the
lanes are eight tokens instead (rows_dot_tiles, interleave8): a row's quants, written out once as bytes, are
broadcast to the tokens.
F32 / F16 / BF16: a chunk of 256 values is converted to float32 and dotted in float32 with the unquantized
activations, four tokens per pass.

One Zen 4 core, T = 1, G weights/s in L2 / streamed from DRAM, the scratch and float kernels before -> these
(NOTES.md): Q4_K 10.2 / 9.9 -> 23.0 / 21.4, Q8_0 7.4 / 7.1 -> 30.2 / 24.1, Q5_0 3.6 / 3.4 -> 20.9 / 20.1.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload, register_jitable

from dslocal.kernels.cpu.blocks import (BF16, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0,
                                        _block1, _block4, _d_end, _dm_end, _hsum, _q2_k_end, _q2_k_w, _q3_k_end,
                                        _q3_k_w, _q4_0_w, _q4_1_w, _q4_k_end, _q4_k_w, _q5_0_w, _q5_1_w, _q5_k_end,
                                        _q5_k_w, _q6_k_end, _q6_k_w, _q8_0_w, _prefetch, _zero,
                                        _block1_8, _q2_k_m8, _q2_k_u8, _q3_k_m8, _q3_k_u8, _q4_k_m8,
                                        _q4_k_u8, _q5_k_m8, _q5_k_u8, _q6_k_m8, _q6_k_u8, _block1_32,
                                        _q4_0_b, _q5_0_b, _q4_1_b, _q5_1_b, _q8_0_b, _dm32_end, _lane_f, _q2_k_t8,
                                        _q3_k_t8, _q4_k_t8, _q5_k_t8, _q6_k_t8, _tile8, _unpack8, _d32_t32, _dm32_t32,
                                        _tile8_32, _unpack32, _bits_f32)

i16, i32, u32, u64, f32 = np.int16, np.int32, np.uint32, np.uint64, np.float32
QB = 256          # activation values per float scale
GROUP = 16        # activation values per int32 sum
# Activations are rounded to 11-bit integers (|q| <= 1023), not 8-bit ones: the dot multiplies int16 by int16
# anyway, so the extra bits cost nothing, and they cut the rounding error of silu(g) * u (heavy-tailed, so
# its block maxima sit far from its typical values) about 65-fold. Every quant times its integer scale fits
# int16 (Q6_K: 63 * 128), a pmaddwd pair of those times 1023 and 16 of them per int32 lane fit int32, and a
# group sum (16 * 1023) fits int16 (blocks.py loads xs as int16 lanes).
XMAX = 1023
# A K-quant's input may also go in 8 bits (|q| <= 127, llama.cpp's Q8_K): the K-quants then multiply bytes
# (pmaddubsw), single tokens and tiles of four alike: fewer instructions per weight. moe.py does this for
# every K-quant projection (GATE_UP_8BIT, DOWN_8BIT): the 8-bit rounding of h is ~100x below the weights' own.
XMAX8 = 127
BYTE_DOT = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)   # the types that can take x in 8 bits
# Q4_0 / Q5_0 / Q4_1 / Q5_1 take x in 8 bits with a scale per 32 values (quantize_row32, llama.cpp's Q8_0),
# where a block's quants as unsigned bytes and x meet in one vpdpbusd: 12 instructions per Q5_0 block at one
# token, loads included, against the int16 path's 18 (NOTES.md). A layer's NSE against the float reference is
# then 1.1-1.9e-4 (11 bits: ~1e-5; the K-quants' 8 bits in blocks of 256: 2.4-5.4e-4), against Q5_0's own ~2e-3.
BYTE_DOT32 = (Q4_0, Q5_0, Q4_1, Q5_1)
# The types with tiles of eight (rows_dot_tiles): those on 8-bit input, and Q8_0, whose rows take x in 11 bits
# but whose tiles take it in 8 bits per 32 values (quantize_row32), its quants + 128 as unsigned bytes: the
# int16 tiles of four ran V3's layer of 512 tokens only 2.2-2.5x faster per token than 64 calls of 8.
TILED = BYTE_DOT + BYTE_DOT32 + (Q8_0,)
ROW_BLOCK = 32     # rows per pass of a tile of four tokens: 36 KB of Q4_K rows stay in L2, the tile's activations
                   # (16 KB at 2048 values) in L1; rows outer, tokens inner read every token from L2 for every row
# One-token rows shorter than PREFETCH_MAX_ROW_BYTES ask for the row PREFETCH_ROWS ahead while they compute.
# On the GPU box, decoding the V2-Lite-shaped file (rows of 2048 values, ~1.1 KB in Q4_K; experts read from
# the file's 4 KB pages, where the hardware prefetcher stops at each page end) went 36-38 -> 41-43 tokens/s;
# V3's 7168-value rows (4 KB in Q4_K) were ~18% slower with it: long rows are read in four streams instead
# (_rows_one), which shorter ones were not faster with (kernels/cpu/NOTES.md).
PREFETCH_ROWS = 2
PREFETCH_MAX_ROW_BYTES = 2048
# A call on 8-bit activations (K-quants, BYTE_DOT32) with this many tokens or more takes tiles of eight
# (_rows_tiles): four tokens in eight lanes cost about what the tiles of four they replaced did (one core, NOTES.md).
TILE8_MIN = 4


def activation_shapes(n: int, d: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Shapes of x16, xd, xs for n activation rows of d values."""
    return (n, d), (n, -(-d // QB)), (n, d // GROUP)


def activation_shapes32(n: int, d: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Shapes of x8, xd, xo for n activation rows of d values in blocks of 32 (quantize_row32)."""
    return (n, d), (n, d // 32), (n, d // 4)


@njit(inline="always")
def _amax(xi, t, o, n):
    """The largest magnitude among x[t, o:o + n] from xi, x's bits as int32, or inf where one of them is an inf
    or a NaN. With the sign bit cleared, the bit patterns of floats order as their magnitudes, and a NaN's lie
    above an infinity's: one integer max, which the compiler vectorises, where a float max and a sum that
    caught NaNs (float reductions it may not reorder) went one value at a time (kernels/cpu/NOTES.md)."""
    m = i32(0)
    for l in range(n):
        m = max(m, xi[t, o + l] & i32(0x7FFFFFFF))
    return _bits_f32(min(m, i32(0x7F800000)))


@njit(cache=True, nogil=True)
def quantize_row(x, t, x16, xd, xs, qmax=XMAX):
    """Row t of x (N, D) f32 -> x16[t] (D,) integers of at most qmax (XMAX in int16, or XMAX8 in an
    int8 x16), xd[t] (ceil(D/256),) scales, xs[t] (D//16,) int32 group sums. Round to nearest; a
    non-finite block gets a NaN scale."""
    for c in range(xd.shape[1]):
        quantize_block(x, t, c, x16, xd, xs, qmax)


@njit(inline="always")
def quantize_block(x, t, c, x16, xd, xs, qmax):
    """quantize_row's block c of row t alone: values QB c .. QB c + QB - 1 (fewer in a last block) and their
    group sums."""
    D, xi, o = x.shape[1], x.view(np.int32), QB * c
    n = min(QB, D - o)
    amax = _amax(xi, t, o, n)
    if not amax < np.inf:   # let a non-finite value reach the output, not an int overflow
        xd[t, c] = np.nan
        for l in range(n):
            x16[t, o + l] = 0
    else:
        d = amax / f32(qmax)
        inv = f32(1) / d if amax > 0 else f32(0)
        xd[t, c] = d
        for l in range(n):
            x16[t, o + l] = np.rint(x[t, o + l] * inv)
    for g in range(o // GROUP, min((o + QB) // GROUP, xs.shape[1])):
        s = i32(0)
        for l in range(GROUP):
            s = i32(s + x16[t, GROUP * g + l])
        xs[t, g] = s


@njit(inline="always")
def in_blocks_of_32(x8, xd):
    """Whether 8-bit activations x8 with scales xd are in blocks of 32 (quantize_row32), not of 256."""
    return xd.shape[1] * 32 == x8.shape[1]


@njit(cache=True, nogil=True)
def quantize_row32(x, t, x8, xd, xo):
    """Row t of x (N, D) f32 -> x8[t] (D,) int8 in blocks of 32 values, each with its own scale xd[t, b]
    (llama.cpp's Q8_0 activations), and xo[t, 8b:8b + 8] = (-16 * block b's sum of x8, 0, .., 0), the int32
    lanes a BYTE_DOT32 block's dot starts from or scales its min by (blocks.py `_block1_32`). D: a multiple of
    32. Round to nearest; a non-finite block gets a NaN scale."""
    for c in range(xd.shape[1]):
        quantize_block32(x, t, c, x8, xd, xo)


@njit(inline="always")
def quantize_block32(x, t, c, x8, xd, xo):
    """quantize_row32's block c of row t alone (values 32 c .. 32 c + 31)."""
    o = 32 * c
    amax = _amax(x.view(np.int32), t, o, 32)
    for l in range(8):
        xo[t, 8 * c + l] = 0
    if not amax < np.inf:
        xd[t, c] = np.nan
        for l in range(32):
            x8[t, o + l] = 0
        return
    d = amax / f32(XMAX8)
    inv = f32(1) / d if amax > 0 else f32(0)
    xd[t, c] = d
    total = i32(0)
    for l in range(32):
        q = i32(np.rint(x[t, o + l] * inv))
        x8[t, o + l] = q
        total += q
    xo[t, 8 * c] = -16 * total


def rows_dot(t, w, e, r0, r1, src, n_src, x16, xd, xs, xf, res, x8q):
    """res[i, r - r0] = row r of expert e (of GGML type t) . activation row src[i], i < n_src, r0 <= r < r1.

    w: uint8 (E, R, row_bytes) raw GGUF blocks; src: int64 (>= n_src,) rows of x16 / xd / xs / xf;
    x16 int16 (N, D), xd f32 (N, ceil(D/256)), xs int32 (N, D/16), xf f32 (N, D); res f32 (>= n_src, >= r1-r0).
    x8q: (x8 int8 (N, D), its xd, its xs) of the same rows in 8 bits (quantize_row with XMAX8), which
    the BYTE_DOT types then use instead of x16, or arrays of no rows; the BYTE_DOT32 types use it when it
    is in blocks of 32 (quantize_row32: xd (N, D // 32), xo in place of xs), else x16. One compiled kernel
    per type.

    In compiled code t must be a compile-time constant: a compiled caller takes it as an argument and calls
    numba.literally(t) first (moe.py, linear.py), and is then compiled once per type it meets. Only the
    kernels of the types a model has compile: all thirteen took ~96 s of a cold `dslocal run` on two cores.
    """
    _impl(_KERNELS[int(t)])(t, w, e, r0, r1, src, n_src, x16, xd, xs, xf, res, x8q)


@overload(rows_dot)
def _rows_dot_typed(t, w, e, r0, r1, src, n_src, x16, xd, xs, xf, res, x8q):
    if isinstance(t, types.IntegerLiteral):   # else no match: a typing error names rows_dot
        return _impl(_KERNELS[t.literal_value])


def _impl(kernel):
    """rows_dot for one type's kernel, passing the arguments that kernel takes (called from Python as it is,
    compiled into a caller through the overload)."""
    if kernel in _FLOAT_KERNELS:
        def impl(t, w, e, r0, r1, src, n_src, x16, xd, xs, xf, res, x8q):
            kernel(w, e, r0, r1, src, n_src, xf, res)
    elif kernel in _BYTE_KERNELS:
        def impl(t, w, e, r0, r1, src, n_src, x16, xd, xs, xf, res, x8q):
            kernel(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q)
    else:
        def impl(t, w, e, r0, r1, src, n_src, x16, xd, xs, xf, res, x8q):
            kernel(w, e, r0, r1, src, n_src, x16, xd, xs, res)
    return impl


@njit(inline="always")
def _rows(chunk, end, n_bytes, n_values, w, e, r0, r1, src, n_src, x16, xd, xs, res):
    """res[i, r - r0] = row r . activation row src[i] on int16 activations (blocks.py `_block1` / `_block4`)."""
    _rows_streamed(_block1, _block4, chunk, end, n_values // 16, n_bytes, n_values, QB, w, e, r0, r1, src, n_src,
                   x16, xd, xs, res)


@njit(inline="always")
def _rows8(u8, m8, end, tiles, n_bytes, w, e, r0, r1, src, n_src, x8, xd, xs, res):
    """The same for a K-quant on activations in 8 bits (_rows_bytes with blocks.py `_block1_8`)."""
    _rows_bytes(_block1_8, u8, end, m8, tiles, n_bytes, 256, QB, w, e, r0, r1, src, n_src, x8, xd, xs, res)


@njit(inline="always")
def _rows_bytes(block1, f, end, g, tiles, n_bytes, n_values, per, w, e, r0, r1, src, n_src, x8, xd, xs, res):
    """A type's rows on 8-bit activations (a scale per `per` values): TILE8_MIN tokens or more interleaved here
    and dotted in tiles of eight (tiles: the type's compiled `_tiles_<type>`), fewer one at a time with
    block1(f, end, g, ..), a single token's long rows in streams."""
    if n_src >= TILE8_MIN:
        xt, xk, xdt = tile_buffers((n_src + 7) // 8, x8.shape[1], per)
        interleave8(x8, xd, xs, src, 0, n_src, xt, xk, xdt, 0)
        tiles(w, e, r0, r1, xt, xk, xdt, 0, n_src, res)
    elif n_src == 1 and w.shape[2] >= PREFETCH_MAX_ROW_BYTES:
        _rows_one(block1, f, end, g, n_bytes, n_values, per, w, e, r0, r1, src[0], x8, xd, xs, res)
    else:
        _rows_each(block1, f, end, g, n_bytes, n_values, per, w, e, r0, r1, r0, r1, 0, src, n_src, x8, xd, xs, res)


@register_jitable
def tile_shapes(n_tiles: int, d: int, per: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Shapes of xt (int32), xk (int32), xdt (f32) (see interleave8) for n_tiles tiles of eight activation rows
    of d values with a scale per `per` values (QB, or 32 for quantize_row32's form)."""
    return (n_tiles, 2 * d), (n_tiles, d // 4), (n_tiles, -(-d // per) * 8)


@njit(cache=True, nogil=True)
def tile_buffers(n_tiles, d, per):
    """Empty xt, xk, xdt of tile_shapes(n_tiles, d, per), for compiled callers."""
    st, sk, sd = tile_shapes(n_tiles, d, per)
    return np.empty(st, np.int32), np.empty(sk, np.int32), np.empty(sd, np.float32)


@njit(cache=True, nogil=True)
def interleave8(x8, xd, xs, src, i0, n_src, xt, xk, xdt, k0):
    """Activation rows src[i0:i0 + n_src] in 8 bits as tiles k0, k0 + 1, .. of eight, the lanes being the
    tokens (blocks.py `_tile8`): xt[k] int32 [8 g + t], token t's values 4g .. 4g + 3; xdt[k] f32 [8 b + t],
    its block scales; xk[k] int32 [8 q + t]: in blocks of 256 (quantize_row with XMAX8) its 16-value sums
    2q and 2q + 1 as two int16, in blocks of 32 (quantize_row32) block q's -16 * sum of x8 (xs: its offset
    lanes). The lanes of a last tile's missing tokens are zeros (their results are never read, but stale
    floats there could be subnormals, which cost the multiply-adds of every lane)."""
    D, by32 = x8.shape[1], in_blocks_of_32(x8, xd)
    x32 = x8.view(np.int32)
    for i in range(n_src):
        s, k, t = src[i0 + i], k0 + i // 8, i % 8
        for g in range(D // 4):
            xt[k, 8 * g + t] = x32[s, g]
        for q in range(D // 32):
            xk[k, 8 * q + t] = xs[s, 8 * q] if by32 else (xs[s, 2 * q] & 0xFFFF) | (xs[s, 2 * q + 1] << 16)
        for b in range(xd.shape[1]):
            xdt[k, 8 * b + t] = xd[s, b]
    k = k0 + (n_src - 1) // 8
    for t in range((n_src - 1) % 8 + 1, 8):
        for g in range(D // 4):
            xt[k, 8 * g + t] = 0
        for q in range(D // 32):
            xk[k, 8 * q + t] = 0
        for b in range(xd.shape[1]):
            xdt[k, 8 * b + t] = 0


def rows_dot_tiles(t, w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    """res[i, r - r0] = row r of expert e (GGML type t: one of TILED) . activation row i of tiles
    k0, k0 + 1, .. (interleave8), i < n_src: rows_dot's tiles of eight, on tokens interleaved once by the
    caller (moe.py interleaves a layer's inputs once per call, where rows_dot would at each of its calls). As
    in rows_dot, t must be a compile-time constant in compiled code."""
    _TILE_KERNELS[int(t)](w, e, r0, r1, xt, xk, xdt, k0, n_src, res)


@overload(rows_dot_tiles)
def _rows_dot_tiles_typed(t, w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    if isinstance(t, types.IntegerLiteral) and t.literal_value in _TILE_KERNELS:   # else a typing error
        kernel = _TILE_KERNELS[t.literal_value]

        def impl(t, w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
            kernel(w, e, r0, r1, xt, xk, xdt, k0, n_src, res)
        return impl


@njit(inline="always")
def _rows_tiles(unpack, tile, f, g, h, n_bytes, n_values, w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    """res[i, r - r0] = row r . token i of tiles k0 .. (interleave8), eight tokens per vector: four rows at a
    time are written out as bytes and scales (unpack(f, g, h, ..): blocks.py `_unpack8` for the K-quants,
    `_unpack32` for the 32-value types) and dotted with every tile (tile(h, ..): `_tile8`, `_tile8_32`).
    One core, K-quant rows in L2: 2-3x the multiply-adds per second of the tiles of four they replaced; four
    rows per pass made V3's T = 512 layers 1.1-1.3x faster than two (kernels/cpu/NOTES.md)."""
    R, row_bytes = w.shape[1], w.shape[2]
    nb = row_bytes // n_bytes
    q, s = np.empty((4, n_values * nb), np.uint8), np.empty((4, 16 * nb), np.float32)
    kk, m = np.empty((4, 8 * nb), np.int32), np.empty((4, nb), np.float32)
    qs, ss = (q[0], q[1], q[2], q[3]), (s[0], s[1], s[2], s[3])
    ks, ms = (kk[0], kk[1], kk[2], kk[3]), (m[0], m[1], m[2], m[3])
    for ra in range(r0, r1, 4):
        # a last pass of fewer than four rows does its last row again
        rb, rc, rd = min(ra + 1, r1 - 1), min(ra + 2, r1 - 1), min(ra + 3, r1 - 1)
        for j, r in enumerate((ra, rb, rc, rd)):
            p = (e * R + r) * row_bytes
            for blk in range(nb):
                unpack(f, g, h, w, p + n_bytes * blk, blk, q[j], s[j], kk[j], m[j])
        for i in range(0, n_src, 8):
            k = k0 + i // 8
            acc = (_zero(), _zero(), _zero(), _zero())
            for blk in range(nb):
                acc = tile(h, acc, qs, ss, ks, ms, blk, xt[k], xk[k], xdt[k])
            a0, a1, a2, a3 = acc
            for t in range(min(8, n_src - i)):
                res[i + t, ra - r0], res[i + t, rb - r0] = _lane_f(a0, t), _lane_f(a1, t)
                res[i + t, rc - r0], res[i + t, rd - r0] = _lane_f(a2, t), _lane_f(a3, t)


@njit(inline="always")
def _rows_streamed(block1, block4, f, end, g, n_bytes, n_values, per, w, e, r0, r1, src, n_src, x, xd, xs, res):
    """_rows_by, except that a single token (a decode step) on rows of PREFETCH_MAX_ROW_BYTES or more reads
    them in streams (_rows_one)."""
    if n_src == 1 and w.shape[2] >= PREFETCH_MAX_ROW_BYTES:
        _rows_one(block1, f, end, g, n_bytes, n_values, per, w, e, r0, r1, src[0], x, xd, xs, res)
    else:
        _rows_by(block1, block4, f, end, g, n_bytes, n_values, per, w, e, r0, r1, src, n_src, x, xd, xs, res)


@njit(inline="always")
def _rows_by(block1, block4, f, end, g, n_bytes, n_values, per, w, e, r0, r1, src, n_src, x, xd, xs, res):
    """res[i, r - r0] = row r . activation row src[i], one block at a time: block4(f, end, g, ...) for four
    tokens, block1(f, end, g, ...) for one (the drivers of kernels/cpu/blocks.py with a type's functions).
    Tokens loop inside rows: the row stays in L1 while the activations (4 KB per token per 2048 values) come
    from L2. Four tokens at a time share each unpacked block; the rest go one by one, even and odd blocks
    into two float accumulators: K-quants 5-20 % faster on one Zen 4 core than with one (NOTES.md).
    _rows goes through _rows_streamed, which reads a single token's long rows in streams instead; a K-quant's
    int16 path (moe.py uses it only with GATE_UP_8BIT / DOWN_8BIT off) comes here directly; the 8-bit paths
    (_rows_bytes) take tiles of eight instead."""
    R, row_bytes = w.shape[1], w.shape[2]
    n_blocks, per_scale = row_bytes // n_bytes, u64(per // n_values)
    for b0 in range(r0, r1, ROW_BLOCK):
        b1 = min(b0 + ROW_BLOCK, r1)
        i = 0
        while i + 4 <= n_src:
            s0, s1, s2, s3 = src[i], src[i + 1], src[i + 2], src[i + 3]
            for r in range(b0, b1):
                p = (e * R + r) * row_bytes
                acc0, acc1, acc2, acc3 = _zero(), _zero(), _zero(), _zero()
                for j in range(n_blocks):   # unsigned j: the scale's index is a shift, no sign fix-ups
                    c = u64(j) // per_scale
                    acc0, acc1, acc2, acc3 = block4(f, end, g, acc0, acc1, acc2, acc3, w, p + n_bytes * j, x, xs,
                                                    s0, s1, s2, s3, n_values * j, xd[s0, c], xd[s1, c], xd[s2, c],
                                                    xd[s3, c])
                res[i, r - r0], res[i + 1, r - r0] = _hsum(acc0), _hsum(acc1)
                res[i + 2, r - r0], res[i + 3, r - r0] = _hsum(acc2), _hsum(acc3)
            i += 4
        _rows_each(block1, f, end, g, n_bytes, n_values, per, w, e, r0, r1, b0, b1, n_src - n_src % 4, src, n_src,
                   x, xd, xs, res)


@njit(inline="always")
def _rows_each(block1, f, end, g, n_bytes, n_values, per, w, e, r0, r1, b0, b1, i0, src, n_src, x, xd, xs, res):
    """res[i, r - r0] = row r . activation row src[i] for rows b0 <= r < b1 (of the call's r0 .. r1) and tokens
    i0 <= i < n_src one at a time, even and odd blocks into two float accumulators; short rows ask for the
    row PREFETCH_ROWS ahead."""
    R, row_bytes = w.shape[1], w.shape[2]
    n_blocks, per_scale = row_bytes // n_bytes, u64(per // n_values)
    for r in range(b0, b1):
        p = (e * R + r) * row_bytes
        if n_src > i0 and row_bytes < PREFETCH_MAX_ROW_BYTES:
            for k in range(0, row_bytes, 64):
                _prefetch(w, p + PREFETCH_ROWS * row_bytes + k)
        for i in range(i0, n_src):
            s = src[i]
            acc0, acc1 = _zero(), _zero()
            for j in range(0, n_blocks - 1, 2):
                acc0 = block1(f, end, g, acc0, w, p + n_bytes * j, x, xs, s, n_values * j,
                              xd[s, u64(j) // per_scale])
                acc1 = block1(f, end, g, acc1, w, p + n_bytes * (j + 1), x, xs, s, n_values * (j + 1),
                              xd[s, u64(j + 1) // per_scale])
            if n_blocks % 2:
                j = n_blocks - 1
                acc0 = block1(f, end, g, acc0, w, p + n_bytes * j, x, xs, s, n_values * j,
                              xd[s, u64(j) // per_scale])
            res[i, r - r0] = _hsum(acc0) + _hsum(acc1)


@njit(inline="always")
def _rows_one(block1, f, end, g, n_bytes, n_values, per, w, e, r0, r1, s, x, xd, xs, res):
    """res[0, r - r0] = row r . activation row s for one token (a decode step) on rows of PREFETCH_MAX_ROW_BYTES
    or more, four rows per pass from four places a quarter of the range apart: four streams of row bytes keep
    more reads from DRAM in flight than one (V3's gate and up, Q8_0 rows of 2048 values). The last n % 4 rows
    take one more pass, a row repeated where fewer are left: one loop keeps block1 inlined four times, and so
    the first-use compile short. Every row is one chain of blocks in order in its own accumulator, so its bits
    do not depend on how the rows are cut."""
    R, row_bytes = w.shape[1], w.shape[2]
    n_blocks, per_scale = row_bytes // n_bytes, u64(per // n_values)
    n = r1 - r0
    q = n // 4
    for i in range(q + (1 if n % 4 else 0)):
        if i < q:
            ra = r0 + i
            rb, rc, rd = ra + q, ra + 2 * q, ra + 3 * q
        else:                       # the rows left over
            ra = r0 + 4 * q
            rb, rc, rd = min(ra + 1, r1 - 1), min(ra + 2, r1 - 1), min(ra + 3, r1 - 1)
        pa, pb = (e * R + ra) * row_bytes, (e * R + rb) * row_bytes
        pc, pd = (e * R + rc) * row_bytes, (e * R + rd) * row_bytes
        acc_a, acc_b, acc_c, acc_d = _zero(), _zero(), _zero(), _zero()
        for j in range(n_blocks):
            d, o, v = xd[s, u64(j) // per_scale], n_bytes * j, n_values * j
            acc_a = block1(f, end, g, acc_a, w, pa + o, x, xs, s, v, d)
            acc_b = block1(f, end, g, acc_b, w, pb + o, x, xs, s, v, d)
            acc_c = block1(f, end, g, acc_c, w, pc + o, x, xs, s, v, d)
            acc_d = block1(f, end, g, acc_d, w, pd + o, x, xs, s, v, d)
        res[0, ra - r0], res[0, rb - r0] = _hsum(acc_a), _hsum(acc_b)
        res[0, rc - r0], res[0, rd - r0] = _hsum(acc_c), _hsum(acc_d)


@njit(inline="always")
def _rows_k(chunk, end, u8, m8, tiles, n_bytes, w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    """A K-quant's rows on x in 8 bits when x8q has rows, else on the int16 path."""
    x8, xd8, xs8 = x8q
    if x8.shape[0]:
        _rows8(u8, m8, end, tiles, n_bytes, w, e, r0, r1, src, n_src, x8, xd8, xs8, res)
    else:
        _rows_by(_block1, _block4, chunk, end, 16, n_bytes, 256, QB, w, e, r0, r1, src, n_src, x16, xd, xs, res)


# tiles of eight, compiled once per type for rows_dot and rows_dot_tiles
@njit(cache=True, nogil=True)
def _tiles_q4_k(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack8, _tile8, _q4_k_u8, _q4_k_t8, 8, 144, 256, w, e, r0, r1, xt, xk, xdt, k0, n_src,
                res)


@njit(cache=True, nogil=True)
def _tiles_q5_k(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack8, _tile8, _q5_k_u8, _q5_k_t8, 8, 176, 256, w, e, r0, r1, xt, xk, xdt, k0, n_src,
                res)


@njit(cache=True, nogil=True)
def _tiles_q6_k(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack8, _tile8, _q6_k_u8, _q6_k_t8, 16, 210, 256, w, e, r0, r1, xt, xk, xdt, k0, n_src,
                res)


@njit(cache=True, nogil=True)
def _tiles_q2_k(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack8, _tile8, _q2_k_u8, _q2_k_t8, 16, 84, 256, w, e, r0, r1, xt, xk, xdt, k0, n_src,
                res)


@njit(cache=True, nogil=True)
def _tiles_q3_k(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack8, _tile8, _q3_k_u8, _q3_k_t8, 16, 110, 256, w, e, r0, r1, xt, xk, xdt, k0, n_src,
                res)


@njit(cache=True, nogil=True)
def _rows_q4_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_k(_q4_k_w, _q4_k_end, _q4_k_u8, _q4_k_m8, _tiles_q4_k, 144, w, e, r0, r1, src, n_src, x16, xd, xs, res,
            x8q)


@njit(cache=True, nogil=True)
def _rows_q5_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_k(_q5_k_w, _q5_k_end, _q5_k_u8, _q5_k_m8, _tiles_q5_k, 176, w, e, r0, r1, src, n_src, x16, xd, xs, res,
            x8q)


@njit(cache=True, nogil=True)
def _rows_q6_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_k(_q6_k_w, _q6_k_end, _q6_k_u8, _q6_k_m8, _tiles_q6_k, 210, w, e, r0, r1, src, n_src, x16, xd, xs, res,
            x8q)


@njit(cache=True, nogil=True)
def _rows_q2_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_k(_q2_k_w, _q2_k_end, _q2_k_u8, _q2_k_m8, _tiles_q2_k, 84, w, e, r0, r1, src, n_src, x16, xd, xs, res,
            x8q)


@njit(cache=True, nogil=True)
def _rows_q3_k(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_k(_q3_k_w, _q3_k_end, _q3_k_u8, _q3_k_m8, _tiles_q3_k, 110, w, e, r0, r1, src, n_src, x16, xd, xs, res,
            x8q)


@njit(cache=True, nogil=True)
def _rows_q8_0(w, e, r0, r1, src, n_src, x16, xd, xs, res):
    _rows(_q8_0_w, _d_end, 34, 32, w, e, r0, r1, src, n_src, x16, xd, xs, res)


@njit(cache=True, nogil=True)
def _tiles_q8_0(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack32, _tile8_32, _q8_0_b, _d32_t32, 128, 34, 32, w, e, r0, r1, xt, xk, xdt, k0, n_src, res)


@njit(cache=True, nogil=True)
def _tiles_q4_0(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack32, _tile8_32, _q4_0_b, _d32_t32, 8, 18, 32, w, e, r0, r1, xt, xk, xdt, k0, n_src, res)


@njit(cache=True, nogil=True)
def _tiles_q5_0(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack32, _tile8_32, _q5_0_b, _d32_t32, 16, 22, 32, w, e, r0, r1, xt, xk, xdt, k0, n_src, res)


@njit(cache=True, nogil=True)
def _tiles_q4_1(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack32, _tile8_32, _q4_1_b, _dm32_t32, 0, 20, 32, w, e, r0, r1, xt, xk, xdt, k0, n_src, res)


@njit(cache=True, nogil=True)
def _tiles_q5_1(w, e, r0, r1, xt, xk, xdt, k0, n_src, res):
    _rows_tiles(_unpack32, _tile8_32, _q5_1_b, _dm32_t32, 0, 24, 32, w, e, r0, r1, xt, xk, xdt, k0, n_src, res)


@njit(inline="always")
def _rows_32(chunk, b8, end, end8, zero, tiles, n_bytes, w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    """A 32-value type's rows on x in 8 bits when x8q holds it in blocks of 32 (quantize_row32: _rows_bytes
    with blocks.py `_block1_32`), else on x16."""
    x8, xd8, xo8 = x8q
    if x8.shape[0] and in_blocks_of_32(x8, xd8):
        _rows_bytes(_block1_32, b8, end8, zero, tiles, n_bytes, 32, 32, w, e, r0, r1, src, n_src, x8, xd8, xo8, res)
    else:
        _rows(chunk, end, n_bytes, 32, w, e, r0, r1, src, n_src, x16, xd, xs, res)


@njit(cache=True, nogil=True)
def _rows_q4_0(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_32(_q4_0_w, _q4_0_b, _d_end, _d_end, 8, _tiles_q4_0, 18, w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q)


@njit(cache=True, nogil=True)
def _rows_q4_1(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_32(_q4_1_w, _q4_1_b, _dm_end, _dm32_end, 0, _tiles_q4_1, 20, w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q)


@njit(cache=True, nogil=True)
def _rows_q5_0(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_32(_q5_0_w, _q5_0_b, _d_end, _d_end, 16, _tiles_q5_0, 22, w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q)


@njit(cache=True, nogil=True)
def _rows_q5_1(w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q):
    _rows_32(_q5_1_w, _q5_1_b, _dm_end, _dm32_end, 0, _tiles_q5_1, 24, w, e, r0, r1, src, n_src, x16, xd, xs, res, x8q)


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
def _clear(res, n_src, j):
    for i in range(n_src):
        res[i, j] = 0


# F32 / F16 / BF16: values 256c .. 256c + n - 1 of row r into a float32 scratch (wb: its uint32 view, the
# values are assembled from bits), dotted with the unquantized activations; fastmath's reassociation lets LLVM
# keep 16-lane partial sums.
FAST = {"reassoc", "contract"}


@njit(inline="always")
def _byte(w, e, r, i):
    """Byte i of row r of expert e as int32 (unsigned index: no negative-index wraparound code in the loops)."""
    return i32(w[e, r, u64(i)])


@njit(inline="always")
def _u32le(w, e, r, o):
    return (u32(_byte(w, e, r, o)) | (u32(_byte(w, e, r, o + 1)) << 8) |
            (u32(_byte(w, e, r, o + 2)) << 16) | (u32(_byte(w, e, r, o + 3)) << 24))


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


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_bf16(w, e, r0, r1, src, n_src, xf, res):
    n_vals, wb = w.shape[2] // 2, np.empty(QB, np.uint32)
    wf = wb.view(np.float32)
    for r in range(r0, r1):
        _clear(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_bf16(w, e, r, c, n, wb)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_f16(w, e, r0, r1, src, n_src, xf, res):
    n_vals, wb = w.shape[2] // 2, np.empty(QB, np.uint32)
    wf = wb.view(np.float32)
    for r in range(r0, r1):
        _clear(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_f16(w, e, r, c, n, wb, wf)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows_f32(w, e, r0, r1, src, n_src, xf, res):
    n_vals, wb = w.shape[2] // 4, np.empty(QB, np.uint32)
    wf = wb.view(np.float32)
    for r in range(r0, r1):
        _clear(res, n_src, r - r0)
        for c in range((n_vals + QB - 1) // QB):
            n = min(QB, n_vals - QB * c)
            _unpack_f32(w, e, r, c, n, wb)
            _dot_f(c, n, wf, src, n_src, xf, res, r - r0)


_BYTE_KERNELS = (_rows_q4_k, _rows_q5_k, _rows_q6_k, _rows_q2_k, _rows_q3_k, _rows_q4_0, _rows_q5_0, _rows_q4_1,
                 _rows_q5_1)
_FLOAT_KERNELS = (_rows_bf16, _rows_f16, _rows_f32)
_TILE_KERNELS = {Q4_K: _tiles_q4_k, Q5_K: _tiles_q5_k, Q6_K: _tiles_q6_k, Q2_K: _tiles_q2_k, Q3_K: _tiles_q3_k,
                 Q8_0: _tiles_q8_0, Q4_0: _tiles_q4_0, Q5_0: _tiles_q5_0, Q4_1: _tiles_q4_1, Q5_1: _tiles_q5_1}
_KERNELS = {Q4_K: _rows_q4_k, Q5_K: _rows_q5_k, Q6_K: _rows_q6_k, Q2_K: _rows_q2_k, Q3_K: _rows_q3_k,
            Q8_0: _rows_q8_0, Q4_0: _rows_q4_0, Q4_1: _rows_q4_1, Q5_0: _rows_q5_0, Q5_1: _rows_q5_1,
            BF16: _rows_bf16, F16: _rows_f16, F32: _rows_f32}
