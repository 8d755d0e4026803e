"""Rotary embedding and the latent cache write of MLA in Triton, one launch each per layer.

Shapes: B batch, T new tokens, H heads, R rope dim (pairs (2i, 2i+1) rotate together: llama.cpp's NORM
rope, runtime/model.py apply_rope), C kv_lora_rank, S_max cache length. cos, sin: (T, R/2) fp32.

In torch, rope and the latent's RMSNorm are ~8 elementwise kernels each, and writing the latent into the
cache at a device-side position two more: in a decode step replayed as a CUDA graph these ~20 launches per
layer cost more than their arithmetic. Here:
    rope(q_pe, cos, sin)                          q_pe (B, T, H, R) -> roped copy, one kernel
    latent_to_cache(kv, w, eps, cos, sin, ...)    kv (B, T, C + R), the wkv_a output -> the cache rows
        start..start+T-1 get RMSNorm(kv[..., :C]) * w and rope(kv[..., C:]), one kernel
Arithmetic in fp32, results rounded to the output dtype once, as the torch code rounds them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(p_src, p_dst, p_cos, p_sin, o_i, m_i):
    """dst pairs = src pairs rotated by the angles whose cos and sin sit at p_cos, p_sin (offsets o_i)."""
    x0 = tl.load(p_src + 2 * o_i, mask=m_i, other=0.0).to(tl.float32)
    x1 = tl.load(p_src + 2 * o_i + 1, mask=m_i, other=0.0).to(tl.float32)
    c = tl.load(p_cos + o_i, mask=m_i, other=0.0)
    s = tl.load(p_sin + o_i, mask=m_i, other=0.0)
    tl.store(p_dst + 2 * o_i, (x0 * c - x1 * s).to(p_dst.dtype.element_ty), mask=m_i)
    tl.store(p_dst + 2 * o_i + 1, (x0 * s + x1 * c).to(p_dst.dtype.element_ty), mask=m_i)


@triton.jit
def _rope_kernel(p_x, p_cos, p_sin, p_y, stride_b, stride_t, stride_h, T, H, R_HALF,
                 BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    """Grid (B*T, cdiv(H, BLOCK_H)): heads of one token; y contiguous (B, T, H, R)."""
    i_bt = tl.program_id(0)
    i_b, i_t = i_bt // T, i_bt % T
    o_i = tl.arange(0, BLOCK_I)
    for j in range(BLOCK_H):
        h = tl.program_id(1) * BLOCK_H + j
        if h < H:
            src = p_x + i_b.to(tl.int64) * stride_b + i_t * stride_t + h * stride_h
            dst = p_y + (i_bt.to(tl.int64) * H + h) * 2 * R_HALF
            _rotate(src, dst, p_cos + i_t * R_HALF, p_sin + i_t * R_HALF, o_i, o_i < R_HALF)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope of runtime/model.py: x (B, T, H, R), any strides but a contiguous last axis -> a
    contiguous roped copy in x's dtype."""
    B, T, H, R = x.shape
    if x.stride(-1) != 1 or R % 2:
        raise ValueError(f"rope needs pairs contiguous along the last axis of {tuple(x.shape)}")
    cos, sin = angles(cos, sin, T, R, x.device)
    y = torch.empty((B, T, H, R), dtype=x.dtype, device=x.device)
    block_h = min(H, 16)
    _rope_kernel[(B * T, triton.cdiv(H, block_h))](
        x, cos, sin, y, x.stride(0), x.stride(1), x.stride(2), T, H, R // 2,
        BLOCK_H=block_h, BLOCK_I=triton.next_power_of_2(R // 2), num_warps=1)
    return y


@triton.jit
def _latent_row(p_kv, p_w, p_cos, p_sin, p_ckv, p_cpe, pos, eps, C, R_HALF, BLOCK_C: tl.constexpr,
                BLOCK_I: tl.constexpr):
    """One row of kv at p_kv (C + R values) -> cache rows at position pos of c_kv (normed) and k_pe (roped
    by the angles at p_cos, p_sin); p_ckv, p_cpe: the batch row's caches."""
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    b_c = tl.load(p_kv + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_c * b_c, 0) / C + eps)
    b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)
    tl.store(p_ckv + pos * C + o_c, (b_c * b_rstd * b_w).to(p_ckv.dtype.element_ty), mask=m_c)
    o_i = tl.arange(0, BLOCK_I)
    _rotate(p_kv + C, p_cpe + pos * 2 * R_HALF, p_cos, p_sin, o_i, o_i < R_HALF)


@triton.jit(do_not_specialize=["start"])
def _latent_kernel(p_kv, p_w, p_cos, p_sin, p_ckv, p_cpe, p_start, start, eps, stride_kv_b, stride_kv_t,
                   stride_ckv_b, stride_cpe_b, T, C, R_HALF, START_ON_DEVICE: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Grid (B*T,): row (b, t) of kv -> cache row start + t of c_kv (normed) and k_pe (roped)."""
    i_bt = tl.program_id(0)
    i_b, i_t = i_bt // T, i_bt % T
    if START_ON_DEVICE:
        start = tl.load(p_start)
    _latent_row(p_kv + i_b.to(tl.int64) * stride_kv_b + i_t * stride_kv_t, p_w, p_cos + i_t * R_HALF,
                p_sin + i_t * R_HALF, p_ckv + i_b.to(tl.int64) * stride_ckv_b, p_cpe + i_b.to(tl.int64) * stride_cpe_b,
                (start + i_t).to(tl.int64), eps, C, R_HALF, BLOCK_C, BLOCK_I)


def latent_to_cache(kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                    cache_kv: torch.Tensor, cache_pe: torch.Tensor, start: int | torch.Tensor) -> None:
    """kv (B, T, C + R) with a contiguous last axis; weight (C,) the kv_norm weight; cache_kv (B, S_max, C)
    and cache_pe (B, S_max, R) contiguous rows; start an int or a 0-d integer device tensor (a decode step
    replayed as a CUDA graph). Writes rows start..start+T-1 of both; the caller keeps start + T <= S_max."""
    check_latent(kv, weight, cache_kv, cache_pe)
    B, T, _ = kv.shape
    C, R = cache_kv.shape[-1], cache_pe.shape[-1]
    cos, sin = angles(cos, sin, T, R, kv.device)
    on_device = isinstance(start, torch.Tensor)
    _latent_kernel[(B * T,)](
        kv, weight, cos, sin, cache_kv, cache_pe, start if on_device else kv, 0 if on_device else int(start),
        eps, kv.stride(0), kv.stride(1), cache_kv.stride(0), cache_pe.stride(0), T, C, R // 2,
        START_ON_DEVICE=on_device, BLOCK_C=triton.next_power_of_2(C), BLOCK_I=triton.next_power_of_2(R // 2),
        num_warps=4)


def check_latent(kv: torch.Tensor, weight: torch.Tensor, cache_kv: torch.Tensor, cache_pe: torch.Tensor) -> None:
    """Raises unless kv (B, T, C + R), weight (C,) and the caches are laid out as latent_to_cache needs."""
    C, R = cache_kv.shape[-1], cache_pe.shape[-1]
    if kv.dim() != 3 or kv.shape[2] != C + R or kv.stride(-1) != 1 or cache_kv.stride(-1) != 1 \
            or cache_pe.stride(-1) != 1 or cache_kv.stride(1) != C or cache_pe.stride(1) != R or weight.shape != (C,):
        raise ValueError(f"latent_to_cache: kv {tuple(kv.shape)} must be C + R = {C} + {R} wide with the cache "
                         f"rows and a ({C},) weight contiguous")


def angles(cos, sin, T: int, R: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if cos.shape != (T, R // 2) or sin.shape != (T, R // 2):
        raise ValueError(f"cos and sin must be ({T}, {R // 2}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    return (cos.to(device, torch.float32).contiguous(), sin.to(device, torch.float32).contiguous())
