"""The routed experts of one MoE layer on the CPU, in one compiled, GIL-free call (Numba).

Letters: T tokens, D hidden, K experts per token, E experts, F expert ffn, P = T * K (token, expert) pairs.

One call does, with the pairs grouped by expert and experts without tokens skipped:
  1. quantize x to integers, blocks of 256 (cpu/rows.py: 8 bits     parallel over tokens (a few: serial)
     for K-quant weights, 11 for the others)
  2. h = silu(gate x) * up x for every pair                         parallel over row ranges of F
  3. quantize h (as x, for the down projection's type)              parallel over pairs, or for calls of few
                                                                    pairs inside step 2 (below)
  4. out[t] = sum_k w * down h                                      parallel over row ranges of D
In calls of up to H_IN_STEP2_PAIRS pairs (a decode step's one token) step 3 has no parallel step of its
own: h's columns fall into units of whole quantization blocks, and the thread whose chunk completes a unit
quantizes it for every pair; steps 2 and 4 then share one parallel region (ONE_REGION), one fork / join per
call instead of three (the layer 1.04-1.06x for V2-Lite at one token, kernels/cpu/NOTES.md).
Where an expert has rows.TILE8_MIN pairs or more and its projections have tiles (rows.TILED: those on 8-bit
input, and Q8_0, whose tiles take its input in 8 bits beside the 11 of its rows), steps 1 and 3 also
interleave its inputs into tiles of eight tokens (rows.py interleave8), once per call, which steps 2 and 4 dot
(rows.py rows_dot_tiles).
Experts with gemm.GEMM_MIN_TOKENS tokens or more (a prompt's) can instead be dequantized to bf16 and
multiplied by torch (kernels/cpu/gemm.py, where the CPU has AMX); LayerCall splits the pairs between the two.
Steps 2 and 4 cut the weight rows into chunks that the threads claim from a shared counter until none is
left, each chunk the same rows of every active expert: it reads the same bytes whatever the routing, and
in step 4 it owns its output rows, so the sum over experts needs no second pass. The first chunks (one
per thread) hold FIRST_SHARE % of the rows, long streams for the prefetchers; the rest come in
SMALL_CHUNKS small chunks per thread, so that a thread that runs behind takes fewer of them. Cores do not
run at one speed (a hybrid desktop CPU's efficiency cores least of all): on the 16-core GPU box, with one
fixed range each, the slowest thread of a layer step took 1.3-1.9x as long as the fastest, and a step
waits for its slowest thread. Against fixed ranges, same run (kernels/cpu/NOTES.md): V2-Lite T = 1
1.00-1.10x, V3 T = 1 1.13x, T = 8 1.16x, T = 512 1.20x; all chunks small (8 per thread) was up to 8 %
slower than fixed ranges for V2-Lite Q4_K at T = 1. Between steps the threads meet at the end of a
prange: 7.7 us each with Numba's OpenMP layer on the GPU box; its workqueue layer took ~50 us per prange
on a 2-core machine. OpenMP threads spin while they wait, so give the layer no more threads than there
are cores left free by the caller's own threads.
"""
from __future__ import annotations

import sys
import time

import llvmlite.binding as llb
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from dslocal.kernels.cpu import gemm
from dslocal.kernels.cpu.rows import (BYTE_DOT, BYTE_DOT32, QB, TILE8_MIN, TILED, XMAX, XMAX8, activation_shapes,
                                      activation_shapes32, in_blocks_of_32, interleave8, quantize_block,
                                      quantize_block32, rows_dot, rows_dot_tiles, tile_shapes)
from dslocal.kernels.experts import ExpertTensors
from dslocal.quant.ggml import GGMLType

f32 = np.float32
TOKEN_BLOCK = 64     # pairs per pass over a weight tile: their int16 activations stay in L2 while it is read
GATE_UP_8BIT = True  # K-quant gate / up projections on 8-bit activations (rows.py, XMAX8)
DOWN_8BIT = True     # K-quant down projections too (their input, silu(g) * u, is heavy-tailed: see LayerCall)
# Steps 2 and 4 hand out FIRST_SHARE % of the weight rows as one chunk per thread, then the rest as
# SMALL_CHUNKS chunks per thread (see the module's docstring); read at each call
FIRST_SHARE = 75
SMALL_CHUNKS = 4
SERIAL_QUANTIZE = 4  # calls of up to this many tokens quantize x in the calling thread (decode: one token)
# calls of up to this many (token, expert) pairs quantize h inside step 2 (see the docstring); read at each call
H_IN_STEP2_PAIRS = 64
# such calls also run steps 2 and 4 in one parallel region (one fork / join less); read at each call
ONE_REGION = True
SPINS = 1 << 20      # polls of its flag per compiled call of LayerCall.synced (~0.1-0.3 s), then Python looks again


@intrinsic
def _claim(typingctx, counter, i):
    """counter[i] += 1 as one atomic step; returns the value before (the chunk the caller now owns).
    Relaxed ordering is enough: the chunks' results are read only after the prange has ended."""
    if isinstance(counter, types.Array) and counter.dtype == types.int64 and counter.layout == "C":
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            at = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])
            return builder.atomic_rmw("add", at, ir.Constant(ir.IntType(64), 1), "monotonic")
        return types.int64(counter, i), codegen


@intrinsic
def _add_acq_rel(typingctx, counter, i, v):
    """counter[i] += v as one atomic step with acquire and release ordering; returns the value before. The
    thread whose add completes a count sees everything the other adders wrote before theirs."""
    if isinstance(counter, types.Array) and counter.dtype == types.int64 and counter.layout == "C":
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            at = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])
            return builder.atomic_rmw("add", at, context.cast(builder, args[2], sig.args[2], types.int64), "acq_rel")
        return types.int64(counter, i, v), codegen


@intrinsic
def _load_acquire(typingctx, a, i):
    """a[i] of an int64 array, read as an acquire load: a flag another thread or the GPU sets after writing
    the data it guards (a plain load in a loop may be read once and kept in a register)."""
    if isinstance(a, types.Array) and a.dtype == types.int64 and a.layout == "C":
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            at = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])
            return builder.load_atomic(at, "acquire", 8)
        return types.int64(a, i), codegen


@intrinsic
def _store_release(typingctx, a, i, v):
    """a[i] = v as a release store: everything written before it is seen by whoever reads the flag."""
    if isinstance(a, types.Array) and a.dtype == types.int64 and a.layout == "C":
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            at = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])
            builder.store_atomic(context.cast(builder, args[2], sig.args[2], types.int64), at, "release", 8)
            return context.get_dummy_value()
        return types.none(a, i, v), codegen


@intrinsic
def _pause(typingctx):
    """x86's pause, the spin-wait hint (a no-op elsewhere)."""
    def codegen(context, builder, sig, args):
        if llb.get_process_triple().startswith("x86_64"):
            builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                        "llvm.x86.sse2.pause"), [])
        return context.get_dummy_value()
    return types.none(), codegen


@njit(cache=True, nogil=True)
def _route(ids, wts, E):
    """Pairs grouped by expert: start (E+1,), pair_tok (P,), pair_w (P,) f32, active experts (n_active,).
    Pairs with a negative id (experts computed elsewhere, e.g. on the GPU) are left out: P counts the rest."""
    T, K = ids.shape
    start = np.zeros(E + 1, np.int64)
    for t in range(T):
        for k in range(K):
            if ids[t, k] >= 0:
                start[ids[t, k] + 1] += 1
    n_active = 0
    for e in range(E):
        n_active += start[e + 1] > 0
        start[e + 1] += start[e]
    fill = start[:E].copy()
    pair_tok = np.empty(start[E], np.int64)
    pair_w = np.empty(start[E], np.float32)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e < 0:
                continue
            pair_tok[fill[e]] = t
            pair_w[fill[e]] = wts[t, k]
            fill[e] += 1
    active = np.empty(n_active, np.int64)
    n_active = 0
    for e in range(E):
        if start[e + 1] > start[e]:
            active[n_active] = e
            n_active += 1
    return start, pair_tok, pair_w, active


@njit(inline="always")
def _chunk(c, n_threads, big, n_small, rows):
    """Rows r0:r1 of chunk c: chunks 0 .. n_threads - 1 split the first `big` rows, the n_small after them
    the rest (an empty first chunk where big is 0)."""
    if c < n_threads:
        return c * big // n_threads, (c + 1) * big // n_threads
    c -= n_threads
    return big + c * (rows - big) // n_small, big + (c + 1) * (rows - big) // n_small


def _rows_or_tiles(t, w, e, r0, r1, src, n, x16, xd, xs, x, res, x8q, tiles, k0):
    """rows.py rows_dot, or rows_dot_tiles on tiles k0, k0 + 1, .. (tiles: xt, xk, xdt) where k0 >= 0. In
    compiled code (t a compile-time constant) only the types that have tiles of eight get the second branch."""
    if k0 >= 0:
        rows_dot_tiles(t, w, e, r0, r1, *tiles, k0, n, res)
    else:
        rows_dot(t, w, e, r0, r1, src, n, x16, xd, xs, x, res, x8q)


@overload(_rows_or_tiles)
def _rows_or_tiles_typed(t, w, e, r0, r1, src, n, x16, xd, xs, x, res, x8q, tiles, k0):
    if not isinstance(t, types.IntegerLiteral):
        return None
    if t.literal_value in TILED:
        def impl(t, w, e, r0, r1, src, n, x16, xd, xs, x, res, x8q, tiles, k0):
            if k0 >= 0:
                rows_dot_tiles(t, w, e, r0, r1, tiles[0], tiles[1], tiles[2], k0, n, res)
            else:
                rows_dot(t, w, e, r0, r1, src, n, x16, xd, xs, x, res, x8q)
    else:
        def impl(t, w, e, r0, r1, src, n, x16, xd, xs, x, res, x8q, tiles, k0):
            rows_dot(t, w, e, r0, r1, src, n, x16, xd, xs, x, res, x8q)
    return impl


@njit(inline="always")
def _gate_up_rows(tg, tu, gate, up, f0, f1, active, start, pair_tok, x16, xd, xs, x, h, x8q, x_tiles, tile0):
    """h[p, f0:f1] = silu(gate_e[f0:f1] . x[t]) * (up_e[f0:f1] . x[t]) for every pair p = (t, e); an expert
    with tiles (_tile_starts) dotted with them."""
    n_rows = f1 - f0
    res_g = np.empty((TOKEN_BLOCK, n_rows), np.float32)
    res_u = np.empty((TOKEN_BLOCK, n_rows), np.float32)
    src = np.empty(TOKEN_BLOCK, np.int64)
    for e in active:
        for p0 in range(start[e], start[e + 1], TOKEN_BLOCK):
            n = min(TOKEN_BLOCK, start[e + 1] - p0)
            for i in range(n):
                src[i] = pair_tok[p0 + i]
            k0 = tile0[e] + (p0 - start[e]) // 8 if tile0[e + 1] > tile0[e] else -1
            _rows_or_tiles(tg, gate, e, f0, f1, src, n, x16, xd, xs, x, res_g, x8q, x_tiles, k0)
            _rows_or_tiles(tu, up, e, f0, f1, src, n, x16, xd, xs, x, res_u, x8q, x_tiles, k0)
            for i in range(n):
                for j in range(n_rows):
                    g = res_g[i, j]
                    h[p0 + i, f0 + j] = g / (f32(1) + np.exp(-g)) * res_u[i, j]


@njit(inline="always")
def _down_rows(td, down, d0, d1, active, start, pair_tok, pair_w, h16, hd, hs, h, out, h8q, h_tiles, tile0):
    """out[:, d0:d1] = sum over pairs (t, e) of w * down_e[d0:d1] . h[p]; an expert with tiles dotted with
    them."""
    n_rows = d1 - d0
    res = np.empty((TOKEN_BLOCK, n_rows), np.float32)
    src = np.empty(TOKEN_BLOCK, np.int64)
    for t in range(out.shape[0]):
        for j in range(d0, d1):
            out[t, j] = 0
    for e in active:
        for p0 in range(start[e], start[e + 1], TOKEN_BLOCK):
            n = min(TOKEN_BLOCK, start[e + 1] - p0)
            for i in range(n):
                src[i] = p0 + i
            k0 = tile0[e] + (p0 - start[e]) // 8 if tile0[e + 1] > tile0[e] else -1
            _rows_or_tiles(td, down, e, d0, d1, src, n, h16, hd, hs, h, res, h8q, h_tiles, k0)
            for i in range(n):
                t, wt = pair_tok[p0 + i], pair_w[p0 + i]
                for j in range(n_rows):
                    out[t, d0 + j] += wt * res[i, j]


@njit(inline="always")
def _quantize_x(x, t, x16, xd, xs, x8q):
    """Row t of x in 11 bits and / or in 8 bits, as the layer's projections need (buffers of no rows: not);
    8 bits in blocks of 32 where x8q has that shape (rows.py activation_shapes32). The same bits as rows.py
    quantize_row / quantize_row32."""
    _quantize_cols(x, t, 0, x.shape[1], x16, xd, xs, x8q)


@njit(inline="always")
def _quantize_cols(x, t, c0, c1, x16, xd, xs, x8q):
    """_quantize_x for columns c0:c1 of row t alone, whole blocks of every form x goes in."""
    x8, xd8, xs8 = x8q
    if x16.shape[0]:
        for c in range(c0 // QB, (c1 + QB - 1) // QB):
            quantize_block(x, t, c, x16, xd, xs, XMAX)
    if x8.shape[0]:
        if in_blocks_of_32(x8, xd8):
            for c in range(c0 // 32, c1 // 32):
                quantize_block32(x, t, c, x8, xd8, xs8)
        else:
            for c in range(c0 // QB, (c1 + QB - 1) // QB):
                quantize_block(x, t, c, x8, xd8, xs8, XMAX8)


@njit(inline="always")
def _h_unit(h16, h8q):
    """Columns of h per unit of step 3 inside step 2: whole quantization blocks, 32 where h goes only in 8
    bits in blocks of 32, else QB."""
    h8, hd8 = h8q[0], h8q[1]
    return 32 if h16.shape[0] == 0 and in_blocks_of_32(h8, hd8) else QB


@njit(inline="always")
def _quantize_filled(h, r0, r1, unit, filled, n_pairs, h16, hd, hs, h8q):
    """Columns r0:r1 of h are written for every pair: count them into their units (filled), and quantize
    each unit this completes for every pair. The counts are acquire / release adds,
    so the thread that completes a unit sees the columns the other threads wrote."""
    F = h.shape[1]
    for u in range(r0 // unit, (r1 + unit - 1) // unit):
        c0, c1 = u * unit, min((u + 1) * unit, F)
        n = min(r1, c1) - max(r0, c0)                   # the unit's columns in this chunk
        if _add_acq_rel(filled, u, n) + n == c1 - c0:   # the unit's last columns
            for p in range(n_pairs):
                _quantize_cols(h, p, c0, c1, h16, hd, hs, h8q)


@njit(cache=True, nogil=True)
def _tile_starts(start, tiles):
    """tile0 (E + 1,): expert e's pairs are tiles tile0[e] .. tile0[e + 1] - 1 of eight (rows.py interleave8)
    when it has TILE8_MIN pairs or more and the layer has tile buffers (tiles rows), else none. Not inlined
    into the parallel layer, where Numba would make its np.zeros a parallel step of its own (~8 us)."""
    E = start.shape[0] - 1
    tile0 = np.zeros(E + 1, np.int64)
    for e in range(E):
        n = start[e + 1] - start[e]
        tile0[e + 1] = tile0[e] + ((n + 7) // 8 if tiles > 0 and n >= TILE8_MIN else 0)
    return tile0


@njit(inline="always")
def _interleave_experts(a8q, src, start, active, tile0, a_tiles):
    """Each expert's inputs (rows src[start[e]:start[e + 1]] of a8q) into its tiles, in parallel."""
    a8, ad, as_ = a8q
    at, ak, adt = a_tiles
    for i in prange(active.shape[0]):
        e = active[i]
        if tile0[e + 1] > tile0[e]:
            interleave8(a8, ad, as_, src, start[e], start[e + 1] - start[e], at, ak, adt, tile0[e])


@njit(cache=True, nogil=True, parallel=True)
def _moe_layer(x, ids, wts, gate, up, down, tg, tu, td, n_threads, first_share, small_per_thread, h_in_step2,
               one_region, x8q, x16, xd, xs, h, h8q, h16, hd, hs, out, x_tiles, h_tiles):
    """x (T, D) f32, ids (T, K) int64, wts (T, K) f32 -> out (T, D) f32; the rest is scratch (see LayerCall).
    Steps 2 and 4 run on n_threads threads: first_share % of the rows in one chunk each, the rest in
    small_per_thread chunks each. Calls of up to h_in_step2 pairs quantize h inside step 2, and with
    one_region run steps 2 and 4 in one parallel region.
    x8q: x in 8 bits for the gate / up projections (rows.py rows_dot), and x16 / xd / xs x in 11 bits; either
    may have no rows when no projection reads it. h8q and h16 / hd / hs: the same for h, the down projection's
    input.
    tg, tu, td: the projections' GGML types, compile-time constants (rows.py rows_dot): one compiled layer per
    combination of types, which only the kernels of those types go into.
    x_tiles, h_tiles: buffers for x and h in tiles of eight (rows.py tile_shapes; projections on 8-bit
    input), interleaved once per call for the experts with TILE8_MIN pairs or more; buffers of no rows: none."""
    numba.literally(tg)
    numba.literally(tu)
    numba.literally(td)
    T = x.shape[0]
    E, F, D = gate.shape[0], gate.shape[1], down.shape[1]
    start, pair_tok, pair_w, active = _route(ids, wts, E)
    x_tile0, h_tile0 = _tile_starts(start, x_tiles[0].shape[0]), _tile_starts(start, h_tiles[0].shape[0])
    # chunks handed out in step 2 (at 0) and step 4 (at 8: own cache line), step 2's rows done (at 16); zeroed
    # one by one, as Numba makes an np.zeros in a parallel function a parallel step of its own (a fork / join,
    # ~8 us, at every call)
    claimed = np.empty(24, np.int64)
    claimed[0] = 0
    claimed[8] = 0
    claimed[16] = 0
    n_pairs = pair_tok.shape[0]
    fused = n_pairs <= h_in_step2
    unit = _h_unit(h16, h8q)
    filled = np.empty((F + unit - 1) // unit, np.int64)     # columns of h written, per unit (step 3 in step 2)
    for u in range(filled.shape[0]):
        filled[u] = 0
    if T > SERIAL_QUANTIZE:
        for t in prange(T):
            _quantize_x(x, t, x16, xd, xs, x8q)
    else:        # a few rows: cheaper in this thread than a parallel step (one fork / join, ~8 us)
        for t in range(T):
            _quantize_x(x, t, x16, xd, xs, x8q)
    if x_tile0[E]:
        _interleave_experts(x8q, pair_tok, start, active, x_tile0, x_tiles)
    # steps 2 and 4 in one parallel region where nothing runs between them (h quantized inside step 2, no tiles
    # to interleave): a thread that finds no step 2 chunk left waits until every column of h is written and
    # quantized (claimed[16], counted after each chunk), then claims step 4 chunks; it waits only on chunks
    # other threads have claimed and are running, so the wait always ends. Else a region per step.
    merged = fused and one_region != 0 and h_tile0[E] == 0
    for region in range(1 if merged else 2):
        # one prange for both weight steps: Numba compiles each prange into a function of its own, and the
        # heavy kernels then once instead of twice (the first compile takes ~25 s less)
        for u in prange(n_threads):
            for step in range(region, 2 if merged else region + 1):
                if step == 1 and merged:
                    while _load_acquire(claimed, 16) < F:
                        _pause()
                rows = F if step == 0 else D
                big = rows * first_share // 100 // n_threads * n_threads   # the first chunks' rows, one each
                n_small = min(rows - big, n_threads * small_per_thread)
                c = _claim(claimed, 8 * step)
                while c < n_threads + n_small:
                    r0, r1 = _chunk(c, n_threads, big, n_small, rows)
                    if step == 0:
                        _gate_up_rows(tg, tu, gate, up, r0, r1, active, start, pair_tok, x16, xd, xs, x, h, x8q,
                                      x_tiles, x_tile0)
                        if fused:
                            _quantize_filled(h, r0, r1, unit, filled, n_pairs, h16, hd, hs, h8q)
                        if merged:
                            _add_acq_rel(claimed, 16, r1 - r0)
                    else:
                        _down_rows(td, down, r0, r1, active, start, pair_tok, pair_w, h16, hd, hs, h, out, h8q,
                                   h_tiles, h_tile0)
                    c = _claim(claimed, 8 * step)
        if region == 0 and not merged:
            if not fused:
                for p in prange(n_pairs):
                    _quantize_x(h, p, h16, hd, hs, h8q)
            if h_tile0[E]:
                _interleave_experts(h8q, np.arange(pair_tok.shape[0]), start, active, h_tile0, h_tiles)


@njit(cache=True, nogil=True)
def _synced_layer(sync, i_ready, i_done, i_abort, step, spins, x, ids, wts, gate, up, down, tg, tu, td, n_threads,
                  first_share, small_per_thread, h_in_step2, one_region, x8q, x16, xd, xs, h, h8q, h16, hd, hs, out,
                  x_tiles, h_tiles):
    """_moe_layer once sync[i_ready] >= step (the inputs' writer sets it after the inputs), then
    sync[i_done] = step. Returns 1 when the layer ran (or had no pair to run: all ids -1, as when every
    expert of the token is the GPU's), 0 when `spins` polls went by without the flag, -1 when
    sync[i_abort] >= step (the other side gave the step up). All three flags are int64 in one array."""
    numba.literally(tg)
    numba.literally(tu)
    numba.literally(td)
    while _load_acquire(sync, i_ready) < step:
        if _load_acquire(sync, i_abort) >= step:
            return -1
        spins -= 1
        if spins <= 0:
            return 0
        _pause()
    if ids.max() >= 0:      # no pair: nothing to compute, and the GPU does not read out (handoff.py, busy)
        _moe_layer(x, ids, wts, gate, up, down, tg, tu, td, n_threads, first_share, small_per_thread, h_in_step2,
                   one_region, x8q, x16, xd, xs, h, h8q, h16, hd, hs, out, x_tiles, h_tiles)
    _store_release(sync, i_done, step)
    return 1


_by_types = {}


def _for_types(tg: int, tu: int, td: int):
    """(_moe_layer, _synced_layer) for gate, up and down of GGML types tg, tu, td, as compiled functions that
    take every argument but the types, which they hold as constants. The row kernels are chosen when the layer
    compiles (rows.py rows_dot), so a process compiles only the types its model has; and from Python, a call
    with the types as arguments would go through Numba's literal dispatch every time (~2 ms a call)."""
    if (tg, tu, td) not in _by_types:
        def layer(x, ids, wts, gate, up, down, n_threads, first_share, small_per_thread, h_in_step2, one_region, x8q,
                  x16, xd, xs, h, h8q, h16, hd, hs, out, x_tiles, h_tiles):
            _moe_layer(x, ids, wts, gate, up, down, tg, tu, td, n_threads, first_share, small_per_thread, h_in_step2,
                       one_region, x8q, x16, xd, xs, h, h8q, h16, hd, hs, out, x_tiles, h_tiles)

        def synced(sync, i_ready, i_done, i_abort, step, spins, x, ids, wts, gate, up, down, n_threads, first_share,
                   small_per_thread, h_in_step2, one_region, x8q, x16, xd, xs, h, h8q, h16, hd, hs, out, x_tiles,
                   h_tiles):
            return _synced_layer(sync, i_ready, i_done, i_abort, step, spins, x, ids, wts, gate, up, down, tg, tu,
                                 td, n_threads, first_share, small_per_thread, h_in_step2, one_region, x8q, x16, xd,
                                 xs, h, h8q, h16, hd, hs, out, x_tiles, h_tiles)
        _by_types[tg, tu, td] = njit(cache=True, nogil=True)(layer), njit(cache=True, nogil=True)(synced)
    return _by_types[tg, tu, td]


_noticed = set()   # combinations of types whose compile was announced


def moe_ffn(x, topk_ids, topk_weights, experts: ExpertTensors, out=None):
    """Routed-expert FFN of one layer: out[t] = sum_k w[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),
    e = ids[t,k]; pairs with id -1 are skipped (their experts are computed elsewhere). x (T, D) f32, topk_ids
    (T, K) int, topk_weights (T, K) f32 -> (T, D) f32, torch or numpy as x is. Runs on
    numba.get_num_threads() threads (set per calling thread) without holding the GIL."""
    call = LayerCall(x, topk_ids, topk_weights, experts, out)
    ids = call.ids
    if ids.size and (ids.min() < -1 or ids.max() >= experts.n_expert):
        raise ValueError(f"expert ids must be in [0, {experts.n_expert}) or -1 (not computed here), got "
                         f"{ids.min()}..{ids.max()}")
    call()
    if out is not None:
        return out
    return torch.from_numpy(call.out) if isinstance(x, torch.Tensor) else call.out


class LayerCall:
    """moe_ffn on fixed buffers, checked and allocated once, then run as often as needed: each call reads
    x (T, D), topk_ids and topk_weights (T, K) as they are then and writes out (T, D) in place.

    The decode step replayed as CUDA graphs (offload/graphs.py) lands every token's inputs in the same
    pinned buffers; a LayerCall per layer saves the checks and scratch allocations of moe_ffn (~0.1 ms per
    layer on the GPU box, against ~0.5 ms of kernel). The ids are not range-checked per call: they must be
    a router's choices (0..E-1), or -1.
    """

    def __init__(self, x, topk_ids, topk_weights, experts: ExpertTensors, out=None):
        xn = _numpy(x, np.float32, "x")
        ids = _numpy(topk_ids, np.int64, "topk_ids")
        wts = _numpy(topk_weights, np.float32, "topk_weights")
        if (xn.ndim != 2 or xn.shape[1] != experts.hidden or ids.ndim != 2 or ids.shape != wts.shape
                or ids.shape[0] != xn.shape[0]):
            raise ValueError(f"moe_ffn needs x (T, {experts.hidden}) and topk_ids, topk_weights (T, K); got "
                             f"{tuple(xn.shape)}, {tuple(ids.shape)}, {tuple(wts.shape)}")
        T, D = xn.shape
        out_n = np.empty((T, D), np.float32) if out is None else _numpy(out, None, "out")
        if out_n.shape != (T, D) or out_n.dtype != np.float32 or not out_n.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 ({T}, {D}), got {out_n.dtype} {tuple(out_n.shape)}")
        P, F = ids.size, experts.ffn
        self.ids, self.out, self.experts = ids, out_n, experts
        self._inputs = (xn, ids, wts, experts.gate, experts.up, experts.down)
        self._types = int(experts.gate_type), int(experts.up_type), int(experts.down_type)
        self._layer, self._synced = _for_types(*self._types)
        # x in 8 bits where a gate / up projection is a K-quant (its loops multiply bytes; or in blocks of 32
        # where both are BYTE_DOT32 types), in 11 bits where one takes neither: a buffer of no rows is not filled.
        # Tiles of eight (below) where both take them in one form; Q8_0's in blocks of 32 beside its x16.
        forms = [_input_form(t, GATE_UP_8BIT) for t in (experts.gate_type, experts.up_type)]
        tiles = [_tile_form(t, GATE_UP_8BIT) for t in (experts.gate_type, experts.up_type)]
        tile_form = tiles[0] if tiles[0] == tiles[1] and T >= TILE8_MIN else None
        form8 = "k8" if "k8" in forms else "b32" if "b32" in forms else tile_form
        n8, n16 = T if form8 else 0, 0 if form8 and all(f == form8 for f in forms) else T
        # h, the down projection's input, likewise: silu(g) * u is heavy-tailed, and 11 bits cut its
        # rounding error ~65-fold against 8 in blocks of 256 (rows.py), but the K-quants' own rounding of the
        # weights is ~20-300x larger still (NSE 0.02-0.3 against a layer's 2-5e-4), and bytes take fewer
        # instructions; Q4_0 / Q5_0 / Q4_1 / Q5_1 take it in 8 bits in blocks of 32 (layer NSE 1.1-1.9e-4)
        h_form = _input_form(experts.down_type, DOWN_8BIT)
        h_tile = _tile_form(experts.down_type, DOWN_8BIT) if T >= TILE8_MIN else None
        p8, p16 = P if h_form or h_tile else 0, 0 if h_form else P
        # projections on 8-bit input take experts with TILE8_MIN pairs or more in tiles of eight (rows.py
        # rows_dot_tiles): at most P / 8 full tiles plus one partial per such expert, none below TILE8_MIN tokens
        # (numpy allocates them: moe_ffn builds a LayerCall per call)
        n_tiles = P // 8 + min(experts.n_expert, P // TILE8_MIN) if T >= TILE8_MIN else 0
        self._tiled = tile_form is not None and tile_form == form8
        x_tiles = _tiles(n_tiles if self._tiled else 0, D, 32 if form8 == "b32" else QB)
        h_tiles = _tiles(n_tiles if h_tile else 0, F, 32 if h_tile == "b32" else QB)
        self._scratch = (_activations(n8, D, np.int8, form8), *_activations(n16, D, np.int16),
                         np.empty((P, F), np.float32), _activations(p8, F, np.int8, h_form or h_tile),
                         *_activations(p16, F, np.int16), out_n, x_tiles, h_tiles)

    def __call__(self) -> np.ndarray:
        """Run the layer on numba.get_num_threads() threads; returns out (numpy, shared with the buffer).
        In calls of gemm.GEMM_MIN_CALL tokens or more, experts with GEMM_MIN_TOKENS tokens or more
        (GEMM_MIN_TOKENS_TILED where gate and up take tiles of eight) go through kernels/cpu/gemm.py instead
        (torch's own threads), the rest through the row kernels."""
        _compile_notice(self._layer, self._types)
        inputs, ids, many = self._inputs, self.ids, ()
        least = gemm.GEMM_MIN_TOKENS_TILED if self._tiled else gemm.GEMM_MIN_TOKENS
        if ids.shape[0] >= max(gemm.GEMM_MIN_CALL, least) and gemm.enabled():
            counts = np.bincount(ids[ids >= 0], minlength=self.experts.n_expert)
            many = np.flatnonzero(counts >= least)
            if len(many):      # the row kernels see those pairs as computed elsewhere (-1)
                inputs = (inputs[0], np.where(np.isin(ids, many), -1, ids)) + inputs[2:]
        self._layer(*inputs, numba.get_num_threads(), FIRST_SHARE, SMALL_CHUNKS, H_IN_STEP2_PAIRS, ONE_REGION,
                    *self._scratch)
        if len(many):
            x, wts = self._inputs[0], self._inputs[2]
            gemm.add_experts(x, ids, wts, self.experts, many, self.out)
        return self.out

    def synced(self, sync: np.ndarray, i_ready: int, i_done: int, i_abort: int, step: int,
               timeout: float = 60.0) -> bool:
        """Run the layer when sync[i_ready] reaches step (its inputs written; by a GPU kernel in the decode
        step of offload/graphs.py), then set sync[i_done] = step, without returning to Python in between.
        The flags are int64 in one array (pinned host memory when a GPU writes or reads them). Returns
        False, without running, if sync[i_abort] reaches step first; raises TimeoutError after `timeout`
        seconds without either. The row kernels only: a decode step's layers have one token."""
        _compile_notice(self._synced, self._types)
        deadline = None
        while True:
            ran = self._synced(sync, i_ready, i_done, i_abort, step, SPINS, *self._inputs, numba.get_num_threads(),
                               FIRST_SHARE, SMALL_CHUNKS, H_IN_STEP2_PAIRS, ONE_REGION, *self._scratch)
            if ran:
                return ran > 0
            now = time.monotonic()
            deadline = deadline or now + timeout
            if now > deadline:
                raise TimeoutError(f"the inputs of a CPU expert layer did not arrive within {timeout:g} s")


def _input_form(t: int, on: bool):
    """How a projection of GGML type t takes its input: "k8" (8 bits, a scale per 256: the K-quants), "b32"
    (8 bits, a scale per 32: rows.py BYTE_DOT32), None (11 bits in int16, or float for float weights); on: whether
    8-bit inputs are enabled for this projection (GATE_UP_8BIT / DOWN_8BIT)."""
    if on and t in BYTE_DOT:
        return "k8"
    return "b32" if on and t in BYTE_DOT32 else None


def _tile_form(t: int, on: bool):
    """The form of a projection's input in tiles of eight (rows.py TILED): its 8-bit form, Q8_0's "b32"
    (where `on`), or None: no tiles."""
    return _input_form(t, on) or ("b32" if on and t == GGMLType.Q8_0 else None)


def _activations(n: int, d: int, dtype, form=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Buffers for n activation rows of d values quantized in dtype (int8: 8 bits, int16: 11): the values,
    their block scales, their group sums (rows.py quantize_row), or in blocks of 32 for form "b32" (the
    values, their scales, the offset lanes: rows.py quantize_row32). n = 0: not used by the call."""
    shapes = activation_shapes32(n, d) if form == "b32" else activation_shapes(n, d)
    return np.empty(shapes[0], dtype), np.empty(shapes[1], np.float32), np.empty(shapes[2], np.int32)


def _tiles(n_tiles: int, d: int, per: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Buffers for n_tiles tiles of eight activation rows (rows.py tile_shapes, interleave8)."""
    st, sk, sd = tile_shapes(n_tiles, d, per)
    return np.empty(st, np.int32), np.empty(sk, np.int32), np.empty(sd, np.float32)


def _numpy(a, dtype, name: str) -> np.ndarray:
    """A C-contiguous numpy array of dtype sharing memory with a CPU tensor or array where it can."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got a tensor on {a.device}")
        a = a.detach().numpy()
    return np.asarray(a) if dtype is None else np.ascontiguousarray(a, dtype=dtype)


def _compile_notice(kernel, types: tuple[int, int, int]) -> None:
    """One line on stderr before the first call of a layer kernel for a combination of weight types, which
    compiles it (or loads it from Numba's disk cache); nothing after it. The set is looked at first: a
    dispatcher's `signatures` costs ~20 us, and this runs before every layer call."""
    if types in _noticed:
        return
    _noticed.add(types)
    if kernel.signatures:
        return
    names = " / ".join(GGMLType(t).name for t in types)
    print(f"dslocal: compiling the CPU MoE kernels for {names} experts, or loading them from Numba's disk cache...",
          file=sys.stderr, flush=True)
