"""Linear layers whose weights stay in their GGUF blocks on the GPU: the attention projections, shared
experts, dense FFNs and head of a placed model (offload/hybrid.py), at the file's size instead of bf16's.

Letters: M tokens (rows of x), N n_in, O n_out.

- M <= GEMV_TOKENS (decode): a GEMV straight from the blocks, in float32, with no host synchronisation, so a
  CUDA graph captures it. Q4_K and Q6_K on CUDA take kernels/gpu/gemv.py (Q6_K then kept as planes, not
  rows); other types, and the Triton interpreter, one program per (token, BLOCK_R output rows) looping over
  the rows' blocks (kernels/gpu/moe.py rows_dot, the routed experts' loop).
- More tokens (prompts): the matrix dequantized to x's dtype (kernels/gpu/dequant.py, bit-exact) and
  multiplied by torch; the dense copy lives for that one product.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as Fn
import triton
import triton.language as tl

from dslocal.kernels.gpu import gemv
from dslocal.kernels.gpu.dequant import dequantize
from dslocal.kernels.gpu.moe import KEEP_BLOCKS, gemv_meta, rows_dot
from dslocal.quant.ggml import TYPE_INFO, GGMLType

GEMV_TOKENS = 8        # at most this many tokens take the GEMV
BLOCK_R = 8            # output rows per program (one token, H200: 8 beat 4 and 16 on most V2-Lite and V3 shapes)
VALUES_PER_STEP = 512  # columns per loop step: two K-quant super-blocks, sixteen 32-value blocks
NUM_WARPS = 4


@triton.jit
def _gemv_kernel(p_x, p_w, p_y, N, O, row_stride, W_TYPE: tl.constexpr, W_BS: tl.constexpr, W_TS: tl.constexpr,
                 W_PART: tl.constexpr, W_BB: tl.constexpr, W_EVEN: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[t, r] = w[r] . x[t] for BLOCK_R rows r; x (M, N), w (O, row_stride) bytes, y (M, O)."""
    i_t, i_r = tl.program_id(0), tl.program_id(1)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)    # a head's blocks can pass 2^31 bytes
    m_r = o_r < O
    b_y = rows_dot(p_w, o_r, m_r, row_stride, N, p_x + i_t * N, W_TYPE, W_BS, W_TS, W_PART, W_BB, W_EVEN, BLOCK_R)
    tl.store(p_y + i_t * O + o_r, b_y.to(p_y.dtype.element_ty), mask=m_r)


class BlockWeight:
    """A linear layer's (O, N) weight as GGUF blocks on a device: `blocks` uint8 (O, row_bytes(N)), the file's
    rows, or for Q6_K under kernels/gpu/gemv.py (`planar`) the same bytes as gemv.q6k_planes.

    Made from the file's rows (anywhere) for `device` (default: where the rows are); rearranged before the
    move, so a host copy costs no extra device memory. Called on x (..., N) it returns x @ W.T (..., O) in x's
    dtype. Not a tensor: nn.Module.to() leaves it where it was made, on the device the plan chose."""

    def __init__(self, rows: torch.Tensor, ggml_type: GGMLType, n_in: int, device: torch.device | None = None):
        t = GGMLType(ggml_type)
        if t not in KEEP_BLOCKS:
            raise ValueError(f"{t.name} weights are not kept as blocks on the GPU, only "
                             f"{', '.join(sorted(x.name for x in KEEP_BLOCKS))}")
        info = TYPE_INFO[t]
        want = n_in // info.block_size * info.type_size
        if rows.dtype != torch.uint8 or rows.ndim != 2 or rows.shape[1] != want or n_in % info.block_size \
                or not rows.is_contiguous():
            raise ValueError(f"a {t.name} weight of {n_in} columns needs contiguous uint8 blocks (rows, {want}), "
                             f"got {rows.dtype} {tuple(rows.shape)}")
        device = rows.device if device is None else torch.device(device)
        self.fast = t in gemv.TYPES and gemv.usable(device)      # one-token products by kernels/gpu/gemv.py
        self.planar = self.fast and t == GGMLType.Q6_K
        self.blocks = (gemv.q6k_planes(rows) if self.planar else rows).to(device)
        self.ggml_type, self.n_in = t, n_in

    @property
    def n_out(self) -> int:
        return self.blocks.shape[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def rows(self) -> torch.Tensor:
        """The file's rows: uint8 (O, row_bytes(N)), a view where they are kept as such."""
        return gemv.q6k_rows(self.blocks, self.n_in) if self.planar else self.blocks

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)

    def merged_with(self, other: BlockWeight) -> BlockWeight | None:
        """One weight holding this one's rows, then other's, both becoming views of it (no extra memory), so
        one product computes both; None where the two differ in type or columns."""
        if not isinstance(other, BlockWeight) or (other.ggml_type, other.n_in, other.planar) != \
                (self.ggml_type, self.n_in, self.planar):
            return None
        both = copy.copy(self)
        both.blocks = torch.cat([self.blocks, other.blocks])
        self.blocks, other.blocks = both.blocks[:self.n_out], both.blocks[self.n_out:]
        return both


def linear(x: torch.Tensor, w: BlockWeight) -> torch.Tensor:
    """x (..., N) float -> x @ W.T (..., O) in x's dtype, W in GGUF blocks on x's device."""
    if x.shape[-1] != w.n_in or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float (..., {w.n_in}), got {x.dtype} {tuple(x.shape)}")
    if x.device != w.blocks.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.blocks.device}")
    M = x.numel() // w.n_in
    if M > GEMV_TOKENS:
        return Fn.linear(x, dequantize(w.rows(), w.ggml_type, x.dtype))
    x2 = x.reshape(M, w.n_in).contiguous()
    y = torch.empty(M, w.n_out, dtype=x.dtype, device=x.device)
    if M and w.fast:
        gemv.gemv(x2, w.blocks, w.ggml_type, w.n_in, y)
    elif M:
        _gemv_kernel[(M, triton.cdiv(w.n_out, BLOCK_R))](
            x2, w.blocks, y, w.n_in, w.n_out, w.blocks.stride(0),
            **gemv_meta(w.ggml_type, w.n_in, "W", KEEP_BLOCKS, VALUES_PER_STEP), BLOCK_R=BLOCK_R, num_warps=NUM_WARPS)
    return y.reshape(*x.shape[:-1], w.n_out)
