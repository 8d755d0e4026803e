"""MLA decode attention over the latent cache in Triton: flash-decoding, heads taken in blocks.

Shapes: B batch, T new tokens (queries), H heads, C kv_lora_rank, R rope dim, S_max cache length, P splits.
In the absorbed form (DeepSeek-V2 paper section 2.1; runtime/model.py MLA.forward) every head scores the
latent c_kv with q_lat = wk_b^T q_nope plus the roped key with q_pe, and reads its output from c_kv itself.
So one cache tile (BLOCK_N positions of C + R values) serves a whole block of query rows (t, h) for both
products, and the cache is read once per (batch, head block) instead of once per head.
Stage 1 splits the positions over P programs per (batch, head block), each with an online softmax
(Milakov & Gimelshein 2018); stage 2 merges the P partial outputs by their log-sum-exp (flash-decoding).
`length` may be a 0-d integer device tensor (plus a fixed length_add): the grid then depends only on S_max, and a captured CUDA graph
replays at any length up to S_max (splits past the length find no positions and exit).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

BLOCK_H = 16           # query rows per program: the smallest tl.dot tile
MIN_BLOCKS_PER_SPLIT = 4   # a split's q load and merge cost are paid back over at least this many tiles
PROGRAMS_PER_SM = 2    # stage-1 programs wanted per SM when splitting


@triton.jit
def _split_len(length, n_split, BLOCK_N: tl.constexpr):
    """Positions per split, a whole number of tiles."""
    return tl.cdiv(tl.cdiv(length, n_split), BLOCK_N) * BLOCK_N


@triton.jit(do_not_specialize=["length"])
def _mla_split_kernel(p_q, p_qpe, p_kv, p_pe, p_len, p_opart, p_lse, length, len_add, scale_log2e,
                      stride_q_b, stride_q_t, stride_q_h, stride_qpe_b, stride_qpe_t, stride_qpe_h,
                      stride_kv_b, stride_kv_s, stride_pe_b, stride_pe_s, T, H, C, R, n_split,
                      LEN_ON_DEVICE: tl.constexpr, DOT_IEEE: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (B, cdiv(T*H, BLOCK_H), P): rows t*H + h of batch i_b over split i_p of the positions.
    Writes the split's normalized output opart (B*T*H, P, C) and its log2-sum-exp lse (B*T*H, P)."""
    i_b, i_h, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if LEN_ON_DEVICE:
        length = tl.load(p_len).to(tl.int32) + len_add
    TH = T * H
    o_row = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_row = o_row < TH
    # causal: query t sits at position length - T + t and sees the positions up to it
    n_seen = length - T + o_row // H + 1
    split = _split_len(length, n_split, BLOCK_N)
    s_lo = i_p * split
    s_hi = tl.minimum(s_lo + split, length)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R

    o_t, o_h = o_row // H, o_row % H
    p_q_rows = p_q + i_b.to(tl.int64) * stride_q_b + o_t * stride_q_t + o_h * stride_q_h
    p_qpe_rows = p_qpe + i_b.to(tl.int64) * stride_qpe_b + o_t * stride_qpe_t + o_h * stride_qpe_h
    b_q = tl.load(p_q_rows[:, None] + o_c[None, :], mask=m_row[:, None] & m_c[None, :],
                  other=0.0).to(tl.float32)                                          # (BLOCK_H, BLOCK_C)
    b_qpe = tl.load(p_qpe_rows[:, None] + o_r[None, :], mask=m_row[:, None] & m_r[None, :],
                    other=0.0).to(tl.float32)                                        # (BLOCK_H, BLOCK_R)
    # With a 16-bit cache the products run on 16-bit tensor cores. Rounding q to bf16 alone costs up to 5e-3
    # relative error in the output (a torch emulation at V2-Lite shapes), so q goes in as a high and a low 16-bit part:
    # two dots for the scores, and q is as good as fp32. The probabilities p in [0, 1] are rounded once.
    b_q_hi = b_q.to(p_kv.dtype.element_ty)
    b_q_lo = (b_q - b_q_hi.to(tl.float32)).to(p_kv.dtype.element_ty)
    b_qpe_hi = b_qpe.to(p_kv.dtype.element_ty)
    b_qpe_lo = (b_qpe - b_qpe_hi.to(tl.float32)).to(p_kv.dtype.element_ty)
    p_kv_b = p_kv + i_b.to(tl.int64) * stride_kv_b
    p_pe_b = p_pe + i_b.to(tl.int64) * stride_pe_b

    b_m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_H], tl.float32)
    b_acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_N):
        o_s = s0 + tl.arange(0, BLOCK_N)
        m_s = o_s < s_hi
        b_kv = tl.load(p_kv_b + o_s[:, None] * stride_kv_s + o_c[None, :], mask=m_s[:, None] & m_c[None, :],
                       other=0.0)                                                    # (BLOCK_N, BLOCK_C)
        b_pe = tl.load(p_pe_b + o_s[:, None] * stride_pe_s + o_r[None, :], mask=m_s[:, None] & m_r[None, :],
                       other=0.0)                                                    # (BLOCK_N, BLOCK_R)
        if DOT_IEEE:
            b_score = tl.dot(b_q, tl.trans(b_kv), input_precision="ieee")
            b_score = tl.dot(b_qpe, tl.trans(b_pe), acc=b_score, input_precision="ieee")
        else:
            b_score = tl.dot(b_q_hi, tl.trans(b_kv))
            b_score = tl.dot(b_q_lo, tl.trans(b_kv), acc=b_score)
            b_score = tl.dot(b_qpe_hi, tl.trans(b_pe), acc=b_score)
            b_score = tl.dot(b_qpe_lo, tl.trans(b_pe), acc=b_score)                # (BLOCK_H, BLOCK_N)
        b_score = b_score * scale_log2e
        m_seen = (o_s[None, :] < n_seen[:, None]) & m_s[None, :]
        b_score = tl.where(m_seen, b_score, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_score, 1))
        # a row that has seen no position yet still has max -inf: shift by 0 so exp2 gives 0, not nan
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_shift)
        b_p = tl.exp2(b_score - b_shift[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if DOT_IEEE:
            b_acc = tl.dot(b_p, b_kv, acc=b_acc * b_alpha[:, None], input_precision="ieee")
        else:
            b_acc = tl.dot(b_p.to(b_kv.dtype), b_kv, acc=b_acc * b_alpha[:, None])
        b_m = b_m_new

    b_l_safe = tl.where(b_l > 0, b_l, 1.0)
    b_lse = tl.where(b_l > 0, b_m + tl.log2(b_l_safe), float("-inf"))
    b_o = b_acc / b_l_safe[:, None]
    o_part = (i_b.to(tl.int64) * TH + o_row) * n_split + i_p
    tl.store(p_opart + o_part[:, None] * C + o_c[None, :], b_o, mask=m_row[:, None] & m_c[None, :])
    tl.store(p_lse + o_part, b_lse, mask=m_row)


@triton.jit(do_not_specialize=["length"])
def _mla_merge_kernel(p_opart, p_lse, p_o, p_len, length, len_add, C, n_split, LEN_ON_DEVICE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (B*T*H,): o[row] = sum_p 2^(lse_p - lse) opart[row, p] over the splits that hold positions."""
    i_row = tl.program_id(0).to(tl.int64)
    if LEN_ON_DEVICE:
        length = tl.load(p_len).to(tl.int32) + len_add
    n_used = tl.cdiv(length, _split_len(length, n_split, BLOCK_N))
    o_p = tl.arange(0, BLOCK_P)
    b_lse = tl.load(p_lse + i_row * n_split + o_p, mask=o_p < n_used, other=float("-inf"))
    b_max = tl.max(b_lse, 0)
    b_den = tl.sum(tl.exp2(b_lse - b_max), 0)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    b_acc = tl.zeros([BLOCK_C], tl.float32)
    for i_p in range(0, n_used):
        w = tl.exp2(tl.load(p_lse + i_row * n_split + i_p) - b_max)
        b_acc += w * tl.load(p_opart + (i_row * n_split + i_p) * C + o_c, mask=m_c, other=0.0)
    tl.store(p_o + i_row * C + o_c, b_acc / b_den, mask=m_c)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2   # the Triton interpreter on the CPU: a nominal count that still makes several splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def _n_split(B: int, n_hblock: int, S: int, block_n: int, device: torch.device) -> int:
    """Splits per (batch, head block): enough programs to fill the GPU, each with a few tiles of work."""
    want = math.ceil(PROGRAMS_PER_SM * _sm_count(device) / (B * n_hblock))
    return max(1, min(want, math.ceil(S / (block_n * MIN_BLOCKS_PER_SPLIT))))


def _check(q_lat, q_pe, kv, pe, length) -> None:
    if q_lat.dim() != 4 or q_pe.dim() != 4 or kv.dim() != 3 or pe.dim() != 3:
        raise ValueError("mla_decode wants q_lat (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C), pe (B, S, R)")
    B, T, H, C = q_lat.shape
    R, S_max = q_pe.shape[3], kv.shape[1]
    if q_pe.shape[:3] != (B, T, H) or kv.shape != (B, S_max, C) or pe.shape != (B, S_max, R):
        raise ValueError(f"mla_decode shapes disagree: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"kv {tuple(kv.shape)}, pe {tuple(pe.shape)}")
    if q_lat.stride(3) != 1 or q_pe.stride(3) != 1 or kv.stride(2) != 1 or pe.stride(2) != 1:
        raise ValueError("mla_decode needs q_lat, q_pe, kv and pe contiguous along their last axis")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if kv.dtype not in floats or pe.dtype != kv.dtype or q_lat.dtype not in floats or q_pe.dtype not in floats:
        raise ValueError(f"mla_decode dtypes: kv {kv.dtype}, pe {pe.dtype} (must match, fp32/fp16/bf16), "
                         f"q_lat {q_lat.dtype}, q_pe {q_pe.dtype}")
    if len({t.device for t in (q_lat, q_pe, kv, pe)}) != 1:
        raise ValueError("mla_decode inputs are on different devices")
    if isinstance(length, torch.Tensor):
        if length.numel() != 1 or length.dtype not in (torch.int32, torch.int64) or length.device != kv.device:
            raise ValueError("a tensor length must be one int32 or int64 value on the cache's device")
    elif not T <= length <= S_max:
        raise ValueError(f"length {length} must lie between T = {T} and the cache length {S_max}")


def mla_decode(q_lat, q_pe, kv, pe, length, scale, length_add=0):
    """Absorbed MLA attention of the last T of `length` cached positions (kernels/ref.py::mla_decode).
    q_lat (B, T, H, C), q_pe (B, T, H, R), kv (B, S_max, C), pe (B, S_max, R), length int or 0-d int32 / int64
    device tensor, to which the kernels add length_add (a decode step passes its position and T: no kernel
    computes the sum first; T <= length <= S_max is then the caller's duty) -> o_lat (B, T, H, C) fp32."""
    if not isinstance(length, torch.Tensor):
        length, length_add = int(length) + length_add, 0
    _check(q_lat, q_pe, kv, pe, length)
    B, T, H, C = q_lat.shape
    R, S_max = q_pe.shape[3], kv.shape[1]
    on_device = isinstance(length, torch.Tensor)
    block_n = 32 if kv.element_size() == 2 else 16   # fp32 tiles are twice the bytes: keep shared memory alike
    n_hblock = triton.cdiv(T * H, BLOCK_H)
    n_split = _n_split(B, n_hblock, S_max if on_device else length, block_n, kv.device)
    opart = torch.empty(B * T * H, n_split, C, dtype=torch.float32, device=kv.device)
    lse = torch.empty(B * T * H, n_split, dtype=torch.float32, device=kv.device)
    out = torch.empty(B, T, H, C, dtype=torch.float32, device=kv.device)
    p_len = length if on_device else lse    # never read when the length is a python int
    n = 0 if on_device else int(length)
    block_c = max(16, triton.next_power_of_2(C))
    block_r = max(16, triton.next_power_of_2(R))
    _mla_split_kernel[(B, n_hblock, n_split)](
        q_lat, q_pe, kv, pe, p_len, opart, lse, n, int(length_add), scale * math.log2(math.e),
        *q_lat.stride()[:3], *q_pe.stride()[:3], *kv.stride()[:2], *pe.stride()[:2], T, H, C, R, n_split,
        LEN_ON_DEVICE=on_device, DOT_IEEE=kv.dtype == torch.float32, BLOCK_H=BLOCK_H, BLOCK_N=block_n,
        BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4, num_stages=2)
    _mla_merge_kernel[(B * T * H,)](
        opart, lse, out, p_len, n, int(length_add), C, n_split, LEN_ON_DEVICE=on_device, BLOCK_N=block_n,
        BLOCK_P=triton.next_power_of_2(n_split), BLOCK_C=block_c, num_warps=4)
    return out
