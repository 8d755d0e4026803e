"""GGUF blocks -> dense values on the GPU (Triton), bit-exact in float32 with quant/dequant.py.

One `@triton.jit` unpacker per block type, `unpack_part`, turns part j of every block under a pointer tile
into float32 values; the dequantize kernel here and the MoE GEMV in kernels/gpu/moe.py both call it. A part
is a run of consecutive values that shares one scale (a sub-block: 16 values for Q2_K, Q3_K, Q6_K; 32 for
Q4_K, Q5_K and the 32-value types), so a part's x and output are contiguous and its scale is one number
per block. Byte positions follow the bit diagrams of quant/dequant.py, whose float32 order of operations is
kept: the scale `dl = d * sc` first, then `dl * q`, then `- dmin * m` or `+ m` last. The products are exact
in float32, so a fused multiply-add gives the same bits as separate operations.

Pointer tiles have a trailing axis of length 1 (one pointer per block), `o` is arange(part) on that axis,
and `m` masks whole blocks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dslocal.quant.ggml import TYPE_INFO, GGMLType, type_name

T = GGMLType


@triton.jit
def _u8(p, m):
    """The bytes at p as int32 (zero where masked)."""
    return tl.load(p, mask=m, other=0).to(tl.int32)


@triton.jit
def _f16(p, m):
    """The little-endian fp16 (ggml_half) at p, as float32."""
    lo = tl.load(p, mask=m, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=m, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _i8(p, m):
    """The int8 at p as float32."""
    return tl.load(p, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)


# --- 32-value blocks: one part per block; value i has its low 4 bits in byte i % 16, nibble i // 16 ----

@triton.jit
def _q4_0(p, o, m):
    q = (_u8(p + 2 + o % 16, m) >> (4 * (o // 16))) & 15
    return _f16(p, m) * (q.to(tl.float32) - 8.0)


@triton.jit
def _q4_1(p, o, m):
    q = (_u8(p + 4 + o % 16, m) >> (4 * (o // 16))) & 15
    return _f16(p, m) * q.to(tl.float32) + _f16(p + 2, m)


@triton.jit
def _q5_0(p, o, m):
    # qh is a little-endian u32 at byte 2: bit i, the fifth bit of value i, is bit i % 8 of byte 2 + i // 8
    hi = (_u8(p + 2 + o // 8, m) >> (o % 8)) & 1
    q = ((_u8(p + 6 + o % 16, m) >> (4 * (o // 16))) & 15) | (hi << 4)
    return _f16(p, m) * (q.to(tl.float32) - 16.0)


@triton.jit
def _q5_1(p, o, m):
    hi = (_u8(p + 4 + o // 8, m) >> (o % 8)) & 1
    q = ((_u8(p + 8 + o % 16, m) >> (4 * (o // 16))) & 15) | (hi << 4)
    return _f16(p, m) * q.to(tl.float32) + _f16(p + 2, m)


@triton.jit
def _q8_0(p, o, m):
    return _f16(p, m) * _i8(p + 2 + o, m)


# --- 256-value super-blocks, part j = sub-block j ------------------------------------------------------
# Q2_K, Q3_K and Q6_K pack 2-bit fields as qs[32*h + l] = q3 q2 q1 q0 with value 128*h + 32*k + l = qk,
# so sub-block j of 16 values reads bytes 32*(j // 8) + 16*(j % 2) + o at shift 2*((j % 8) // 2).

@triton.jit
def _q2_k(p, j: tl.constexpr, o, m):
    sc = _u8(p + j, m)
    dl = _f16(p + 80, m) * (sc & 15).to(tl.float32)
    ml = _f16(p + 82, m) * (sc >> 4).to(tl.float32)
    q = (_u8(p + 16 + 32 * (j // 8) + 16 * (j % 2) + o, m) >> (2 * ((j % 8) // 2))) & 3
    return dl * q.to(tl.float32) - ml


@triton.jit
def _q3_k(p, j: tl.constexpr, o, m):
    # scale j: low 4 bits in nibble j // 8 of byte 96 + j % 8, high 2 bits in field j // 4 of byte 104 + j % 4
    lo = (_u8(p + 96 + j % 8, m) >> (4 * (j // 8))) & 15
    hi = (_u8(p + 104 + j % 4, m) >> (2 * (j // 4))) & 3
    dl = _f16(p + 108, m) * ((lo | (hi << 4)).to(tl.float32) - 32.0)
    q = (_u8(p + 32 + 32 * (j // 8) + 16 * (j % 2) + o, m) >> (2 * ((j % 8) // 2))) & 3
    # hmask bit v // 32 of byte v % 32 is bit 2 of value v = 16*j + o, stored inverted
    h = (_u8(p + 16 * (j % 2) + o, m) >> (j // 2)) & 1
    return dl * (q.to(tl.float32) - 4.0 * (1 - h).to(tl.float32))


@triton.jit
def _k4_scale_min(p, j: tl.constexpr, m):
    """6-bit scale and min of sub-block j of a Q4_K / Q5_K block (get_scale_min_k4), int32."""
    if j < 4:
        sc = _u8(p + 4 + j, m) & 63
        mn = _u8(p + 8 + j, m) & 63
    else:
        lo = _u8(p + 8 + j, m)                                # byte 12 + (j - 4)
        sc = (lo & 15) | ((_u8(p + j, m) >> 6) << 4)          # byte 4 + (j - 4)
        mn = (lo >> 4) | ((_u8(p + 4 + j, m) >> 6) << 4)      # byte 8 + (j - 4)
    return sc, mn


@triton.jit
def _q4_k(p, j: tl.constexpr, o, m):
    sc, mn = _k4_scale_min(p, j, m)
    dl = _f16(p, m) * sc.to(tl.float32)
    ml = _f16(p + 2, m) * mn.to(tl.float32)
    q = (_u8(p + 16 + 32 * (j // 2) + o, m) >> (4 * (j % 2))) & 15
    return dl * q.to(tl.float32) - ml


@triton.jit
def _q5_k(p, j: tl.constexpr, o, m):
    sc, mn = _k4_scale_min(p, j, m)
    dl = _f16(p, m) * sc.to(tl.float32)
    ml = _f16(p + 2, m) * mn.to(tl.float32)
    hi = (_u8(p + 16 + o, m) >> j) & 1
    q = ((_u8(p + 48 + 32 * (j // 2) + o, m) >> (4 * (j % 2))) & 15) | (hi << 4)
    return dl * q.to(tl.float32) - ml


@triton.jit
def _q6_k(p, j: tl.constexpr, o, m):
    # value 16*j + o is r = 16*(j % 8) + o of half j // 8: low nibble r // 64 of ql[64*half + r % 64],
    # high 2 bits field r // 32 of qh[32*half + r % 32]
    lo = (_u8(p + 64 * (j // 8) + 16 * (j % 4) + o, m) >> (4 * ((j % 8) // 4))) & 15
    hi = (_u8(p + 128 + 32 * (j // 8) + 16 * (j % 2) + o, m) >> (2 * ((j % 8) // 2))) & 3
    dl = _f16(p + 208, m) * _i8(p + 192 + j, m)
    return dl * ((lo | (hi << 4)).to(tl.float32) - 32.0)


@triton.jit
def unpack_part(p, j: tl.constexpr, o, m, WTYPE: tl.constexpr):
    """float32 (..., part): values [j*part, (j+1)*part) of the WTYPE blocks at p (..., 1), masked by m."""
    if WTYPE == "Q4_K":
        w = _q4_k(p, j, o, m)
    elif WTYPE == "Q6_K":
        w = _q6_k(p, j, o, m)
    elif WTYPE == "Q8_0":
        w = _q8_0(p, o, m)
    elif WTYPE == "Q5_0":
        w = _q5_0(p, o, m)
    elif WTYPE == "Q5_K":
        w = _q5_k(p, j, o, m)
    elif WTYPE == "Q4_0":
        w = _q4_0(p, o, m)
    elif WTYPE == "Q4_1":
        w = _q4_1(p, o, m)
    elif WTYPE == "Q5_1":
        w = _q5_1(p, o, m)
    elif WTYPE == "Q2_K":
        w = _q2_k(p, j, o, m)
    else:
        tl.static_assert(WTYPE == "Q3_K", "unpack_part: unknown block type")
        w = _q3_k(p, j, o, m)
    return w


@triton.jit
def _dequant_kernel(p_raw, p_out, n_blocks, WTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, PART: tl.constexpr, BLOCK_N: tl.constexpr):
    """out (n_blocks * BLOCK_SIZE,) from raw (n_blocks * TYPE_SIZE,) bytes; BLOCK_N blocks per program."""
    i_n = tl.program_id(0)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)   # int64: a layer's blocks can pass 2^31 bytes
    m_n = (o_n < n_blocks)[:, None]
    p_b = p_raw + o_n[:, None] * TYPE_SIZE
    o_l = tl.arange(0, PART)[None, :]
    for j in tl.static_range(BLOCK_SIZE // PART):
        b_w = unpack_part(p_b, j, o_l, m_n, WTYPE)
        p_o = p_out + o_n[:, None] * BLOCK_SIZE + j * PART + o_l
        tl.store(p_o, b_w.to(p_out.dtype.element_ty), mask=m_n)


class Layout(NamedTuple):
    """How one GGML type is dequantized: a plain dtype to view the bytes as, or the Triton unpacker's part."""
    plain: torch.dtype | None   # F32 / F16 / BF16: view + cast, no kernel
    part: int                   # values per unpack_part call (one scale)
    blocks_per_program: int     # BLOCK_N of _dequant_kernel: 4096 values per program


# The one dispatch point: GGML type -> how its bytes become values.
LAYOUT: dict[GGMLType, Layout] = {
    T.F32: Layout(torch.float32, 1, 0),
    T.F16: Layout(torch.float16, 1, 0),
    T.BF16: Layout(torch.bfloat16, 1, 0),
    T.Q4_K: Layout(None, 32, 16),
    T.Q6_K: Layout(None, 16, 16),
    T.Q8_0: Layout(None, 32, 128),
    T.Q5_0: Layout(None, 32, 128),
    T.Q5_K: Layout(None, 32, 16),
    T.Q4_0: Layout(None, 32, 128),
    T.Q4_1: Layout(None, 32, 128),
    T.Q5_1: Layout(None, 32, 128),
    T.Q2_K: Layout(None, 16, 16),
    T.Q3_K: Layout(None, 16, 16),
}

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dequantize(raw: torch.Tensor, ggml_type: GGMLType, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Values from raw GGUF bytes on raw's device. raw: uint8 (..., row_bytes) -> dtype (..., n_cols)."""
    t = GGMLType(ggml_type)
    layout = LAYOUT.get(t)
    if layout is None:
        raise ValueError(f"{type_name(t)} has no GPU dequantizer; supported: {', '.join(x.name for x in LAYOUT)}")
    if raw.dtype != torch.uint8 or raw.ndim == 0:
        raise ValueError(f"dequantize takes uint8 bytes (..., row_bytes), got {raw.dtype} {tuple(raw.shape)}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize writes float32, float16 or bfloat16, not {dtype}")
    if not raw.is_contiguous():
        raise ValueError("dequantize needs contiguous bytes (a slice of whole rows is; call .contiguous())")
    info = TYPE_INFO[t]
    row_bytes = raw.shape[-1]
    if row_bytes % info.type_size:
        raise ValueError(f"a row of {row_bytes} bytes is not whole {t.name} blocks of {info.type_size} bytes")
    n_cols = row_bytes // info.type_size * info.block_size
    if layout.plain is not None:
        return raw.view(layout.plain).to(dtype)           # (..., n_cols); a no-op cast returns the view

    out = torch.empty(*raw.shape[:-1], n_cols, dtype=dtype, device=raw.device)
    n_blocks = raw.numel() // info.type_size
    if n_blocks:
        grid = (triton.cdiv(n_blocks, layout.blocks_per_program),)
        _dequant_kernel[grid](raw, out, n_blocks, WTYPE=t.name, TYPE_SIZE=info.type_size,
                              BLOCK_SIZE=info.block_size, PART=layout.part, BLOCK_N=layout.blocks_per_program)
    return out
