"""`dslocal quantize IN.gguf OUT.gguf --type q4_k`: re-quantize a deepseek2 GGUF to another weight type.

Each tensor is dequantized (quant.dequant) and quantized again (quant.quantize) with llama-quantize's type
rules (synthetic.choose_type: 1-D tensors, norms and routers stay F32; rows that are not whole K-quant blocks
fall back). Tensors stream one slice at a time (an expert, or a block of rows), so memory stays at a few MiB
whatever the file size. Metadata is copied, general.file_type is set to the new type.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import numpy as np

from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import TYPE_INFO
from dslocal.quant.gguf_file import GGUFError, GGUFFile, ValueType, open_gguf
from dslocal.quant.gguf_writer import TensorData, write_gguf
from dslocal.quant.quantize import quantize
from dslocal.quant.synthetic import choose_type
from dslocal.runtime.config import check_tensors, read_config

FILE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k",
              "q6_k", "q4_k_m")
# llama_ftype values (llama.h) for general.file_type
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
              "q3_k": 12, "q4_k": 14, "q5_k": 16, "q6_k": 18, "q4_k_m": 15, "bf16": 32}
_ROWS_PER_SLICE_VALUES = 1 << 20    # values dequantized and quantized at a time


def _slices(f: GGUFFile, name: str, target) -> Iterator[np.ndarray]:
    """The tensor's bytes in the target type, a slice of whole rows at a time."""
    t = f.tensors[name]
    raw = f.raw(name).reshape(-1, t.row_bytes)                    # uint8 (n_rows, row_bytes)
    rows = max(1, _ROWS_PER_SLICE_VALUES // t.shape[-1])
    for start in range(0, raw.shape[0], rows):
        values = dequantize(np.ascontiguousarray(raw[start:start + rows]), t.ggml_type)   # (rows, n_cols)
        yield quantize(values, target)


def requantize(src: str, dst: str, ftype: str) -> dict[str, str]:
    """Write dst from src with weights of ftype; returns tensor name -> 'OLD -> NEW' type."""
    if ftype not in FILE_TYPES:
        raise ValueError(f"--type must be one of {', '.join(FILE_TYPES)}")
    with open_gguf(src) as f:
        cfg = read_config(f)
        check_tensors(cfg, f)
        for name, t in f.tensors.items():
            if t.ggml_type not in TYPE_INFO:
                raise GGUFError(f"{src}: tensor {name!r} has a type dslocal cannot read")
        changes, tensors = {}, []
        for name, t in f.tensors.items():
            target = choose_type(name, t.shape, ftype, cfg.n_layer)
            changes[name] = f"{t.ggml_type.name} -> {target.name}"
            tensors.append(TensorData(name, t.shape, target, lambda name=name, target=target: _slices(f, name, target)))
        metadata = [(k, v, vt) for k, v, vt in f.items() if k not in ("general.file_type", "general.alignment")]
        metadata.append(("general.file_type", _FILE_TYPE[ftype], ValueType.UINT32))
        write_gguf(dst, metadata, tensors)
    return changes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a deepseek2 GGUF")
    p.add_argument("output", help="the GGUF file to write")
    p.add_argument("--type", required=True, choices=FILE_TYPES, help="weight type, or the q4_k_m mix")


def run(args: argparse.Namespace) -> int:
    changes = requantize(args.input, args.output, args.type)
    counts: dict[str, int] = {}
    for c in changes.values():
        counts[c] = counts.get(c, 0) + 1
    for c, n in sorted(counts.items()):
        print(f"{n:5d} tensors {c}", file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dslocal quantize")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
