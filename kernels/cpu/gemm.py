"""Experts with many tokens: dequantized to bf16 a group at a time, then multiplied by torch (oneDNN, AMX).

The row kernels (rows.py) unpack every weight block once per tile of four tokens, so an expert with n tokens
costs about n / 4 unpackings of its blocks. A prompt gives an expert tens of tokens (V2-Lite, 512 tokens,
top-6 of 64 experts: ~48 each); there it pays to unpack each block once, into a bf16 matrix, and hand the
products to a matrix library, where the CPU has a matrix unit: on the GPU box's Xeon (AMX) torch multiplies
(48, 2048) by (2048, 1408) in bf16 in 0.12 ms on 16 threads (2.3 TFLOP/s; 0.74 in float32). Per expert
with n >= GEMM_MIN_TOKENS tokens:

    W = [gate; up] (2F, D), down (D, F), dequantized to bf16 (float32 for F32 / F16 / BF16 experts, which
        are not rounded further, or where the CPU has no bf16 arithmetic)
    h = silu(x W_gate^T) * (x W_up^T)          (n, F)
    out[t] += w * h W_down^T                     for each of its tokens t

GPU box, 16 threads, V2-Lite layer at T = 512 (`bench --moe-only` shapes), row kernels only -> with this
path, two interleaved rounds, ms (kernels/cpu/NOTES.md): Q4_K/Q5_0 108.4 / 94.3 -> 64.9 / 63.6, Q6_K/Q8_0
91.1 / 94.5 -> 76.2 / 69.1, Q2_K/Q4_0 92.0 / 83.2 -> 74.0 / 68.8, Q8_0 94.9 / 83.0 -> 62.9 / 63.4. Of the
~63 ms (Q4_K), dequantizing takes ~30 and the products and their glue ~33. V3 at T = 512 gives an expert
~16 tokens; with 16 as the threshold the path was slower there (800 -> 1254 ms: a V3 expert's 44 M
weights dequantize at ~13 G/s on 16 threads), with 32 it is rarely used and the time stays (799 / 755 ms).
On a Zen 4 core pair (AVX512-BF16, no AMX) the V2-Lite layer at T = 512 took the same time either way
(308 / 302 ms), so by default the path runs only where the CPU has AMX.

Rounding: bf16 weights and activations, five roundings of relative step 2^-8 in series: NSE 2.6-2.8e-5
against the float32 reference (tests/kernels/test_moe.py), below the row kernels' 8-bit activations
(~1e-4). The dequantization is bit-exact against quant/dequant.py (tests/kernels/test_gemm.py).
"""
from __future__ import annotations

import functools
import os
import sys
import threading

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from dslocal.kernels.cpu.blocks import BF16, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0
from dslocal.kernels.cpu.rows import _u32le
from dslocal.kernels.experts import ExpertTensors

i32, u32, u64, f32 = np.int32, np.uint32, np.uint64, np.float32
# Experts with at least GEMM_MIN_TOKENS tokens in a call of at least GEMM_MIN_CALL tokens take the matrix
# path; the rest the row kernels. Below 64 tokens an expert rarely gets 32, and on a GPU machine calls of
# 64 tokens or more stream their experts to the GPU (offload/prefill.py), so the CPU worker that runs the
# decode steps' layer jobs never starts torch's threads beside its own (see kernels/cpu/NOTES.md, "In the
# whole model: OpenMP teams").
GEMM_MIN_TOKENS = 32
GEMM_MIN_CALL = 64
# Where a layer's gate and up take 8-bit input (K-quants, rows.py BYTE_DOT32), the row kernels take tiles of
# eight tokens (rows.py rows_dot_tiles) and beat this path up to more tokens per expert. GPU box, `bench
# --moe-only`, 16 threads, ms with this path / without: V2-Lite at T = 512 (~48 per expert) Q4_K/Q5_0
# 55.5-69.6 / 51.6-52.6, Q6_K/Q8_0 55.6-57.3 / 52.9-55.3, Q2_K/Q4_0 60.1-62.9 / 43.7-45.7; at T = 683 (~64)
# about even (75.3-82.8 / 87.2-96.2, 91.4-96.8 / 87.5-94.6, 83.4-86.8 / 80.5-83.2); at T = 1024 (~96)
# 68.4-72.3 / 95.2-103.5, 67.2-69.5 / 91.0-105.1, 62.3-78.8 / 84.9-86.3; V3 at T = 1024 (~32) Q4_K 743 / 423
# (kernels/cpu/NOTES.md).
GEMM_MIN_TOKENS_TILED = 64
# Bytes of dequantized experts per group (see add_experts).
GROUP_BYTES = 256 * 2**20
# The path on (True) or off (False); None: on where the CPU has AMX, or as DSLOCAL_CPU_GEMM=1 / 0 says.
ENABLED: bool | None = None


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (read once: enabled() runs at every long call)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split()[2:])
    except OSError:
        pass
    return frozenset()


def enabled() -> bool:
    """Whether experts with GEMM_MIN_TOKENS tokens or more take this path (see ENABLED)."""
    if ENABLED is not None:
        return ENABLED
    forced = os.environ.get("DSLOCAL_CPU_GEMM", "")
    if forced in ("0", "1"):
        return forced == "1"
    return "amx_bf16" in _cpu_flags()


# --- dequantization, one row at a time, into float32 then the output's type ------------------------------

@intrinsic
def _float_of_bits(typingctx, bits):
    """The float32 whose bits are the low 32 bits of the integer `bits`."""
    if isinstance(bits, types.Integer):
        def codegen(context, builder, sig, args):
            v = args[0]
            if v.type.width != 32:
                v = builder.trunc(v, ir.IntType(32)) if v.type.width > 32 else builder.zext(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())
        return types.float32(bits), codegen


@njit(inline="always")
def _b(w, e, r, i):
    """Byte i of row r of expert e as uint32 (an unsigned index: no negative-index code in the loops)."""
    return u32(w[e, r, u64(i)])


@njit(inline="always")
def _half(w, e, r, i):
    """The fp16 at byte i as float32: sign, exponent and mantissa moved into place, the exponent rebased by
    2**(127 - 15) (exact for normals and subnormals; exponent 31 is inf / NaN)."""
    h = _b(w, e, r, i) | (_b(w, e, r, i + 1) << 8)
    bits = ((h & 0x7FFF) << 13) | ((h & 0x8000) << 16)
    if (h & 0x7C00) == 0x7C00:
        bits |= u32(0x7F800000)
        return _float_of_bits(bits)
    return _float_of_bits(bits) * f32(5.192296858534828e33)


@njit(inline="always")
def _k4_scale_min(w, e, r, p, j):
    """Scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block whose 12 scale bytes start at p."""
    if j < 4:
        return f32(_b(w, e, r, p + j) & 63), f32(_b(w, e, r, p + 4 + j) & 63)
    k = j - 4
    lo = _b(w, e, r, p + 8 + k)
    return (f32((lo & 15) | ((_b(w, e, r, p + k) >> 6) << 4)),
            f32((lo >> 4) | ((_b(w, e, r, p + 4 + k) >> 6) << 4)))


# Each block function writes the block at byte p of row r to v[o:o + its values]. n is 32, passed at run
# time: with a constant trip count LLVM unrolled the value loops before its loop vectorizer ran, and its
# SLP vectorizer then left them scalar (it cannot tell v from w); a runtime count gets vectorized loops.

@njit(inline="always")
def _q4_k(w, e, r, p, v, o, n):
    d, dmin = _half(w, e, r, p), _half(w, e, r, p + 2)
    for c in range(4):                     # 32 bytes of nibbles: sub-block 2c low, 2c + 1 high
        s0, m0 = _k4_scale_min(w, e, r, p + 4, 2 * c)
        s1, m1 = _k4_scale_min(w, e, r, p + 4, 2 * c + 1)
        a0, b0, a1, b1 = d * s0, dmin * m0, d * s1, dmin * m1
        for l in range(n):
            q = _b(w, e, r, p + 16 + 32 * c + l)
            v[o + 64 * c + l] = a0 * f32(q & 15) - b0
            v[o + 64 * c + 32 + l] = a1 * f32(q >> 4) - b1


@njit(inline="always")
def _q5_k(w, e, r, p, v, o, n):
    d, dmin = _half(w, e, r, p), _half(w, e, r, p + 2)
    for c in range(4):
        s0, m0 = _k4_scale_min(w, e, r, p + 4, 2 * c)
        s1, m1 = _k4_scale_min(w, e, r, p + 4, 2 * c + 1)
        a0, b0, a1, b1 = d * s0, dmin * m0, d * s1, dmin * m1
        for l in range(n):
            q, h = _b(w, e, r, p + 48 + 32 * c + l), _b(w, e, r, p + 16 + l) >> (2 * c)
            v[o + 64 * c + l] = a0 * f32((q & 15) | ((h & 1) << 4)) - b0
            v[o + 64 * c + 32 + l] = a1 * f32((q >> 4) | ((h & 2) << 3)) - b1


@njit(inline="always")
def _q6_k(w, e, r, p, v, o, n):
    d = _half(w, e, r, p + 208)
    for h in range(2):
        for k in range(4):                 # values 128h + 32k + l: sub-blocks 8h + 2k (l < 16) and the next
            lo_at, shift = p + 64 * h + 32 * (k % 2), 4 * (k // 2)
            sc0 = d * f32(i32(_b(w, e, r, p + 192 + 8 * h + 2 * k) ^ 128) - 128)      # int8 scales
            sc1 = d * f32(i32(_b(w, e, r, p + 193 + 8 * h + 2 * k) ^ 128) - 128)
            for l in range(n):
                high = (_b(w, e, r, p + 128 + 32 * h + l) >> (2 * k)) & 3
                q = i32(((_b(w, e, r, lo_at + l) >> shift) & 15) | (high << 4))
                v[o + 128 * h + 32 * k + l] = (sc0 if l < 16 else sc1) * f32(i32(q) - 32)


@njit(inline="always")
def _q2_k(w, e, r, p, v, o, n):
    d, dmin = _half(w, e, r, p + 80), _half(w, e, r, p + 82)
    for h in range(2):
        for k in range(4):                 # values 128h + 32k + l: sub-blocks 8h + 2k (l < 16) and the next
            s0, s1 = _b(w, e, r, p + 8 * h + 2 * k), _b(w, e, r, p + 8 * h + 2 * k + 1)
            a0, m0, a1, m1 = d * f32(s0 & 15), dmin * f32(s0 >> 4), d * f32(s1 & 15), dmin * f32(s1 >> 4)
            for l in range(n):
                a, m = (a0, m0) if l < 16 else (a1, m1)
                v[o + 128 * h + 32 * k + l] = a * f32(i32((_b(w, e, r, p + 16 + 32 * h + l) >> (2 * k)) & 3)) - m


@njit(inline="always")
def _q3_k_scale(w, e, r, p, s):
    """Scale of sub-block s (0..15) of a Q3_K super-block at p, minus its offset of 32."""
    low = (_b(w, e, r, p + 96 + s % 8) >> (4 * (s // 8))) & 15
    high = (_b(w, e, r, p + 104 + s % 4) >> (2 * (s // 4))) & 3
    return f32(i32(low | (high << 4)) - 32)


@njit(inline="always")
def _q3_k(w, e, r, p, v, o, n):
    d = _half(w, e, r, p + 108)
    for h in range(2):
        for k in range(4):                 # values 128h + 32k + l: sub-blocks 8h + 2k (l < 16) and the next
            a0, a1 = d * _q3_k_scale(w, e, r, p, 8 * h + 2 * k), d * _q3_k_scale(w, e, r, p, 8 * h + 2 * k + 1)
            hb = 4 * h + k                 # the hmask bit of these values (inverted: 0 subtracts 4)
            for l in range(n):
                low = i32((_b(w, e, r, p + 32 + 32 * h + l) >> (2 * k)) & 3)
                q = i32(low - i32(4) * i32(((_b(w, e, r, p + l) >> hb) & 1) ^ 1))
                v[o + 128 * h + 32 * k + l] = (a0 if l < 16 else a1) * f32(q)


@njit(inline="always")
def _q8_0(w, e, r, p, v, o, n):
    d = _half(w, e, r, p)
    for l in range(n):                     # (q ^ 128) - 128: the byte as int8
        v[o + l] = d * f32(i32(_b(w, e, r, p + 2 + l) ^ 128) - 128)


@njit(inline="always")
def _q4_0(w, e, r, p, v, o, n):
    d = _half(w, e, r, p)
    for l in range(n // 2):
        q = _b(w, e, r, p + 2 + l)
        v[o + l] = d * f32(i32(q & 15) - 8)
        v[o + 16 + l] = d * f32(i32(q >> 4) - 8)


@njit(inline="always")
def _q4_1(w, e, r, p, v, o, n):
    d, m = _half(w, e, r, p), _half(w, e, r, p + 2)
    for l in range(n // 2):
        q = _b(w, e, r, p + 4 + l)
        v[o + l] = d * f32(q & 15) + m
        v[o + 16 + l] = d * f32(q >> 4) + m


@njit(inline="always")
def _q5_0(w, e, r, p, v, o, n):
    d, qh = _half(w, e, r, p), _u32le(w, e, r, p + 2)
    for l in range(n // 2):
        q = _b(w, e, r, p + 6 + l)
        v[o + l] = d * f32(i32((q & 15) | (((qh >> l) & 1) << 4)) - 16)
        v[o + 16 + l] = d * f32(i32((q >> 4) | (((qh >> (l + 16)) & 1) << 4)) - 16)


@njit(inline="always")
def _q5_1(w, e, r, p, v, o, n):
    d, m, qh = _half(w, e, r, p), _half(w, e, r, p + 2), _u32le(w, e, r, p + 4)
    for l in range(n // 2):
        q = _b(w, e, r, p + 8 + l)
        v[o + l] = d * f32((q & 15) | (((qh >> l) & 1) << 4)) + m
        v[o + 16 + l] = d * f32((q >> 4) | (((qh >> (l + 16)) & 1) << 4)) + m


@njit(cache=True, nogil=True)
def _row_f32(t, w, e, r, v, n32):
    """Row r of expert e (GGML type t) -> v (values,) float32; n32 = 32 (see the block functions).
    One block loop per type: a single loop branching on t per block was 2-4x slower (dev)."""
    n = v.shape[0]
    if t == F32:
        for l in range(n):
            v[l] = _float_of_bits(_u32le(w, e, r, 4 * l))
    elif t == BF16:
        for l in range(n):
            v[l] = _float_of_bits((_b(w, e, r, 2 * l) << 16) | (_b(w, e, r, 2 * l + 1) << 24))
    elif t == F16:
        for l in range(n):
            v[l] = _half(w, e, r, 2 * l)
    elif t == Q4_K:
        for b in range(n // 256):
            _q4_k(w, e, r, 144 * b, v, 256 * b, n32)
    elif t == Q5_K:
        for b in range(n // 256):
            _q5_k(w, e, r, 176 * b, v, 256 * b, n32)
    elif t == Q6_K:
        for b in range(n // 256):
            _q6_k(w, e, r, 210 * b, v, 256 * b, n32)
    elif t == Q2_K:
        for b in range(n // 256):
            _q2_k(w, e, r, 84 * b, v, 256 * b, n32)
    elif t == Q3_K:
        for b in range(n // 256):
            _q3_k(w, e, r, 110 * b, v, 256 * b, n32)
    elif t == Q8_0:
        for b in range(n // 32):
            _q8_0(w, e, r, 34 * b, v, 32 * b, n32)
    elif t == Q4_0:
        for b in range(n // 32):
            _q4_0(w, e, r, 18 * b, v, 32 * b, n32)
    elif t == Q4_1:
        for b in range(n // 32):
            _q4_1(w, e, r, 20 * b, v, 32 * b, n32)
    elif t == Q5_0:
        for b in range(n // 32):
            _q5_0(w, e, r, 22 * b, v, 32 * b, n32)
    else:
        for b in range(n // 32):
            _q5_1(w, e, r, 24 * b, v, 32 * b, n32)


def _put(v, out, i):
    """out[i] = v: float32, or bf16 bits (uint16) rounded to nearest even (NaN stays NaN)."""


@overload(_put, inline="always")
def _put_typed(v, out, i):
    if out.dtype == types.float32:
        def put(v, out, i):
            for l in range(v.shape[0]):
                out[i, l] = v[l]
        return put
    if out.dtype == types.uint16:
        def put_bf16(v, out, i):
            bits = v.view(np.uint32)
            for l in range(v.shape[0]):
                u = bits[l]
                out[i, l] = np.uint16((u + u32(0x7FFF) + ((u >> 16) & 1)) >> 16)
        return put_bf16


@njit(cache=True, nogil=True, parallel=True)
def dequantize_experts(gate, up, down, tg, tu, td, which, gu, dn, n32):
    """Experts which[g]'s gate and up -> gu[g] (2F, D), their down -> dn[g] (D, F), g < len(which); float32,
    or uint16 holding bf16 bits. gate, up: uint8 (E, F, row bytes), down: uint8 (E, D, row bytes); tg, tu,
    td their GGML types; n32 = 32. One parallel loop over all the rows of the group."""
    F, D = gate.shape[1], down.shape[1]
    per = 2 * F + D
    for i in prange(which.shape[0] * per):
        g, j = i // per, i % per
        e = which[g]
        if j < 2 * F:
            v = np.empty(D, np.float32)
            if j < F:
                _row_f32(tg, gate, e, j, v, n32)
            else:
                _row_f32(tu, up, e, j - F, v, n32)
            _put(v, gu[g], j)
        else:
            v = np.empty(F, np.float32)
            _row_f32(td, down, e, j - 2 * F, v, n32)
            _put(v, dn[g], j - 2 * F)


# --- the products ------------------------------------------------------------------------------------------

_kept = threading.local()    # each calling thread's group buffers, kept between calls


def _buffers(G: int, F: int, D: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Group buffers gu (G, 2F, D) and dn (G, D, F) of dtype, carved from memory this thread keeps: fresh
    pages cost a fault each on first write, ~30 % of the dequantization's time when allocated per call
    (dev box, V2-Lite, 256 MiB groups)."""
    n = 3 * G * F * D * np.dtype(dtype).itemsize
    if getattr(_kept, "mem", None) is None or _kept.mem.size < n:
        _kept.mem = np.empty(n, np.uint8)
    flat = _kept.mem[:n].view(dtype)
    return flat[:2 * G * F * D].reshape(G, 2 * F, D), flat[2 * G * F * D:].reshape(G, D, F)


def add_experts(x: np.ndarray, ids: np.ndarray, wts: np.ndarray, experts: ExpertTensors, which: np.ndarray,
                out: np.ndarray) -> None:
    """out[t] += sum over k with ids[t, k] in `which` of wts[t, k] * expert(x[t]): the experts in `which`
    dequantized a group at a time and multiplied by torch. x (T, D) f32, ids (T, K) int64, wts (T, K) f32,
    out (T, D) f32.

    Groups, not single experts: Numba's OpenMP threads and torch's come from two OpenMP runtimes, and on
    the GPU box each switch between them cost more than the work (64 V2-Lite experts one by one: 144 ms,
    against 17 ms of dequantizing and 18 ms of products timed apart). A group is one Numba call, then
    batched products (bmm) over its experts' tokens, padded to the group's largest count; experts are
    grouped in order of their token counts, so the padding stays small."""
    if not dequantize_experts.signatures:
        print("dslocal: compiling the CPU matrix path for long prompts, or loading it from Numba's disk cache...",
              file=sys.stderr, flush=True)
    types_ = (int(experts.gate_type), int(experts.up_type), int(experts.down_type))
    # bf16 products where the CPU has bf16 arithmetic; float experts are not rounded further
    bf16 = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags()) and not {F32, F16, BF16} & set(types_)
    dtype, np_dtype = (torch.bfloat16, np.uint16) if bf16 else (torch.float32, np.float32)
    (T, D), K, F = x.shape, ids.shape[1], experts.ffn
    G = max(1, min(len(which), GROUP_BYTES // (3 * F * D * np.dtype(np_dtype).itemsize)))
    gu_n, dn_n = _buffers(G, F, D, np_dtype)
    gu, dn = torch.from_numpy(gu_n).view(dtype), torch.from_numpy(dn_n).view(dtype)   # (G, 2F, D), (G, D, F)
    # padding: pair T*K has weight 0 and token T, a zero row of x and a row of out thrown away
    x_pad = torch.cat([torch.from_numpy(x), torch.zeros((1, D))]).to(dtype)          # (T + 1, D)
    w_pad = torch.from_numpy(np.append(wts.reshape(-1), np.float32(0)))               # (T*K + 1,)
    out_pad = torch.zeros((T + 1, D))
    flat = ids.reshape(-1)
    pairs = [np.flatnonzero(flat == e) for e in which]           # each expert's pairs, index t*K + k
    order = np.argsort([len(p) for p in pairs], kind="stable")
    for g0 in range(0, len(order), G):
        group = order[g0:g0 + G]
        pair = np.full((len(group), max(len(pairs[i]) for i in group)), T * K, np.int64)   # (g, n)
        for j, i in enumerate(group):
            pair[j, :len(pairs[i])] = pairs[i]
        dequantize_experts(experts.gate, experts.up, experts.down, *types_, which[group].astype(np.int64),
                           gu_n, dn_n, 32)
        pair_t = torch.from_numpy(pair)
        tok = pair_t // K                                                  # (g, n): the padding gets T
        g = len(group)
        gate_up = torch.bmm(x_pad[tok], gu[:g].transpose(1, 2)).float()   # (g, n, 2F)
        h = (torch.nn.functional.silu(gate_up[..., :F]) * gate_up[..., F:]).to(dtype)
        y = torch.bmm(h, dn[:g].transpose(1, 2)).float()                    # (g, n, D)
        y *= w_pad[pair_t][..., None]
        out_pad.index_add_(0, tok.reshape(-1), y.reshape(-1, D))
    torch.from_numpy(out).add_(out_pad[:T])
