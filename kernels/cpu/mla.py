"""MLA attention of a decode step on the CPU, in the absorbed form (Numba; runtime/model.py MLA is the reference).

    latent_in(q, kv, norm_w, eps, cos, sin, cache_kv, cache_pe, start, q_nope, q_pe)   # the new tokens in
    q_lat = linear.heads(q_nope, k_b, t_k)                   # (H, T, C): each head's query in the latent space
    attend(q_lat, q_pe, cache_kv, cache_pe, start, scale, o_lat)                        # (H, T, C)
    o = linear.heads(o_lat, v_b, t_v)                        # (H, T, Vh), then the output projection

For a few new tokens (T <= 4) of one sequence: what runtime/model.py does with a dozen small torch
operators and einsums per layer (0.4 ms for the query's einsum alone on the dev box), here in two compiled
calls besides the per-head products, which read attn_k_b / attn_v_b from their GGUF blocks
(kernels/cpu/linear.py heads). Shapes: T new tokens, H heads, N nope dim, R rope dim, C kv_lora_rank.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from dslocal.kernels.cpu.norm import rms_into


@njit(cache=True, nogil=True)
def latent_in(q, kv, norm_w, eps, cos, sin, cache_kv, cache_pe, start, q_nope, q_pe):
    """The new tokens' keys into the cache and their queries split and roped.

    q (T, H, N + R) and kv (T, C + R) as the input projections give them (float32); cos, sin (T, R / 2);
    cache_kv (max_len, C), cache_pe (max_len, R): one layer's latent cache of the sequence. Writes
    cache_kv[start + i] = RMSNorm(kv[i, :C]) * norm_w, cache_pe[start + i] = rope(kv[i, C:]), q_nope (H, T, N)
    (head-major, as linear.heads takes it) and q_pe (T, H, R) roped. Rope turns the pairs (2j, 2j + 1), as
    llama.cpp's NORM rope (runtime/model.py apply_rope)."""
    T, H = q.shape[0], q.shape[1]
    C, R = cache_kv.shape[1], cache_pe.shape[1]
    N = q.shape[2] - R
    for i in range(T):
        rms_into(kv[i, :C], norm_w, eps, cache_kv[start + i])
        _rope_into(kv[i, C:], cos[i], sin[i], cache_pe[start + i])
        for h in range(H):
            for n in range(N):
                q_nope[h, i, n] = q[i, h, n]
            _rope_into(q[i, h, N:], cos[i], sin[i], q_pe[i, h])


@njit(inline="always")
def _rope_into(src, cos, sin, dst):
    """dst = src (R values) with each pair (2j, 2j + 1) turned by the angle whose cos / sin are cos[j] / sin[j]."""
    for j in range(src.shape[0] // 2):
        a, b = src[2 * j], src[2 * j + 1]
        dst[2 * j] = a * cos[j] - b * sin[j]
        dst[2 * j + 1] = a * sin[j] + b * cos[j]


# reassoc lets LLVM vectorise the float sums; no nnan / ninf, which would drop the masking by -inf
@njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def attend(q_lat, q_pe, cache_kv, cache_pe, start, scale, out):
    """out[h, i] = sum_s p_s cache_kv[s], p = softmax_s(scale * (q_lat[h, i] . cache_kv[s] + q_pe[i, h] .
    cache_pe[s])) over the positions s <= start + i (token i of the new ones sits at start + i, its key
    already in the cache). q_lat, out (H, T, C); q_pe (T, H, R). One (head, token) per parallel item, which
    reads the whole cache: chunks of positions that read it once for all heads (flash-decoding) measured
    slower on the GPU box up to 2048 positions (kernels/cpu/NOTES.md)."""
    H, T, C = q_lat.shape
    R = q_pe.shape[2]
    for k in prange(H * T):
        h, i = k // T, k % T
        S = start + i + 1
        p = np.empty(S, np.float32)
        top = np.float32(-np.inf)
        for s in range(S):
            a = np.float32(0.0)
            for c in range(C):
                a += q_lat[h, i, c] * cache_kv[s, c]
            b = np.float32(0.0)
            for r in range(R):
                b += q_pe[i, h, r] * cache_pe[s, r]
            p[s] = (a + b) * scale
            top = max(top, p[s])
        total = np.float32(0.0)
        for s in range(S):
            p[s] = math.exp(p[s] - top)
            total += p[s]
        acc = np.zeros(C, np.float32)
        for s in range(S):
            for c in range(C):
                acc[c] += p[s] * cache_kv[s, c]
        for c in range(C):
            out[h, i, c] = acc[c] / total
