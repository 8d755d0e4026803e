"""A dense weight times a few activation rows, straight from the weight's GGUF blocks (Numba).

    y = linear(x, blocks, t)     # x (T, n_in) f32, T <= MAX_ROWS; blocks uint8 (n_out, row bytes) of GGML type t

The decode-time linear layers of a model run on the CPU (attention projections, shared experts, dense
FFNs, the head: offload/hybrid.py BlockLinear) read the file's blocks through the row kernels of the
routed experts (kernels/cpu/rows.py), with the same activation rounding (x in 8 bits, a scale per 256 values
for the K-quants and per 32 for Q4_0 / Q5_0 / Q4_1 / Q5_1; 11 bits for Q8_0; float32 for float weights): a
Q4_K weight is 7x fewer bytes to stream per token than its float32 copy. Rows are cut into chunks that the
threads claim, as in kernels/cpu/moe.py. One parallel step per call; x is quantized in the calling thread.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from dslocal.kernels.cpu.moe import FIRST_SHARE, SMALL_CHUNKS, _chunk, _claim, _quantize_x
from dslocal.kernels.cpu.rows import BYTE_DOT, BYTE_DOT32, activation_shapes, activation_shapes32, rows_dot
from dslocal.quant.ggml import GGMLType, nbytes

MAX_ROWS = 4      # activation rows per call: a decode step's (longer inputs go through a float copy)
FLOATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


@njit(cache=True, nogil=True, parallel=True)
def _linear(x, w, t, n_threads, first_share, small_per_thread, x8q, x16, xd, xs, out):
    """out (T, R) = x (T, D) . rows of w (1, R, row bytes) of type t (compiled once per type: rows.py
    rows_dot); the rest is scratch (see linear)."""
    numba.literally(t)
    T, R = x.shape[0], w.shape[1]
    for i in range(T):
        _quantize_x(x, i, x16, xd, xs, x8q)
    big = R * first_share // 100 // n_threads * n_threads
    n_small = min(R - big, n_threads * small_per_thread)
    longest = max(big // n_threads, -(-(R - big) // max(n_small, 1))) + 1
    claimed = np.zeros(8, np.int64)
    # w is one expert, 0, passed as a variable: a literal 0 would type rows_dot's e as Literal[int](0) and
    # compile every type's row kernels a second time next to moe.py's (~1 minute on two cores)
    e = w.shape[0] - 1
    for u in prange(n_threads):
        src = np.arange(T)
        res = np.empty((T, longest), np.float32)
        c = _claim(claimed, 0)
        while c < n_threads + n_small:
            r0, r1 = _chunk(c, n_threads, big, n_small, R)
            if r1 > r0:
                rows_dot(t, w, e, r0, r1, src, T, x16, xd, xs, x, res, x8q)
                for i in range(T):
                    for j in range(r1 - r0):
                        out[i, r0 + j] = res[i, j]
            c = _claim(claimed, 0)


def linear(x: np.ndarray, blocks: np.ndarray, t: GGMLType, out: np.ndarray | None = None) -> np.ndarray:
    """x (T, n_in) float32 (1 <= T <= MAX_ROWS) times the weight whose GGUF rows are blocks (n_out, row
    bytes) of type t: (T, n_out) float32, written to out if given. Runs on numba.get_num_threads() threads."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    T, D = x.shape
    R = blocks.shape[0]
    if not 1 <= T <= MAX_ROWS:
        raise ValueError(f"linear takes 1 to {MAX_ROWS} activation rows, got {T}")
    if blocks.ndim != 2 or blocks.dtype != np.uint8 or blocks.shape[1] != nbytes(t, D):
        raise ValueError(f"blocks must be uint8 ({R}, {nbytes(t, D)}) for {D} values of {t.name} a row, got "
                         f"{blocks.dtype} {blocks.shape}")
    if out is None:
        out = np.empty((T, R), np.float32)
    _, sd, ss = activation_shapes(T, D)
    # x in 8 bits for the K-quants (a scale per 256) and BYTE_DOT32 (per 32), in 11 for Q8_0, as it is for
    # float weights
    n8, n16 = (T, 0) if t in BYTE_DOT + BYTE_DOT32 else (0, 0) if t in FLOATS else (0, T)
    _, sd8, ss8 = activation_shapes32(n8, D) if t in BYTE_DOT32 else activation_shapes(n8, D)
    x8q = (np.empty((n8, D), np.int8), np.empty(sd8, np.float32), np.empty(ss8, np.int32))
    _for_type(int(t))(x, np.ascontiguousarray(blocks).reshape(1, R, -1), numba.get_num_threads(), FIRST_SHARE,
                      SMALL_CHUNKS, x8q, np.empty((n16, D), np.int16), np.empty((n16, sd[1]), np.float32),
                      np.empty((n16, ss[1]), np.int32), out)
    return out


_by_type = {}


def _for_type(t: int):
    """_linear for weights of GGML type t, compiled with t as a constant (as moe.py _for_types does for layers)."""
    if t not in _by_type:
        def linear_t(x, w, n_threads, first_share, small_per_thread, x8q, x16, xd, xs, out):
            _linear(x, w, t, n_threads, first_share, small_per_thread, x8q, x16, xd, xs, out)
        _by_type[t] = njit(cache=True, nogil=True)(linear_t)
    return _by_type[t]
