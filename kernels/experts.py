"""The routed experts of one MoE layer as the GGUF stores them: raw blocks, stacked over experts.

E experts, D hidden, F expert ffn. gate and up are uint8 (E, F, row_bytes(D)), down is uint8 (E, D,
row_bytes(F)): the zero-copy views `GGUFFile.raw` gives for `blk.N.ffn_{gate,up,down}_exps.weight`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dslocal.quant.ggml import TYPE_INFO, GGMLType

# Weight types the MoE kernels compute with (kernels/ref.py and kernels/cpu/moe.py alike).
MOE_TYPES: frozenset[GGMLType] = frozenset({
    GGMLType.F32, GGMLType.F16, GGMLType.BF16,
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
})


@dataclass(frozen=True)
class ExpertTensors:
    """gate, up: uint8 (E, F, row bytes of D values); down: uint8 (E, D, row bytes of F values)."""
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    gate_type: GGMLType
    up_type: GGMLType
    down_type: GGMLType

    def __post_init__(self):
        for name in ("gate", "up", "down"):
            a, t = getattr(self, name), GGMLType(getattr(self, name + "_type"))
            if t not in MOE_TYPES:
                raise ValueError(f"ffn_{name}_exps has type {GGMLType(t).name}; the MoE kernels compute with "
                                 f"{', '.join(sorted(x.name for x in MOE_TYPES))}")
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] % TYPE_INFO[t].type_size:
                raise ValueError(f"ffn_{name}_exps must be uint8 (experts, rows, whole {t.name} blocks), "
                                 f"got {a.dtype} {a.shape}")
            if not a.flags.c_contiguous:
                raise ValueError(f"ffn_{name}_exps must be C-contiguous (a raw GGUF view is)")
            # Read-only views, as the memory-mapped file gives: the kernels never write weights, and one
            # array type means one compiled specialization for files and in-memory weights alike.
            view = a.view()
            view.flags.writeable = False
            object.__setattr__(self, name, view)
            object.__setattr__(self, name + "_type", t)
        E, F, D = self.n_expert, self.ffn, self.hidden
        if self.up.shape[:2] != (E, F) or self.up_cols != D or self.down.shape[:2] != (E, D) or self.down_cols != F:
            raise ValueError(f"expert tensors do not fit together: gate {self.gate.shape} ({self.gate_type.name}),"
                             f" up {self.up.shape} ({self.up_type.name}), down {self.down.shape} "
                             f"({self.down_type.name})")

    @property
    def n_expert(self) -> int:
        return self.gate.shape[0]

    @property
    def ffn(self) -> int:
        return self.gate.shape[1]

    @property
    def hidden(self) -> int:
        return _cols(self.gate, self.gate_type)

    @property
    def up_cols(self) -> int:
        return _cols(self.up, self.up_type)

    @property
    def down_cols(self) -> int:
        return _cols(self.down, self.down_type)

    def expert_bytes(self) -> int:
        """Bytes of one expert's three matrices: what a token routed to it makes the kernel read."""
        return (self.gate.nbytes + self.up.nbytes + self.down.nbytes) // self.n_expert


def _cols(a: np.ndarray, t: GGMLType) -> int:
    info = TYPE_INFO[t]
    return a.shape[2] // info.type_size * info.block_size


def from_gguf(f, layer: int) -> ExpertTensors:
    """The routed experts of MoE layer `layer` of an open GGUFFile, zero-copy."""
    names = [f"blk.{layer}.ffn_{p}_exps.weight" for p in ("gate", "up", "down")]
    missing = [n for n in names if n not in f.tensors]
    if missing:
        raise ValueError(f"layer {layer} has no routed experts: {', '.join(missing)} not in the file")
    g, u, d = (f.tensors[n] for n in names)
    return ExpertTensors(f.raw(names[0]), f.raw(names[1]), f.raw(names[2]), g.ggml_type, u.ggml_type, d.ggml_type)
