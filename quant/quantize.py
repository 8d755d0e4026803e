"""Quantize float arrays to raw GGUF block bytes (ggml/src/ggml-quants.c quantize_row_*_ref).

Plain and 32-value types live here and match gguf-py's `gguf.quants.quantize` byte for byte; the K-quants
(256-value super-blocks) are in quant/quantize_k.py.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from dslocal.quant import quantize_k
from dslocal.quant.ggml import TYPE_INFO, GGMLType, type_name

# Blocks are quantized this many values at a time: the K-quant searches then keep their 256 KiB float32
# temporaries in L2 cache (measured fastest of 2^14..2^20), and a large tensor never needs full-size copies.
_CHUNK_VALUES = 1 << 16


def quantize(values: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """Raw GGUF bytes from float values. values: float (..., n_cols) -> uint8 (..., row_bytes)."""
    quantize_blocks = _QUANTIZERS.get(ggml_type)
    if quantize_blocks is None:
        names = ", ".join(t.name for t in _QUANTIZERS)
        raise ValueError(f"cannot quantize to {type_name(ggml_type)}; supported types are {names}")
    info = TYPE_INFO[ggml_type]
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0:
        raise ValueError("cannot quantize a scalar; pass an array of rows (..., n_cols)")
    values = np.ascontiguousarray(values)
    n_cols = values.shape[-1]
    if n_cols % info.block_size:
        raise ValueError(f"{type_name(ggml_type)} stores rows in blocks of {info.block_size} values, and a row "
                         f"of {n_cols} is not a multiple of it; pad the rows or choose another type")
    blocks = values.reshape(-1, info.block_size)           # (n_blocks, block_size)
    out = np.empty((blocks.shape[0], info.type_size), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // info.block_size)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = quantize_blocks(blocks[start:start + step])
    return out.reshape(*values.shape[:-1], n_cols // info.block_size * info.type_size)


# ---------------------------------------------------------------------------------------------- helpers

def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> uint8 (n, 2): GGML_FP32_TO_FP16 (round to nearest even), little-endian."""
    return v.astype("<f2").view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d is 0 (ggml: `id = d ? 1.0f/d : 0.0f`)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _truncate(v: np.ndarray, top: int) -> np.ndarray:
    """C's `MIN(top, (int8_t)v)` for v >= 0: truncate toward zero, cap at top."""
    return np.minimum(np.trunc(v), top).astype(np.uint8)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf: halves go away from zero (np.rint would send them to even). Exact: v - trunc(v) is exact."""
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= 0.5)


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """float32 (n, m) -> (n, 1): the value of largest magnitude with its sign; the first one on ties."""
    i = np.abs(blocks).argmax(axis=1)[:, None]
    return np.take_along_axis(blocks, i, axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 (n, 32) -> (n, 16): byte j holds q[j] in bits 3..0 and q[j+16] in bits 7..4 (bit 4 dropped)."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _pack_fifth_bits(q: np.ndarray) -> np.ndarray:
    """uint8 (n, 32) -> (n, 4): the u32 qh of Q5_0/Q5_1, bit j = bit 4 of q[j], little-endian."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


# ------------------------------------------------------------------------------------- plain float types

def _quantize_f32(blocks: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> uint8 (n, 4)."""
    return blocks.astype("<f4").view(np.uint8)


def _quantize_f16(blocks: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> uint8 (n, 2)."""
    return _f16_bytes(blocks)


def _quantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16 (ggml-impl.h), the top 16 bits rounded to even: float32 (n, 1) -> uint8 (n, 2)."""
    bits = blocks.view(np.uint32)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    # A NaN keeps its top bits and gets the quiet bit set; rounding could carry it into an infinity.
    quiet_nan = (bits >> 16) | 0x40
    # Adding 0x7FFF plus the bit that will become the lowest one rounds ties to even; no finite or infinite
    # value overflows 32 bits here (the largest is -inf, 0xFF800000).
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(is_nan, quiet_nan, rounded).astype("<u2").view(np.uint8)


# ------------------------------------------------------------------------------ 32-value block types
# In every block q[j] is value j, fp16 fields are little-endian, and the nibble bytes are
#   qs[j], j = 0..15:  bits 7..4 = q[j+16] & 0xF | bits 3..0 = q[j] & 0xF
# The symmetric types (_0) put the block's signed extreme at q = 0, d = max / -2^(bits-1), so the wider
# side of the [-2^(bits-1), 2^(bits-1) - 1] range points at it; the _1 types span [min, max] with d and m.

# block_q4_0, 18 bytes: d f16 @0 | qs[16] @2.  w = d * (q - 8)
def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0_ref: float32 (n, 32) -> uint8 (n, 18)."""
    d = _signed_absmax(blocks) / np.float32(-8)
    q = _truncate(blocks * _inverse(d) + np.float32(8.5), 15)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


# block_q4_1, 20 bytes: d f16 @0 | m f16 @2 | qs[16] @4.  w = d * q + m
def _quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_1_ref: float32 (n, 32) -> uint8 (n, 20)."""
    lo = blocks.min(axis=1, keepdims=True)
    d = (blocks.max(axis=1, keepdims=True) - lo) / np.float32(15)
    q = _truncate((blocks - lo) * _inverse(d) + np.float32(0.5), 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1)


# block_q5_0, 22 bytes: d f16 @0 | qh u32 @2 | qs[16] @6.  w = d * (q - 16)
#   qh bit j = bit 4 of q[j];  qs holds the low nibbles
def _quantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_0_ref: float32 (n, 32) -> uint8 (n, 22)."""
    d = _signed_absmax(blocks) / np.float32(-16)
    q = _truncate(blocks * _inverse(d) + np.float32(16.5), 31)
    return np.concatenate([_f16_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q)], axis=1)


# block_q5_1, 24 bytes: d f16 @0 | m f16 @2 | qh u32 @4 | qs[16] @8.  w = d * q + m
def _quantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_1_ref: float32 (n, 32) -> uint8 (n, 24)."""
    lo = blocks.min(axis=1, keepdims=True)
    d = (blocks.max(axis=1, keepdims=True) - lo) / np.float32(31)
    q = _truncate((blocks - lo) * _inverse(d) + np.float32(0.5), 31)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_fifth_bits(q), _pack_nibbles(q)], axis=1)


# block_q8_0, 34 bytes: d f16 @0 | qs int8[32] @2.  w = d * q, d = amax / 127
def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref: float32 (n, 32) -> uint8 (n, 34)."""
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(blocks * _inverse(d))
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


# The one dispatch point: float32 blocks (n_blocks, block_size) -> uint8 (n_blocks, type_size).
_QUANTIZERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _quantize_f32,
    GGMLType.F16: _quantize_f16,
    GGMLType.BF16: _quantize_bf16,
    GGMLType.Q4_0: _quantize_q4_0,
    GGMLType.Q4_1: _quantize_q4_1,
    GGMLType.Q5_0: _quantize_q5_0,
    GGMLType.Q5_1: _quantize_q5_1,
    GGMLType.Q8_0: _quantize_q8_0,
    GGMLType.Q2_K: quantize_k.quantize_q2_k,
    GGMLType.Q3_K: quantize_k.quantize_q3_k,
    GGMLType.Q4_K: quantize_k.quantize_q4_k,
    GGMLType.Q5_K: quantize_k.quantize_q5_k,
    GGMLType.Q6_K: quantize_k.quantize_q6_k,
}
