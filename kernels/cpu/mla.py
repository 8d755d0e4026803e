"""MLA attention of a decode step on the CPU, in the absorbed form (Numba; runtime/model.py MLA is the reference).

    latent_in(q, kv, norm_w, eps, cos, sin, cache_kv, cache_pe, start, q_nope, q_pe)   # the new tokens in
    q_lat = linear.heads(q_nope, k_b, t_k)                   # (H, T, C): each head's query in the latent space
    attend(q_lat, q_pe, cache_kv, cache_pe, start, scale, o_lat)                        # (H, T, C)
    attend_chunks(q_lat, q_pe, cache_kv, cache_pe, start, scale, m, l, acc, o_lat)      # the same, long caches
    o = linear.heads(o_lat, v_b, t_v)                        # (H, T, Vh), then the output projection

For a few new tokens (T <= 4) of one sequence: what runtime/model.py does with a dozen small torch
operators and einsums per layer (0.4 ms for the query's einsum alone on the dev box), here in two compiled
calls besides the per-head products, which read attn_k_b / attn_v_b from their GGUF blocks
(kernels/cpu/linear.py heads). `attend` gives each (head, token) a thread that reads the whole cache;
`attend_chunks` gives each thread a chunk of positions for every (head, token), then merges: offload/hybrid.py
takes it from ATTEND_CHUNKS_MIN positions on, where it measured faster on the GPU box.
Shapes: T new tokens, H heads, N nope dim, R rope dim, C kv_lora_rank.
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


@njit(inline="always", fastmath={"reassoc", "contract"})
def _score(q_lat, q_pe, cache_kv, cache_pe, h, i, s, scale):
    """scale * (q_lat[h, i] . cache_kv[s] + q_pe[i, h] . cache_pe[s]): token i's score for position s, head h."""
    a = np.float32(0.0)
    for c in range(q_lat.shape[2]):
        a += q_lat[h, i, c] * cache_kv[s, c]
    b = np.float32(0.0)
    for r in range(q_pe.shape[2]):
        b += q_pe[i, h, r] * cache_pe[s, r]
    return (a + b) * scale


# reassoc lets LLVM vectorise the float sums; no nnan / ninf, which would drop the masking by -inf
@njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def attend(q_lat, q_pe, cache_kv, cache_pe, start, scale, out):
    """out[h, i] = sum_s p_s cache_kv[s], p = softmax_s(scale * (q_lat[h, i] . cache_kv[s] + q_pe[i, h] .
    cache_pe[s])) over the positions s <= start + i (token i of the new ones sits at start + i, its key
    already in the cache). q_lat, out (H, T, C); q_pe (T, H, R). One (head, token) per parallel item, which
    reads the whole cache: below ~1024 positions faster than attend_chunks on the GPU box (kernels/cpu/NOTES.md)."""
    H, T, C = q_lat.shape
    for k in prange(H * T):
        h, i = k // T, k % T
        S = start + i + 1
        p = np.empty(S, np.float32)
        top = np.float32(-np.inf)
        for s in range(S):
            p[s] = _score(q_lat, q_pe, cache_kv, cache_pe, h, i, s, scale)
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


@njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def attend_chunks(q_lat, q_pe, cache_kv, cache_pe, start, scale, part_m, part_l, part_acc, out):
    """attend's result from the cache cut into n = part_m.shape[0] chunks of positions, one per parallel item,
    each read once for every (head, token): attend's items each read the whole cache, which at long contexts
    costs more than their arithmetic. Each chunk keeps its softmax's max (part_m (n, H * T)), sum (part_l) and
    weighted rows (part_acc (n, H * T, C)); a second parallel step merges them per (head, token)."""
    H, T, C = q_lat.shape
    S = start + T
    n = part_m.shape[0]
    size = -(-S // n)
    for k in prange(n):
        s0 = k * size
        s1 = min(S, s0 + size)
        p = np.empty((H * T, max(s1 - s0, 1)), np.float32)
        for s in range(s0, s1):
            for h in range(H):
                for i in range(T):
                    if s > start + i:
                        p[h * T + i, s - s0] = -np.inf
                        continue
                    p[h * T + i, s - s0] = _score(q_lat, q_pe, cache_kv, cache_pe, h, i, s, scale)
        for j in range(H * T):
            top = np.float32(-np.inf)
            for s in range(s1 - s0):
                top = max(top, p[j, s])
            total = np.float32(0.0)
            for s in range(s1 - s0):
                p[j, s] = math.exp(p[j, s] - top) if top > -np.inf else np.float32(0.0)
                total += p[j, s]
            part_m[k, j] = top
            part_l[k, j] = total
            for c in range(C):
                part_acc[k, j, c] = 0.0
        for s in range(s0, s1):
            for j in range(H * T):
                w = p[j, s - s0]
                for c in range(C):
                    part_acc[k, j, c] += w * cache_kv[s, c]
    for j in prange(H * T):
        h, i = j // T, j % T
        top = np.float32(-np.inf)
        for k in range(n):
            top = max(top, part_m[k, j])
        total = np.float32(0.0)
        for c in range(C):
            out[h, i, c] = 0.0
        for k in range(n):
            if part_m[k, j] == -np.inf:
                continue
            w = np.float32(math.exp(part_m[k, j] - top))
            total += w * part_l[k, j]
            for c in range(C):
                out[h, i, c] += w * part_acc[k, j, c]
        for c in range(C):
            out[h, i, c] /= total
