"""Write GGUF files through gguf.GGUFWriter, streaming tensor data so memory stays small.

The writer first needs every tensor's name, shape and type (the index precedes the data), then the data in
the same order. Each tensor is therefore given as a TensorData whose `chunks()` yields its raw bytes piece by
piece when the data section is written.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import gguf
import numpy as np

from dslocal.quant.ggml import GGMLType, nbytes
from dslocal.quant.gguf_file import ValueType

# (key, value, type): a list or array value is an ARRAY whose elements have the given type
Metadata = list[tuple[str, object, ValueType]]


@dataclass(frozen=True)
class TensorData:
    name: str
    shape: tuple[int, ...]   # numpy order, in values (not bytes)
    ggml_type: GGMLType
    chunks: Callable[[], Iterable[np.ndarray]]  # yields the raw bytes in order; any dtype, C-contiguous

    @property
    def nbytes(self) -> int:
        return nbytes(self.ggml_type, int(np.prod(self.shape, dtype=np.int64)))


class _Streamed:
    """What GGUFWriter.write_tensor_data needs of an array (nbytes, tofile), filled chunk by chunk."""

    def __init__(self, t: TensorData):
        self.t = t
        self.nbytes = t.nbytes

    def tofile(self, fp) -> None:
        written = 0
        for chunk in self.t.chunks():
            chunk = np.ascontiguousarray(chunk)
            fp.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
        if written != self.nbytes:
            raise ValueError(f"tensor {self.t.name!r}: produced {written} bytes, its shape and type need "
                             f"{self.nbytes}")


def write_gguf(path: str | os.PathLike, metadata: Metadata, tensors: list[TensorData]) -> None:
    """Write a GGUF file (version 3, alignment 32); written to a temporary name and renamed when complete."""
    path = os.fspath(path)
    arch = next((v for k, v, _ in metadata if k == "general.architecture"), None)
    if arch is None:
        raise ValueError("metadata must hold general.architecture")
    tmp = path + ".partial"
    w = gguf.GGUFWriter(tmp, arch)
    for key, value, vtype in metadata:
        if key == "general.architecture":
            continue  # GGUFWriter adds it from `arch`
        gtype = gguf.GGUFValueType(int(vtype))
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) == 0:
                raise ValueError(f"metadata array {key!r} is empty; GGUF readers reject empty arrays")
            items = [v.item() if isinstance(v, np.generic) else v for v in value]
            w.add_key_value(key, items, gguf.GGUFValueType.ARRAY, sub_type=gtype)
        else:
            w.add_key_value(key, value, gtype)
    if not any(k == "general.quantization_version" for k, _, _ in metadata):
        w.add_key_value("general.quantization_version", 2, gguf.GGUFValueType.UINT32)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                          raw_dtype=gguf.GGMLQuantizationType(int(t.ggml_type)))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            w.write_tensor_data(_Streamed(t))
        w.close()
    except BaseException:
        w.close()
        os.unlink(tmp)
        raise
    os.replace(tmp, path)
