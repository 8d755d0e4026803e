"""A dense weight times a few activation rows, straight from the weight's GGUF blocks (Numba).

    y = linear(x, blocks, t)     # x (T, n_in) f32, T <= MAX_ROWS; blocks uint8 (n_out, row bytes) of GGML type t
    y = heads(x, blocks, t)      # x (H, T, n_in), blocks (H, n_out, row bytes): y[h] = x[h] . weight h -> (H, T, n_out)

The decode-time linear layers of a model run on the CPU (attention projections, shared experts, dense
FFNs, the head: offload/hybrid.py BlockLinear) read the file's blocks through the row kernels of the
routed experts (kernels/cpu/rows.py), with the same activation rounding (x in 8 bits, a scale per 256 values
for the K-quants and per 32 for Q4_0 / Q5_0 / Q4_1 / Q5_1; 11 bits for Q8_0; float32 for float weights): a
Q4_K weight is 7x fewer bytes to stream per token than its float32 copy. `heads` is the same for a stack of
weights each with inputs of its own: MLA's per-head products with the latent (attn_k_b, attn_v_b). The rows
of all the weights are cut into chunks that the threads claim, as in kernels/cpu/moe.py. One parallel step
per call; x is quantized in the calling thread.
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
    """out (E * T, R) = rows e * T .. e * T + T - 1 of x (E * T, D) . rows of weight e of w (E, R, row bytes)
    of type t, for each e (compiled once per type: rows.py rows_dot); the rest is scratch (see LinearCall)."""
    numba.literally(t)
    E, R = w.shape[0], w.shape[1]
    T = x.shape[0] // E
    for i in range(E * T):
        _quantize_x(x, i, x16, xd, xs, x8q)
    rows = E * R                           # the weights' rows end to end, cut into chunks as one
    big = rows * first_share // 100 // n_threads * n_threads
    n_small = min(rows - big, n_threads * small_per_thread)
    longest = max(big // n_threads, -(-(rows - big) // max(n_small, 1))) + 1
    claimed = np.zeros(8, np.int64)
    for u in prange(n_threads):
        src = np.empty(T, np.int64)
        res = np.empty((T, longest), np.float32)
        c = _claim(claimed, 0)
        while c < n_threads + n_small:
            g0, g1 = _chunk(c, n_threads, big, n_small, rows)
            while g0 < g1:                 # the chunk's rows of each weight it spans
                e = g0 // R
                r0 = g0 - e * R
                r1 = min(R, r0 + g1 - g0)
                for i in range(T):
                    src[i] = e * T + i
                rows_dot(t, w, e, r0, r1, src, T, x16, xd, xs, x, res, x8q)
                for i in range(T):
                    for j in range(r1 - r0):
                        out[e * T + i, r0 + j] = res[i, j]
                g0 += r1 - r0
            c = _claim(claimed, 0)


def linear(x: np.ndarray, blocks: np.ndarray, t: GGMLType, out: np.ndarray | None = None) -> np.ndarray:
    """x (T, n_in) float32 (1 <= T <= MAX_ROWS) times the weight whose GGUF rows are blocks (n_out, row
    bytes) of type t: (T, n_out) float32, written to out if given. Runs on numba.get_num_threads() threads."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if blocks.ndim != 2:
        raise ValueError(f"blocks must be uint8 (n_out, row bytes), got {blocks.dtype} {blocks.shape}")
    T = x.shape[0]
    if out is None:
        out = np.empty((T, blocks.shape[0]), np.float32)
    LinearCall(blocks[None], t, T, x.shape[1], x, out)()
    return out


def heads(x: np.ndarray, blocks: np.ndarray, t: GGMLType, out: np.ndarray | None = None) -> np.ndarray:
    """x (H, T, n_in) float32 (1 <= T <= MAX_ROWS), blocks (H, n_out, row bytes) of type t: H weights, each
    times its own T rows: (H, T, n_out) float32, written to out if given. One parallel step for all H."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 3 or blocks.ndim != 3 or x.shape[0] != blocks.shape[0]:
        raise ValueError(f"heads takes x (H, T, n_in) and blocks (H, n_out, row bytes), got {x.shape} and "
                         f"{blocks.shape}")
    H, T, D = x.shape
    if out is None:
        out = np.empty((H, T, blocks.shape[1]), np.float32)
    LinearCall(blocks, t, T, D, x.reshape(H * T, D), out.reshape(H * T, -1))()
    return out


class LinearCall:
    """_linear on fixed buffers, checked and allocated once: write x (E * T, D) (or assign an array of that
    shape), call, read out (E * T, R), which the next call overwrites. A decode step of a model on the CPU
    keeps one per linear layer (offload/hybrid.py BlockLinear): ~200 calls a step at 50-70 us each on the GPU
    box (kernels/cpu/NOTES.md), so the Python around each call counts."""

    def __init__(self, blocks: np.ndarray, t: GGMLType, T: int, D: int, x: np.ndarray | None = None,
                 out: np.ndarray | None = None):
        """blocks (E, R, row bytes) of type t, T activation rows per weight (1..MAX_ROWS), D values each; x and
        out: the caller's buffers (float32, C-contiguous), else new ones."""
        E, R = blocks.shape[:2]
        if not 1 <= T <= MAX_ROWS:
            raise ValueError(f"linear takes 1 to {MAX_ROWS} activation rows, got {T}")
        if blocks.dtype != np.uint8 or blocks.shape[2] != nbytes(t, D):
            raise ValueError(f"blocks must be uint8 ({R}, {nbytes(t, D)}) for {D} values of {t.name} a row, got "
                             f"{blocks.dtype} {blocks.shape[1:]}")
        N = E * T
        self.x = np.empty((N, D), np.float32) if x is None else x
        self.out = np.empty((N, R), np.float32) if out is None else out
        if self.out.shape != (N, R) or self.out.dtype != np.float32 or not self.out.flags.c_contiguous:
            raise ValueError(f"out must be float32 ({N}, {R}) and contiguous, got {self.out.dtype} {self.out.shape}")
        self.w = np.ascontiguousarray(blocks)
        _, sd, ss = activation_shapes(N, D)
        # x in 8 bits for the K-quants (a scale per 256) and BYTE_DOT32 (per 32), in 11 for Q8_0, as it is for
        # float weights
        n8, n16 = (N, 0) if t in BYTE_DOT + BYTE_DOT32 else (0, 0) if t in FLOATS else (0, N)
        _, sd8, ss8 = activation_shapes32(n8, D) if t in BYTE_DOT32 else activation_shapes(n8, D)
        self._scratch = ((np.empty((n8, D), np.int8), np.empty(sd8, np.float32), np.empty(ss8, np.int32)),
                         np.empty((n16, D), np.int16), np.empty((n16, sd[1]), np.float32),
                         np.empty((n16, ss[1]), np.int32))
        self._kernel = _for_type(int(t))

    def __call__(self) -> np.ndarray:
        self._kernel(self.x, self.w, numba.get_num_threads(), FIRST_SHARE, SMALL_CHUNKS, *self._scratch, self.out)
        return self.out


_by_type = {}


def _for_type(t: int):
    """_linear for weights of GGML type t, compiled with t as a constant (as moe.py _for_types does for layers)."""
    if t not in _by_type:
        def linear_t(x, w, n_threads, first_share, small_per_thread, x8q, x16, xd, xs, out):
            _linear(x, w, t, n_threads, first_share, small_per_thread, x8q, x16, xd, xs, out)
        _by_type[t] = njit(cache=True, nogil=True)(linear_t)
    return _by_type[t]
