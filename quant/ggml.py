"""The GGML tensor types: ids, block sizes and bytes per block (ggml/src/ggml-common.h, ggml.c type_traits)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class GGMLType(IntEnum):
    """Type ids as stored in a GGUF tensor info (enum ggml_type)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


@dataclass(frozen=True)
class TypeInfo:
    block_size: int   # values per block (1 for plain types)
    type_size: int    # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


T = GGMLType
TYPE_INFO: dict[GGMLType, TypeInfo] = {
    T.F32: TypeInfo(1, 4),
    T.F16: TypeInfo(1, 2),
    T.BF16: TypeInfo(1, 2),
    T.F64: TypeInfo(1, 8),
    T.I8: TypeInfo(1, 1),
    T.I16: TypeInfo(1, 2),
    T.I32: TypeInfo(1, 4),
    T.I64: TypeInfo(1, 8),
    T.Q4_0: TypeInfo(32, 2 + 16),            # d, qs[16]
    T.Q4_1: TypeInfo(32, 2 + 2 + 16),        # d, m, qs[16]
    T.Q5_0: TypeInfo(32, 2 + 4 + 16),        # d, qh, qs[16]
    T.Q5_1: TypeInfo(32, 2 + 2 + 4 + 16),    # d, m, qh, qs[16]
    T.Q8_0: TypeInfo(32, 2 + 32),            # d, qs[32]
    T.Q8_1: TypeInfo(32, 4 + 32),            # d, s, qs[32]
    T.Q2_K: TypeInfo(256, 16 + 64 + 2 + 2),  # scales[16], qs[64], d, dmin
    T.Q3_K: TypeInfo(256, 32 + 64 + 12 + 2),  # hmask[32], qs[64], scales[12], d
    T.Q4_K: TypeInfo(256, 2 + 2 + 12 + 128),  # d, dmin, scales[12], qs[128]
    T.Q5_K: TypeInfo(256, 2 + 2 + 12 + 32 + 128),  # d, dmin, scales[12], qh[32], qs[128]
    T.Q6_K: TypeInfo(256, 128 + 64 + 16 + 2),  # ql[128], qh[64], scales[16], d
    T.Q8_K: TypeInfo(256, 4 + 256 + 32),     # d (f32), qs[256], bsums[16] (i16)
    T.IQ2_XXS: TypeInfo(256, 66),
    T.IQ2_XS: TypeInfo(256, 74),
    T.IQ3_XXS: TypeInfo(256, 98),
    T.IQ1_S: TypeInfo(256, 50),
    T.IQ4_NL: TypeInfo(32, 18),
    T.IQ3_S: TypeInfo(256, 110),
    T.IQ2_S: TypeInfo(256, 82),
    T.IQ4_XS: TypeInfo(256, 136),
    T.IQ1_M: TypeInfo(256, 56),
    T.TQ1_0: TypeInfo(256, 54),
    T.TQ2_0: TypeInfo(256, 66),
    T.MXFP4: TypeInfo(32, 17),
    T.NVFP4: TypeInfo(64, 36),
    T.Q1_0: TypeInfo(128, 18),
    T.Q2_0: TypeInfo(64, 18),
}

# Weight types dslocal computes with (dequantizers in quant/dequant.py). Other known types are listed by
# `dslocal info` and refused by loaders with the tensor's name.
SUPPORTED: frozenset[GGMLType] = frozenset({
    T.F32, T.F16, T.BF16,
    T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
})


def type_name(type_id: int) -> str:
    """'Q4_K' for a known id, 'type 99' for an unknown one."""
    try:
        return GGMLType(type_id).name
    except ValueError:
        return f"type {type_id}"


def parse_type(name: str) -> GGMLType:
    """GGMLType from a user-typed name such as 'q4_k' or 'Q8_0'."""
    try:
        return GGMLType[name.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown GGML type {name!r}") from None


def nbytes(ggml_type: GGMLType, n_values: int) -> int:
    """Bytes of n_values stored as ggml_type; n_values must be a multiple of the block size."""
    info = TYPE_INFO[ggml_type]
    if n_values % info.block_size:
        raise ValueError(f"{ggml_type.name} stores values in blocks of {info.block_size}, "
                         f"and {n_values} is not a multiple of it")
    return n_values // info.block_size * info.type_size
