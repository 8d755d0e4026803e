"""MLA's absorbed per-head products for decode in Triton (runtime/model.py MLA.forward), one launch each.

Shapes: B batch, T new tokens, H heads, N nope dim, C kv_lora_rank, V value head dim.
    absorb_q(q_nope, wk_b)        q_nope (B, T, H, N), wk_b (H, N, C) -> q_lat (B, T, H, C) fp32
        q_lat[b, t, h, c] = sum_n q_nope[b, t, h, n] wk_b[h, n, c]
    absorb_o(o_lat, wv_b, dtype)  o_lat (B, T, H, C), wv_b (H, V, C) -> o (B, T, H, V) in dtype
        o[b, t, h, v] = sum_c o_lat[b, t, h, c] wv_b[h, v, c]

In torch each is a float32 copy of the weight (and of the activations), a batched matrix-vector product
and, for o, the cast back to the model's dtype: in a decode step replayed as a CUDA graph these launches
cost more than the arithmetic (V2-Lite: 2 MB of bf16 weights per product). Here the inputs are read in
their own dtype and every product and sum is in fp32, as in the torch code; only the order of the sums
differs. Each program reads one weight tile, so a few tokens (T <= 4 in decode) re-read the weights.

A decode step calls decode_queries instead of absorb_q: the same tiles, and in the same launch the rope of
q's rope part and the latent's norm, rope and cache write (kernels/gpu/rope.py's work), which as kernels of
their own cost more to launch than to run (three launches become one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dslocal.kernels.gpu.rope import _latent_row, _rotate, angles, check_latent


@triton.jit
def _absorb_q_tile(p_q, p_w, p_out, H, N, C, i_row, i_c, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """out row i_row (= bt * H + h), columns i_c * BLOCK_C ..: q (N,) at p_q times wk_b[h] (N, C)."""
    h = i_row % H
    o_n = tl.arange(0, BLOCK_N)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_n, m_c = o_n < N, o_c < C
    b_q = tl.load(p_q + o_n, mask=m_n, other=0.0).to(tl.float32)
    p = p_w + h.to(tl.int64) * N * C + o_n[:, None] * C + o_c[None, :]
    b_w = tl.load(p, mask=m_n[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    tl.store(p_out + i_row.to(tl.int64) * C + o_c, tl.sum(b_q[:, None] * b_w, 0), mask=m_c)


@triton.jit
def _absorb_q_kernel(p_q, p_w, p_out, stride_q_bt, stride_q_h, H, N, C,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (B*T*H, cdiv(C, BLOCK_C)): out row (bt, h), columns c0..c0+BLOCK_C."""
    i_row, i_c = tl.program_id(0), tl.program_id(1)
    i_bt, h = i_row // H, i_row % H
    _absorb_q_tile(p_q + i_bt.to(tl.int64) * stride_q_bt + h * stride_q_h, p_w, p_out, H, N, C, i_row, i_c,
                   BLOCK_N, BLOCK_C)


@triton.jit(do_not_specialize=["start"])
def _decode_q_kernel(p_q, p_w, p_lat, p_qpe, p_cos, p_sin, p_kv, p_kvw, p_ckv, p_cpe, p_start, start, eps,
                     stride_q_bt, stride_q_h, stride_kv_bt, stride_ckv_b, stride_cpe_b, BTH, T, H, N, C, CL, R_HALF,
                     START_ON_DEVICE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_CL: tl.constexpr):
    """Grid (B*T*H + B*T, cdiv(C, BLOCK_C)). Rows bt * H + h: a tile of q_lat, and (first column block)
    q_pe of that head roped; rows B*T*H + bt (first column block): kv row bt to the cache."""
    i_row, i_c = tl.program_id(0), tl.program_id(1)
    if i_row < BTH:
        i_bt, h = i_row // H, i_row % H
        p_row = p_q + i_bt.to(tl.int64) * stride_q_bt + h * stride_q_h
        _absorb_q_tile(p_row, p_w, p_lat, H, N, C, i_row, i_c, BLOCK_N, BLOCK_C)
        if i_c == 0:
            i_t = i_bt % T
            o_i = tl.arange(0, BLOCK_I)
            _rotate(p_row + N, p_qpe + i_row.to(tl.int64) * 2 * R_HALF, p_cos + i_t * R_HALF, p_sin + i_t * R_HALF,
                    o_i, o_i < R_HALF)
    elif i_c == 0:
        i_bt = i_row - BTH
        i_b, i_t = i_bt // T, i_bt % T
        if START_ON_DEVICE:
            pos = tl.load(p_start).to(tl.int64) + i_t
        else:
            pos = start.to(tl.int64) + i_t
        _latent_row(p_kv + i_bt.to(tl.int64) * stride_kv_bt, p_kvw, p_cos + i_t * R_HALF, p_sin + i_t * R_HALF,
                    p_ckv + i_b.to(tl.int64) * stride_ckv_b, p_cpe + i_b.to(tl.int64) * stride_cpe_b,
                    pos, eps, CL, R_HALF, BLOCK_CL, BLOCK_I)


@triton.jit
def _absorb_o_kernel(p_o, p_w, p_out, H, C, V, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """Grid (B*T*H, cdiv(V, BLOCK_V)): out row (bt, h), values v0..v0+BLOCK_V; o_lat contiguous."""
    i_row, i_v = tl.program_id(0), tl.program_id(1)
    h = i_row % H
    o_c = tl.arange(0, BLOCK_C)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_c, m_v = o_c < C, o_v < V
    b_o = tl.load(p_o + i_row.to(tl.int64) * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    p = p_w + h.to(tl.int64) * V * C + o_v[:, None] * C + o_c[None, :]
    b_w = tl.load(p, mask=m_v[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    y = tl.sum(b_o[None, :] * b_w, 1)
    tl.store(p_out + i_row.to(tl.int64) * V + o_v, y.to(p_out.dtype.element_ty), mask=m_v)


def absorb_q(q_nope: torch.Tensor, wk_b: torch.Tensor) -> torch.Tensor:
    """einsum("bthn,hnc->bthc", q_nope.float(), wk_b.float()); q_nope may be a strided view (MLA's slice
    of q) with (b, t) mergeable and a contiguous last axis."""
    B, T, H, N = q_nope.shape
    C = wk_b.shape[2]
    _check_q(q_nope, wk_b, N)
    wk_b = wk_b.contiguous()
    out = torch.empty((B, T, H, C), dtype=torch.float32, device=q_nope.device)
    block_n, block_c = _q_blocks(N, C)
    _absorb_q_kernel[(B * T * H, triton.cdiv(C, block_c))](
        q_nope, wk_b, out, q_nope.stride(1), q_nope.stride(2), H, N, C,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4)
    return out


def decode_queries(q: torch.Tensor, wk_b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                   kv_weight: torch.Tensor, eps: float, cache_kv: torch.Tensor, cache_pe: torch.Tensor,
                   start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a decode step does between MLA's input projections and its attention, in one launch:
    q (B, T, H, N + R), a view with (b, t) mergeable and a contiguous last axis, -> q_lat = absorb_q(q[..., :N],
    wk_b) (B, T, H, C) fp32 and q_pe = rope(q[..., N:], cos, sin) (B, T, H, R) contiguous in q's dtype; and,
    as rope.latent_to_cache(kv, kv_weight, eps, cos, sin, cache_kv, cache_pe, start), kv (B, T, CL + R) normed,
    roped and written to the cache rows start.. (start an int or a 0-d integer device tensor)."""
    B, T, H, NR = q.shape
    C = wk_b.shape[2]
    R = cache_pe.shape[-1]
    N = NR - R
    _check_q(q[..., :N], wk_b, N)
    check_latent(kv, kv_weight, cache_kv, cache_pe)
    if kv.shape[:2] != (B, T) or kv.stride(0) != T * kv.stride(1) or R % 2:
        raise ValueError(f"decode_queries: kv {tuple(kv.shape)} does not go with q {tuple(q.shape)}")
    cos, sin = angles(cos, sin, T, R, q.device)
    wk_b = wk_b.contiguous()
    q_lat = torch.empty((B, T, H, C), dtype=torch.float32, device=q.device)
    q_pe = torch.empty((B, T, H, R), dtype=q.dtype, device=q.device)
    on_device = isinstance(start, torch.Tensor)
    block_n, block_c = _q_blocks(N, C)
    CL = cache_kv.shape[-1]
    _decode_q_kernel[(B * T * (H + 1), triton.cdiv(C, block_c))](
        q, wk_b, q_lat, q_pe, cos, sin, kv, kv_weight, cache_kv, cache_pe, start if on_device else q,
        0 if on_device else int(start), eps, q.stride(1), q.stride(2), kv.stride(1), cache_kv.stride(0),
        cache_pe.stride(0), B * T * H, T, H, N, C, CL, R // 2, START_ON_DEVICE=on_device, BLOCK_N=block_n, BLOCK_C=block_c,
        BLOCK_I=triton.next_power_of_2(max(1, R // 2)), BLOCK_CL=triton.next_power_of_2(CL), num_warps=4)
    return q_lat, q_pe


def _check_q(q_nope: torch.Tensor, wk_b: torch.Tensor, N: int) -> None:
    H = q_nope.shape[2]
    if wk_b.dim() != 3 or wk_b.shape[:2] != (H, N) or q_nope.stride(3) != 1 \
            or q_nope.stride(0) != q_nope.shape[1] * q_nope.stride(1):
        raise ValueError(f"absorb_q: q_nope {tuple(q_nope.shape)} (strides {q_nope.stride()}) against wk_b "
                         f"{tuple(wk_b.shape)}")


def _q_blocks(N: int, C: int) -> tuple[int, int]:
    """BLOCK_N, BLOCK_C of the absorb_q tiles: a whole head's N by up to 8192 values."""
    block_n = triton.next_power_of_2(N)
    return block_n, max(16, min(triton.next_power_of_2(C), 8192 // block_n))


def absorb_o(o_lat: torch.Tensor, wv_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """einsum("bthc,hvc->bthv", o_lat, wv_b.float()).to(dtype)."""
    B, T, H, C = o_lat.shape
    V = wv_b.shape[1]
    if wv_b.shape[0] != H or wv_b.shape[2] != C:
        raise ValueError(f"absorb_o: o_lat {tuple(o_lat.shape)} against wv_b {tuple(wv_b.shape)}")
    o_lat, wv_b = o_lat.contiguous(), wv_b.contiguous()
    out = torch.empty((B, T, H, V), dtype=dtype, device=o_lat.device)
    block_c = triton.next_power_of_2(C)
    block_v = max(1, min(triton.next_power_of_2(V), 8192 // block_c))
    _absorb_o_kernel[(B * T * H, triton.cdiv(V, block_v))](
        o_lat, wv_b, out, H, C, V, BLOCK_C=block_c, BLOCK_V=block_v, num_warps=4)
    return out
