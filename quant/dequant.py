"""Reference dequantizers: raw GGUF block bytes -> float32, in plain numpy, bit-exact with gguf-py.

Each `_dequant_*` takes the blocks of one type, uint8 (n_blocks, type_size), and returns float32
(n_blocks, block_size). They follow the block structs of ggml/src/ggml-common.h and the order of
operations of `dequantize_row_*` in ggml/src/ggml-quants.c, which gguf-py's quants.py also keeps:
a scale is formed first (`dl = d * sc`, in float32), then multiplied by the integer quant, and a
minimum, if any, is added or subtracted last (`dl * q - dmin * m`). All products are exact in
float32 (at most 11 + 7 + 6 significant bits), so only that final add or subtract rounds.

All multi-byte fields are little-endian, as GGUF stores them. Bit diagrams list bytes top to bottom,
bits most significant first.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from dslocal.quant.ggml import TYPE_INFO, GGMLType, type_name
from dslocal.quant.gguf_file import GGUFError, GGUFFile

# Values dequantized per step: bounds the temporaries of a large tensor to tens of MiB.
_CHUNK_VALUES = 1 << 22


def dequantize(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """float32 values from raw GGUF bytes. raw: uint8 (..., row_bytes) -> float32 (..., n_cols)."""
    dequant_blocks = _DEQUANT.get(ggml_type)
    if dequant_blocks is None:
        supported = ", ".join(t.name for t in _DEQUANT)
        raise ValueError(f"{type_name(ggml_type)} is not supported; dslocal dequantizes {supported}")
    if raw.dtype != np.uint8 or raw.ndim == 0:
        raise ValueError(f"dequantize takes uint8 bytes (..., row_bytes), got {raw.dtype} {raw.shape}")
    info = TYPE_INFO[ggml_type]
    row_bytes = raw.shape[-1]
    if row_bytes % info.type_size:
        raise ValueError(f"a row of {row_bytes} bytes is not whole {type_name(ggml_type)} blocks "
                         f"of {info.type_size} bytes")

    blocks = raw.reshape(-1, info.type_size)   # a view unless raw's rows are strided
    out = np.empty((blocks.shape[0], info.block_size), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // info.block_size)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = dequant_blocks(blocks[start:start + step])
    return out.reshape(*raw.shape[:-1], row_bytes // info.type_size * info.block_size)


# --- small helpers ----------------------------------------------------------------------------------

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """float32 (n_blocks, 1) from the fp16 (ggml_half) at byte offset `at` of every block."""
    return blocks[:, at:at + 2].view("<f2").astype(np.float32)


def _bit_fields(x: np.ndarray, bits: int) -> np.ndarray:
    """uint8 (..., L) -> uint8 (..., 8 // bits, L): field k holds bits [k*bits, (k+1)*bits) of each byte."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]   # (8 // bits, 1)
    return (x[..., None, :] >> shifts) & np.uint8((1 << bits) - 1)


# --- plain types: one value per "block" ---------------------------------------------------------------

def _dequant_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view("<f4").astype(np.float32, copy=False)


def _dequant_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view("<f2").astype(np.float32)


def _dequant_bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an fp32 (ggml_bf16_to_fp32 in ggml-impl.h): shift the bits, keep NaN payloads.
    return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


# --- 32-value blocks ----------------------------------------------------------------------------------

def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    # block_q4_0, 18 bytes:
    #   0..1   d       fp16
    #   2..17  qs[16]  byte j = hi:lo nibbles, value j = lo, value j + 16 = hi
    # w = d * (q - 8)
    d = _f16(blocks, 0)                                    # (n, 1)
    q = _bit_fields(blocks[:, 2:18], 4).reshape(-1, 32)    # (n, 2, 16) -> (n, 32)
    return d * (q.astype(np.float32) - 8)


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    # block_q4_1, 20 bytes:
    #   0..1   d       fp16
    #   2..3   m       fp16 (the block minimum)
    #   4..19  qs[16]  as in Q4_0: value j = lo nibble of byte j, value j + 16 = hi nibble
    # w = d * q + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _bit_fields(blocks[:, 4:20], 4).reshape(-1, 32)
    return d * q.astype(np.float32) + m


def _five_bit_quants(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """uint8 (n, 32) 5-bit quants of Q5_0/Q5_1: 4 low bits from qs[16] nibbles, bit 4 from qh (a u32)."""
    low = _bit_fields(qs, 4).reshape(-1, 32)
    high = np.unpackbits(qh, axis=-1, bitorder="little")   # (n, 32): value i gets bit i of the LE u32
    return low | (high << 4)


def _dequant_q5_0(blocks: np.ndarray) -> np.ndarray:
    # block_q5_0, 22 bytes:
    #   0..1   d       fp16
    #   2..5   qh      u32, bit i = bit 4 of value i
    #   6..21  qs[16]  low 4 bits: value j = lo nibble of byte j, value j + 16 = hi nibble
    # w = d * (q - 16)
    d = _f16(blocks, 0)
    q = _five_bit_quants(blocks[:, 2:6], blocks[:, 6:22])
    return d * (q.astype(np.float32) - 16)


def _dequant_q5_1(blocks: np.ndarray) -> np.ndarray:
    # block_q5_1, 24 bytes:
    #   0..1   d       fp16
    #   2..3   m       fp16 (the block minimum)
    #   4..7   qh      u32, bit i = bit 4 of value i
    #   8..23  qs[16]  low 4 bits as in Q5_0
    # w = d * q + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _five_bit_quants(blocks[:, 4:8], blocks[:, 8:24])
    return d * q.astype(np.float32) + m


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    # block_q8_0, 34 bytes:
    #   0..1   d       fp16
    #   2..33  qs[32]  int8, value i = qs[i]
    # w = d * q
    d = _f16(blocks, 0)
    return d * blocks[:, 2:34].view(np.int8).astype(np.float32)


# --- 256-value super-blocks (k-quants) ----------------------------------------------------------------

def _dequant_q2_k(blocks: np.ndarray) -> np.ndarray:
    # block_q2_K, 84 bytes, 16 sub-blocks of 16 values:
    #   0..15   scales[16]  byte s = mmmm ssss: sub-block s has scale ssss and min mmmm
    #   16..79  qs[64]      2-bit quants; two halves of 32 bytes, each byte packs 4 quants:
    #                       qs[32*h + l] = q3 q2 q1 q0, value 128*h + 32*k + l = qk
    #   80..81  d           fp16, scale of the scales
    #   82..83  dmin        fp16, scale of the mins
    # w = (d * scale) * q - (dmin * min), the sub-block of value i being i // 16
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).astype(np.float32))[:, :, None]   # (n, 16, 1)
    ml = (dmin * (scales >> 4).astype(np.float32))[:, :, None]  # (n, 16, 1)
    q = _bit_fields(blocks[:, 16:80].reshape(n, 2, 32), 2)      # (n, 2 halves, 4 shifts, 32)
    q = q.reshape(n, 16, 16).astype(np.float32)                 # (n, sub-block, value)
    return (dl * q - ml).reshape(n, 256)


def _dequant_q3_k(blocks: np.ndarray) -> np.ndarray:
    # block_q3_K, 110 bytes, 16 sub-blocks of 16 values:
    #   0..31    hmask[32]   bit 2 of each quant, stored inverted: hmask[l] bit b belongs to
    #                        value 32*b + l, and a 0 bit subtracts 4
    #   32..95   qs[64]      low 2 bits, packed as Q2_K's qs: qs[32*h + l] = q3 q2 q1 q0,
    #                        value 128*h + 32*k + l = qk
    #   96..107  scales[12]  16 6-bit scales s0..s15, each stored as scale + 32:
    #                          byte j (j < 8)  s(8+j) low 4 | s(j) low 4
    #                          byte 8 + j      s(12+j) high 2 | s(8+j) high 2 | s(4+j) high 2 | s(j) high 2
    #   108..109 d           fp16
    # w = (d * (scale - 32)) * (low2 - 4 * (1 - hbit))
    n = blocks.shape[0]
    d = _f16(blocks, 108)
    low = _bit_fields(blocks[:, 96:104], 4).reshape(n, 16)      # (n, 2, 8) -> scale s at 8*(s//8) + s%8
    high = _bit_fields(blocks[:, 104:108], 2).reshape(n, 16)    # (n, 4, 4) -> scale s at 4*(s//4) + s%4
    scales = (low | (high << 4)).astype(np.float32) - 32
    dl = (d * scales)[:, :, None]                               # (n, 16, 1)
    q_low = _bit_fields(blocks[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 256)
    h_bit = _bit_fields(blocks[:, 0:32], 1).reshape(n, 256)     # (n, 8 bits, 32) -> value 32*b + l
    q = q_low.astype(np.float32) - 4 * (h_bit == 0).astype(np.float32)
    return (dl * q.reshape(n, 16, 16)).reshape(n, 256)


def _k4_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 12) -> 8 6-bit scales and 8 6-bit mins, uint8 (n, 8) each (get_scale_min_k4, ggml-quants.c).

    With s0..s7 the scales and m0..m7 the mins, the 12 bytes are:
      bytes 0..3    s(4+j):2 (high) | s(j):6       (byte j)
      bytes 4..7    m(4+j):2 (high) | m(j):6       (byte 4 + j)
      bytes 8..11   m(4+j):4 (low)  | s(4+j):4 (low)   (byte 8 + j)
    """
    b_sc, b_m, b_lo = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([b_sc & 0x3F, (b_lo & 0x0F) | ((b_sc >> 6) << 4)], axis=-1)
    m = np.concatenate([b_m & 0x3F, (b_lo >> 4) | ((b_m >> 6) << 4)], axis=-1)
    return sc, m


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    # block_q4_K, 144 bytes, 8 sub-blocks of 32 values:
    #   0..1     d           fp16, scale of the scales
    #   2..3     dmin        fp16, scale of the mins
    #   4..15    scales[12]  8 6-bit scales and 8 6-bit mins, see _k4_scales_mins
    #   16..143  qs[128]     4 chunks of 32 bytes: qs[32*c + l] = hi:lo,
    #                        value 64*c + l = lo, value 64*c + 32 + l = hi
    # w = (d * scale) * q - (dmin * min), the sub-block of value i being i // 32
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k4_scales_mins(blocks[:, 4:16])
    dl = (d * sc.astype(np.float32))[:, :, None]                # (n, 8, 1)
    ml = (dmin * m.astype(np.float32))[:, :, None]              # (n, 8, 1)
    q = _bit_fields(blocks[:, 16:144].reshape(n, 4, 32), 4)     # (n, 4 chunks, 2 nibbles, 32)
    q = q.reshape(n, 8, 32).astype(np.float32)
    return (dl * q - ml).reshape(n, 256)


def _dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    # block_q5_K, 176 bytes, 8 sub-blocks of 32 values:
    #   0..1     d           fp16
    #   2..3     dmin        fp16
    #   4..15    scales[12]  as in Q4_K
    #   16..47   qh[32]      bit 4 of each quant: qh[l] bit b belongs to value 32*b + l
    #   48..175  qs[128]     low 4 bits, packed as Q4_K's qs
    # w = (d * scale) * q - (dmin * min), the sub-block of value i being i // 32
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k4_scales_mins(blocks[:, 4:16])
    dl = (d * sc.astype(np.float32))[:, :, None]
    ml = (dmin * m.astype(np.float32))[:, :, None]
    low = _bit_fields(blocks[:, 48:176].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    high = _bit_fields(blocks[:, 16:48], 1)                     # (n, 8 bits, 32)
    q = (low | (high << 4)).astype(np.float32)
    return (dl * q - ml).reshape(n, 256)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    # block_q6_K, 210 bytes, 16 sub-blocks of 16 values, in two halves h of 128 values:
    #   0..127    ql[128]    low 4 bits: ql[64*h + l] = hi:lo for l < 64,
    #                        value 128*h + l = lo, value 128*h + 64 + l = hi
    #   128..191  qh[64]     high 2 bits: qh[32*h + l] = q3 q2 q1 q0, value 128*h + 32*k + l = qk
    #   192..207  scales[16] int8, one per sub-block
    #   208..209  d          fp16
    # w = (d * scale) * (q - 32), the sub-block of value i being i // 16
    n = blocks.shape[0]
    d = _f16(blocks, 208)
    dl = (d * blocks[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]   # (n, 16, 1)
    low = _bit_fields(blocks[:, 0:128].reshape(n, 2, 64), 4).reshape(n, 256)    # (n, 2, 2, 64)
    high = _bit_fields(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 256)  # (n, 2, 4, 32)
    q = (low | (high << 4)).astype(np.float32) - 32
    return (dl * q.reshape(n, 16, 16)).reshape(n, 256)


# The one dispatch point: GGML type -> dequantizer of its blocks. Keys are ggml.SUPPORTED.
_DEQUANT: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _dequant_f32,
    GGMLType.F16: _dequant_f16,
    GGMLType.BF16: _dequant_bf16,
    GGMLType.Q4_0: _dequant_q4_0,
    GGMLType.Q4_1: _dequant_q4_1,
    GGMLType.Q5_0: _dequant_q5_0,
    GGMLType.Q5_1: _dequant_q5_1,
    GGMLType.Q8_0: _dequant_q8_0,
    GGMLType.Q2_K: _dequant_q2_k,
    GGMLType.Q3_K: _dequant_q3_k,
    GGMLType.Q4_K: _dequant_q4_k,
    GGMLType.Q5_K: _dequant_q5_k,
    GGMLType.Q6_K: _dequant_q6_k,
}


def load_tensor(f: GGUFFile, name: str) -> np.ndarray:
    """A tensor of an open GGUF file as float32 in its numpy shape; an unsupported type is a GGUFError."""
    t = f.tensors[name]
    if t.ggml_type not in _DEQUANT:
        raise GGUFError(f"tensor {name!r} has type {t.ggml_type.name}, which dslocal cannot compute with "
                        f"yet; re-quantize the file to a supported type ({', '.join(x.name for x in _DEQUANT)})")
    return dequantize(f.raw(name), t.ggml_type).reshape(t.shape)
