"""Read a GGUF file memory-mapped: metadata, the tensor index, and zero-copy views of tensor data.

The layout (ggml/include/gguf.h, version 3, little-endian):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x       (key: u64 length + utf-8 bytes) | value type u32 | value
    n_tensors x  (name: string) | n_dims u32 | ne[n_dims] u64 (ggml order: ne0 fastest) | type u32 | offset u64
    padding to general.alignment (default 32)
    data section: each tensor at data_start + offset, offsets aligned

Every read is bounds-checked against the file size before anything is allocated, so a truncated or
corrupted file ends in a GGUFError naming the section, never in a huge allocation, a hang or a traceback.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from dslocal.quant.ggml import TYPE_INFO, GGMLType, type_name

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFError(ValueError):
    """A file that is not a readable GGUF, or not a model dslocal can run; the message is for the user."""


class ValueType(IntEnum):
    """enum gguf_type: the type of a metadata value."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format of each fixed-size value type
_SCALAR_FORMAT = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}
_NUMPY_DTYPE = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class MetaValue:
    """One metadata value with its stored type; arrays keep their element type."""
    value: object          # int | float | bool | str | list[str] | np.ndarray (numeric arrays)
    type: ValueType
    elem_type: ValueType | None = None  # for ARRAY


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]   # numpy order: the reverse of ggml's ne, so a weight {in, out} is (out, in)
    offset: int              # absolute byte offset in the file
    nbytes: int

    @property
    def n_values(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        info = TYPE_INFO[self.ggml_type]
        return self.shape[-1] // info.block_size * info.type_size


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; `section` names the part for error messages."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path
        self.section = "the header"

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"the file is truncated in {self.section} "
                            f"(needs {n} bytes at offset {self.pos}, the file has {self.size})")

    def scalar(self, vtype: ValueType):
        fmt = _SCALAR_FORMAT[vtype]
        n = struct.calcsize(fmt)
        self.need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self) -> int:
        return self.scalar(ValueType.UINT32)

    def u64(self) -> int:
        return self.scalar(ValueType.UINT64)

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="surrogateescape")

    def value_type(self) -> ValueType:
        t = self.u32()
        try:
            return ValueType(t)
        except ValueError:
            raise GGUFError(f"unknown metadata value type {t} in {self.section}") from None

    def value(self, vtype: ValueType) -> MetaValue:
        if vtype == ValueType.STRING:
            return MetaValue(self.string(), vtype)
        if vtype != ValueType.ARRAY:
            return MetaValue(self.scalar(vtype), vtype)
        etype = self.value_type()
        count = self.u64()
        if etype == ValueType.STRING:
            self.need(8 * count)  # every string has at least its length field
            return MetaValue([self.string() for _ in range(count)], vtype, etype)
        if etype == ValueType.ARRAY:
            self.need(12 * count)
            return MetaValue([self.value(ValueType.ARRAY).value for _ in range(count)], vtype, etype)
        dtype = np.dtype(_NUMPY_DTYPE[etype])
        self.need(dtype.itemsize * count)
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += dtype.itemsize * count
        if etype == ValueType.BOOL:
            arr = arr.astype(bool)
        return MetaValue(arr, vtype, etype)


class GGUFFile:
    """An open GGUF file. `metadata` maps keys to MetaValue; `tensors` maps names to TensorInfo."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise GGUFError("no such file")
        if os.path.isdir(self.path):
            raise GGUFError("is a directory, not a GGUF file")
        try:
            self._fd = open(self.path, "rb")
        except OSError as e:
            raise GGUFError(f"cannot be opened ({e.strerror})") from None
        self.file_size = os.fstat(self._fd.fileno()).st_size
        if self.file_size < 4:
            self._fd.close()
            raise GGUFError("is not a GGUF file (it is too short to hold the 'GGUF' magic)")
        self._mmap = mmap.mmap(self._fd.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except GGUFError:
            self.close()
            raise

    # -- parsing -------------------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._mmap, self.path)
        cur.need(4)
        if self._mmap[:4] != MAGIC:
            raise GGUFError("is not a GGUF file (it does not start with the 'GGUF' magic)")
        cur.pos = 4
        self.version = cur.u32()
        if self.version not in (2, 3):
            if struct.unpack(">I", struct.pack("<I", self.version))[0] in (2, 3):
                raise GGUFError("is a big-endian GGUF file; only little-endian files are supported")
            raise GGUFError(f"has GGUF version {self.version}; versions 2 and 3 are supported")
        n_tensors = cur.u64()
        n_kv = cur.u64()
        # Each KV takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at least 8 + 4 + 8 + 4 + 8.
        if n_kv * 13 + n_tensors * 32 > self.file_size:
            raise GGUFError(f"the header claims {n_kv} metadata keys and {n_tensors} tensors, "
                            f"more than a file of {self.file_size} bytes can hold (truncated or corrupt)")

        self.metadata: dict[str, MetaValue] = {}
        for i in range(n_kv):
            cur.section = f"metadata entry {i}"
            key = cur.string()
            cur.section = f"metadata key {key!r}"
            if key in self.metadata:
                raise GGUFError(f"metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.value_type())

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if a.type != ValueType.UINT32 or a.value == 0 or a.value & (a.value - 1):
                raise GGUFError(f"general.alignment must be a power-of-two UINT32, got {a.value!r}")
            self.alignment = a.value

        raw_index = []
        for i in range(n_tensors):
            cur.section = f"tensor index entry {i}"
            name = cur.string()
            cur.section = f"the tensor index entry of {name!r}"
            n_dims = cur.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"tensor {name!r} has {n_dims} dimensions; GGML allows 1 to {MAX_DIMS}")
            ne = [cur.u64() for _ in range(n_dims)]
            type_id = cur.u32()
            offset = cur.u64()
            raw_index.append((name, ne, type_id, offset))

        cur.section = "the padding before the tensor data"
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        if n_tensors and self.data_start > self.file_size:
            raise GGUFError(f"the file is truncated before its tensor data (offset {self.data_start}, "
                            f"file size {self.file_size})")
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset in raw_index:
            self.tensors[name] = self._tensor_info(name, ne, type_id, offset)

    def _tensor_info(self, name: str, ne: list[int], type_id: int, offset: int) -> TensorInfo:
        if name in self.tensors:
            raise GGUFError(f"tensor {name!r} appears twice in the tensor index")
        try:
            ggml_type = GGMLType(type_id)
        except ValueError:
            raise GGUFError(f"tensor {name!r} has unknown GGML type {type_id}") from None
        info = TYPE_INFO[ggml_type]
        if any(n == 0 for n in ne) or any(n >= 1 << 40 for n in ne):
            raise GGUFError(f"tensor {name!r} has an invalid shape {ne}")
        if ne[0] % info.block_size:
            raise GGUFError(f"tensor {name!r} ({type_name(type_id)}) has rows of {ne[0]} values, "
                            f"not a multiple of the block size {info.block_size}")
        n_values = int(np.prod(ne, dtype=object))
        nbytes = n_values // info.block_size * info.type_size
        if offset % self.alignment:
            raise GGUFError(f"tensor {name!r} has offset {offset}, not aligned to {self.alignment} bytes")
        start = self.data_start + offset
        if start + nbytes > self.file_size:
            raise GGUFError(f"the file is truncated in the tensor data: tensor {name!r} ends at byte "
                            f"{start + nbytes}, but the file has {self.file_size} bytes")
        return TensorInfo(name, ggml_type, tuple(reversed(ne)), start, nbytes)

    # -- access --------------------------------------------------------------------------------------
    def get(self, key: str, default=None):
        """The plain value of a metadata key, or default."""
        mv = self.metadata.get(key)
        return default if mv is None else mv.value

    def items(self) -> list[tuple[str, object, ValueType]]:
        """The metadata as gguf_writer takes it: (key, value, type), arrays with their element type."""
        return [(k, mv.value, mv.elem_type if mv.type == ValueType.ARRAY else mv.type)
                for k, mv in self.metadata.items()]

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of a tensor's bytes: uint8 (*shape[:-1], row_bytes)."""
        t = self.tensors[name]
        view = np.frombuffer(self._mmap, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return view.reshape(*t.shape[:-1], t.row_bytes)

    def close(self) -> None:
        """Unmap the file; views handed out keep the mapping alive until they are gone."""
        try:
            self._mmap.close()
        except BufferError:
            pass  # numpy views still use the mapping; it is released when they are collected
        self._fd.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file; every problem is a GGUFError whose message names the file."""
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise GGUFError(f"{os.fspath(path)}: {e}") from None
