"""RMSNorm in Triton, optionally fused with the residual add that precedes it in every block.

Shapes: M rows (all leading axes together), D normalized width. One program per row; the row is read once,
summed in fp32, and written once (and the new residual once), so a decode step's norms cost one launch each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(p_x, p_res, p_w, p_y, p_h, stride_x, stride_res, D, eps,
                     HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (M,): y[i] = h * rsqrt(mean(h^2) + eps) * w with h = x[i] (+ res[i], stored to new_res)."""
    i_m = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_x = tl.load(p_x + i_m * stride_x + o_d, mask=m_d, other=0.0)
    if HAS_RES:
        b_res = tl.load(p_res + i_m * stride_res + o_d, mask=m_d, other=0.0)
        # the sum is rounded to x's dtype before the norm sees it, as the model's residual stream is
        b_x = (b_x.to(tl.float32) + b_res.to(tl.float32)).to(p_x.dtype.element_ty)
        tl.store(p_h + i_m * D + o_d, b_x, mask=m_d)
    b_xf = b_x.to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_xf * b_xf, 0) / D + eps)
    b_w = tl.load(p_w + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(p_y + i_m * D + o_d, (b_xf * b_rstd * b_w).to(p_y.dtype.element_ty), mask=m_d)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """t (..., D) as an (M, D) view with one row stride; raises if the layout has none."""
    if t.stride(-1) != 1:
        raise ValueError(f"rms_norm needs {name} contiguous along its last axis")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"rms_norm needs the rows of {name} evenly strided; pass {name}.contiguous()") from None


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm in fp32, y in x's dtype (kernels/ref.py::rms_norm). With a residual, x + residual is
    normalized and returned as the new residual, else x itself is. x, residual (..., D), weight (D,)
    -> y (..., D), new_residual (..., D), both contiguous when made here."""
    D = x.shape[-1]
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rms_norm does not take {x.dtype} input")
    if weight.shape != (D,) or not weight.is_contiguous() or weight.device != x.device:
        raise ValueError(f"rms_norm weight must be a contiguous ({D},) tensor on {x.device}")
    x2 = _rows(x, "x")                                                                # (M, D)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"rms_norm residual {tuple(residual.shape)} {residual.dtype} must match x "
                             f"{tuple(x.shape)} {x.dtype} on one device")
        res2 = _rows(residual, "residual")                                            # (M, D)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        res2, h = x2, x
    if x2.shape[0] == 0:
        return y, h
    block_d = triton.next_power_of_2(D)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2, weight, y, h, x2.stride(0), res2.stride(0), D, eps,
        HAS_RES=residual is not None, BLOCK_D=block_d, num_warps=min(16, max(1, block_d // 256)))
    return y, h
