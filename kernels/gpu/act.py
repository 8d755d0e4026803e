"""SwiGLU's elementwise step in Triton: one kernel for silu(gate) * up, read from one matrix product's output.

Shapes: M rows, F hidden width. With the gate and up projections merged into one product (runtime/model.py
MLP.merge_gate_up) its output gu (M, 2F) holds the gate in columns :F and up in F:. torch would take a
silu kernel and a multiply kernel; this is one launch per call, a decode step's dense FFN and shared
experts each save one. Rounded as torch rounds in half precision: silu(gate) to the dtype first, then the
product to the dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_kernel(p_gu, p_h, stride_gu, F, BLOCK: tl.constexpr):
    """Grid (M, cdiv(F, BLOCK)): h[m, f] = silu(gu[m, f]) * gu[m, F + f]."""
    i_m = tl.program_id(0).to(tl.int64)
    o_f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m_f = o_f < F
    b_g = tl.load(p_gu + i_m * stride_gu + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_u = tl.load(p_gu + i_m * stride_gu + F + o_f, mask=m_f, other=0.0)
    b_s = (b_g / (1.0 + tl.exp(-b_g))).to(p_h.dtype.element_ty)
    tl.store(p_h + i_m * F + o_f, (b_s.to(tl.float32) * b_u.to(tl.float32)).to(p_h.dtype.element_ty), mask=m_f)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """gu (..., 2F) -> silu(gu[..., :F]) * gu[..., F:] (..., F), contiguous, in gu's dtype."""
    F2 = gu.shape[-1]
    if F2 % 2 or gu.stride(-1) != 1:
        raise ValueError(f"swiglu needs an even last axis, contiguous: {tuple(gu.shape)}")
    rows = gu.reshape(-1, F2) if gu.dim() != 2 else gu
    F = F2 // 2
    h = torch.empty((*gu.shape[:-1], F), dtype=gu.dtype, device=gu.device)
    if rows.shape[0]:
        _swiglu_kernel[(rows.shape[0], triton.cdiv(F, BLOCK))](rows, h, rows.stride(0), F, BLOCK=BLOCK, num_warps=4)
    return h
