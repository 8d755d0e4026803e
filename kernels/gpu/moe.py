"""The routed experts that live on the GPU: one MoE layer's FFN straight from GGUF blocks (Triton).

Letters: T tokens, D hidden, K experts per token, E experts on the GPU, F expert ffn, P = T * K pairs.

Decode (P <= DECODE_PAIRS): three Triton launches, with no host synchronisation, so
a CUDA graph can capture them. One program per (pair, BLOCK_R output rows) loops over the row's blocks,
unpacking each sub-block with integer ops in registers (kernels/gpu/dequant.py::unpack_part) and dotting
it with x in float32; the quantized bytes are read once per pair. A pair whose expert id is -1 lives on
the CPU: its programs read nothing and its down output is zero.
  1. h[p] = silu(gate_e x[t]) * up_e x[t]             (P, F) float32
  2. y[p] = w[p] * down_e h[p]                         (P, D) float32
  3. out[t] = sum_k y[t, k]   (or out[t] += ..., to add the experts to what out holds)   (T, D) float32
Prefill (more pairs): pairs sorted by expert, each used expert dequantized once to `experts.dtype` and
multiplied with torch; this path synchronises once (it reads the per-expert counts). In bf16, where torch
has grouped matrix products (`torch._grouped_mm`, torch 2.8+; on CUDA for sm90 and newer), consecutive
experts are dequantized together, up to DEQUANT_BYTES at a time, and each group takes three products for
all its experts' pairs: a few dozen launches per layer instead of ~15 per expert. A 2048-token prefill of a
V2-Lite-shaped layer was bound by those launches from Python (README, Measured).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from dslocal.kernels.experts import ExpertTensors
from dslocal.kernels.gpu.dequant import LAYOUT, dequantize, unpack_part
from dslocal.quant.ggml import TYPE_INFO, GGMLType

T_ = GGMLType
# Types kept as GGUF blocks on the GPU; must match offload/planner.py KEEP_ON_GPU, which counts them (and
# F32 / F16 / BF16, kept in their own dtype) at file size. Every other type is dequantized at load.
KEEP_BLOCKS = frozenset({T_.Q4_K, T_.Q6_K, T_.Q8_0, T_.Q5_0})   # Q5_0: V2-Lite's down projections (rows of 1408)
_PLAIN = {T_.F32: torch.float32, T_.F16: torch.float16, T_.BF16: torch.bfloat16}
DECODE_PAIRS = 64    # at most this many (token, expert) pairs take the graph-capturable GEMV path
SUM_BLOCK = 512      # output values per program of the decode path's sum over a token's pairs
BLOCK_R = 16         # output rows per program
VALUES_PER_STEP = 256   # columns per loop step: one K-quant super-block, 8 Q8_0 blocks, 8 dense chunks
GROUPED = True       # the prefill path's grouped products, where _grouped_products says torch has them
DEQUANT_BYTES = 256 * 2**20   # at most this many bytes of a prefill's experts dequantized at once (a group)


def _host_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only array (a view of the memory-mapped file) that is only ever read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


@dataclass(frozen=True, eq=False)   # eq would compare tensors elementwise
class GPUExperts:
    """gate, up: (E, F, row_bytes(D)) uint8 blocks or (E, F, D) dense; down: (E, D, row_bytes(F)) or (E, D, F).

    A matrix is blocks iff its GGUF type is in `kept` (KEEP_BLOCKS, or every type the GPU unpacks for experts
    staged from host memory: kernels/gpu/pull.py); `dtype` is the dense dtype of dequantized types and the
    compute dtype of the prefill path.
    """
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_type: GGMLType
    up_type: GGMLType
    down_type: GGMLType
    hidden: int
    ffn: int
    dtype: torch.dtype = torch.bfloat16
    kept: frozenset = KEEP_BLOCKS

    def __post_init__(self):
        E, D, F = self.gate.shape[0], self.hidden, self.ffn
        for name, rows, cols in (("gate", F, D), ("up", F, D), ("down", D, F)):
            a, t = getattr(self, name), GGMLType(getattr(self, name + "_type"))
            info = TYPE_INFO[t]
            blocks = t in self.kept
            want = (E, rows, cols // info.block_size * info.type_size) if blocks else (E, rows, cols)
            if (a.dtype == torch.uint8) != blocks or tuple(a.shape) != want or not a.is_contiguous() or \
                    (cols % info.block_size and blocks) or a.device != self.gate.device:
                raise ValueError(f"ffn_{name}_exps ({t.name}) must be contiguous "
                                 f"{'uint8 blocks' if blocks else 'float'} {want} on {self.gate.device}, "
                                 f"got {a.dtype} {tuple(a.shape)} on {a.device}")
            object.__setattr__(self, name + "_type", t)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"GPUExperts.dtype must be float32, float16 or bfloat16, not {self.dtype}")

    @classmethod
    def from_experts(cls, experts: ExpertTensors, ids: Sequence[int], device,
                     dtype: torch.dtype = torch.bfloat16, staging: torch.Tensor | None = None,
                     registered: bool = False) -> GPUExperts:
        """Copy experts `ids` (global ids; local id i is ids[i]) of one layer to `device`. staging: a pinned
        uint8 buffer of at least staging_bytes(experts, len(ids)) to copy through asynchronously (the
        caller keeps it untouched until the current stream has passed the copies). registered: the
        experts' host memory is registered with CUDA (kernels/gpu/pull.py), so the DMA reads it in place,
        asynchronously, without a staging copy."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= experts.n_expert):
            raise ValueError(f"expert ids must be in [0, {experts.n_expert}), got {ids.tolist()}")
        # runs of consecutive ids are slices of the file's memory map, copied straight into the pinned
        # buffer: a gather (host[ids]) first would write every byte once more, into fresh pages
        cut = np.flatnonzero(np.diff(ids) != 1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(ids, cut)] if ids.size else []
        def copy_runs(dst: torch.Tensor, host: np.ndarray) -> torch.Tensor:
            at = 0
            for a, b in runs:
                dst[at:at + b - a].copy_(_host_tensor(host[a:b]), non_blocking=True)
                at += b - a
            return dst

        mats, used = [], 0
        for name in ("gate", "up", "down"):
            t = getattr(experts, name + "_type")
            host = getattr(experts, name)                                        # (E, rows, row_bytes)
            shape = (len(ids), *host.shape[1:])
            if registered:
                raw = copy_runs(torch.empty(shape, dtype=torch.uint8, device=device), host)
            elif staging is None:
                raw = _host_tensor(host[ids]).to(device)
            else:
                pinned = copy_runs(staging[used:used + int(np.prod(shape))].view(shape), host)
                raw = pinned.to(device, non_blocking=True)
                used += pinned.numel()
            if t not in KEEP_BLOCKS:
                raw = dequantize(raw, t, _PLAIN.get(t, dtype))               # (E, rows, cols)
            mats.append(raw)
        return cls(*mats, experts.gate_type, experts.up_type, experts.down_type,
                   experts.hidden, experts.ffn, dtype)

    @staticmethod
    def staging_bytes(experts: ExpertTensors, n: int) -> int:
        """Host bytes of n experts' blocks: what from_experts' staging buffer must hold."""
        return n * sum(getattr(experts, m).nbytes // experts.n_expert for m in ("gate", "up", "down"))

    @property
    def n_expert(self) -> int:
        return self.gate.shape[0]

    def nbytes(self) -> int:
        """Bytes of the three matrices on the device."""
        return sum(a.numel() * a.element_size() for a in (self.gate, self.up, self.down))

    def matrix(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Dense (rows, cols) weights of local expert e's `name` matrix ('gate', 'up', 'down') in dtype."""
        return self.matrices(name, e, e + 1, dtype)[0]

    def matrices(self, name: str, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Dense (b - a, rows, cols) weights of local experts a .. b-1's `name` matrix in dtype."""
        m, t = getattr(self, name)[a:b], getattr(self, name + "_type")
        return dequantize(m, t, dtype) if t in self.kept else m.to(dtype)

    def dense_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's three matrices dequantized to dtype."""
        return 3 * self.hidden * self.ffn * dtype.itemsize


@triton.jit
def rows_dot(p_w, o_r, m_r, row_stride, n_cols, p_x, WTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             TYPE_SIZE: tl.constexpr, PART: tl.constexpr, BLOCK_B: tl.constexpr, EVEN: tl.constexpr,
             BLOCK_R: tl.constexpr):
    """float32 (BLOCK_R,): rows o_r of the matrix at p_w (row_stride apart) dotted with x (n_cols,) at p_x.

    WTYPE "DENSE" reads a float matrix (strides in elements) in chunks of BLOCK_SIZE values; other WTYPEs
    read GGUF blocks (strides in bytes). EVEN: n_cols is whole chunks, so no column needs its own mask
    (a per-column mask stops the compiler from vectorizing the loads).
    """
    o_l = tl.arange(0, PART)[None, None, :]
    p_row = p_w + o_r[:, None, None] * row_stride
    n_blocks = tl.cdiv(n_cols, BLOCK_SIZE)
    acc = tl.zeros((BLOCK_R, BLOCK_B, PART), dtype=tl.float32)   # summed once, after the loop
    for b0 in range(0, n_blocks, BLOCK_B):
        o_b = (b0 + tl.arange(0, BLOCK_B))[None, :, None]
        m_blk = o_b < n_blocks
        m_b = m_r[:, None, None] & m_blk
        p_b = p_row + o_b * TYPE_SIZE
        for j in tl.static_range(BLOCK_SIZE // PART):
            o_c = o_b * BLOCK_SIZE + j * PART + o_l           # (1, BLOCK_B, PART) columns
            if EVEN:
                m_x = m_blk
            else:
                m_x = m_blk & (o_c < n_cols)
            if WTYPE == "DENSE":
                b_w = tl.load(p_b + j * PART + o_l, mask=m_b & m_x, other=0.0).to(tl.float32)
            else:
                b_w = unpack_part(p_b, j, o_l, m_b, WTYPE)
            b_x = tl.load(p_x + o_c, mask=m_x, other=0.0).to(tl.float32)
            acc += b_w * b_x
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _gate_up_kernel(p_x, p_ids, p_g, p_u, p_h, K, D, F,
                    g_expert_stride, g_row_stride, u_expert_stride, u_row_stride,
                    G_TYPE: tl.constexpr, G_BS: tl.constexpr, G_TS: tl.constexpr, G_PART: tl.constexpr,
                    G_BB: tl.constexpr, G_EVEN: tl.constexpr,
                    U_TYPE: tl.constexpr, U_BS: tl.constexpr, U_TS: tl.constexpr,
                    U_PART: tl.constexpr, U_BB: tl.constexpr, U_EVEN: tl.constexpr, BLOCK_R: tl.constexpr):
    """h (P, F) f32 = silu(gate_e x[t]) * up_e x[t] for pair p = t*K + k, e = ids[p] >= 0; x (T, D)."""
    i_p, i_r = tl.program_id(0), tl.program_id(1)
    e = tl.load(p_ids + i_p)            # int64: expert offsets can pass 2^31 bytes
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < F
    if e >= 0:
        p_xt = p_x + (i_p // K) * D
        g = rows_dot(p_g + e * g_expert_stride, o_r, m_r, g_row_stride, D, p_xt,
                     G_TYPE, G_BS, G_TS, G_PART, G_BB, G_EVEN, BLOCK_R)
        u = rows_dot(p_u + e * u_expert_stride, o_r, m_r, u_row_stride, D, p_xt,
                     U_TYPE, U_BS, U_TS, U_PART, U_BB, U_EVEN, BLOCK_R)
        tl.store(p_h + i_p * F + o_r, g / (1.0 + tl.exp(-g)) * u, mask=m_r)


@triton.jit
def _down_kernel(p_h, p_ids, p_wts, p_d, p_y, D, F, expert_stride, row_stride,
                 W_TYPE: tl.constexpr, W_BS: tl.constexpr, W_TS: tl.constexpr, W_PART: tl.constexpr,
                 W_BB: tl.constexpr, W_EVEN: tl.constexpr, BLOCK_R: tl.constexpr):
    """y (P, D) f32 = w[p] * down_e h[p] for e = ids[p] >= 0, and 0 where ids[p] = -1; h (P, F)."""
    i_p, i_r = tl.program_id(0), tl.program_id(1)
    e = tl.load(p_ids + i_p)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < D
    b_y = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if e >= 0:
        b_y = rows_dot(p_d + e * expert_stride, o_r, m_r, row_stride, F, p_h + i_p * F,
                       W_TYPE, W_BS, W_TS, W_PART, W_BB, W_EVEN, BLOCK_R) * tl.load(p_wts + i_p)
    tl.store(p_y + i_p * D + o_r, b_y, mask=m_r)


def gemv_meta(t: GGMLType, cols: int, prefix: str, kept: frozenset, values_per_step: int = VALUES_PER_STEP) -> dict:
    """Constexpr arguments of rows_dot for one matrix of `cols` columns: stored as blocks (t in kept) or dense;
    each loop step reads values_per_step columns (at least one block)."""
    if t in kept:
        info, part = TYPE_INFO[t], LAYOUT[t].part
        name, bs, ts = t.name, info.block_size, info.type_size
    else:
        name, bs, ts, part = "DENSE", 32, 32, 32
    return {f"{prefix}_TYPE": name, f"{prefix}_BS": bs, f"{prefix}_TS": ts, f"{prefix}_PART": part,
            f"{prefix}_BB": max(1, values_per_step // bs), f"{prefix}_EVEN": cols % bs == 0}


def _check(x, topk_ids, topk_weights, experts: GPUExperts):
    T, D = x.shape
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or D != experts.hidden:
        raise ValueError(f"x must be float (T, {experts.hidden}), got {x.dtype} {tuple(x.shape)}")
    if topk_ids.dtype != torch.int64 or topk_ids.ndim != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be int64 (T={T}, K), got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must be float32 {tuple(topk_ids.shape)}, got {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")
    if experts.gate.device != x.device:
        raise ValueError(f"x is on {x.device} but the experts are on {experts.gate.device}")


@triton.jit
def _pair_sum_kernel(p_y, p_out, K, D, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (T, cdiv(D, BLOCK)): out[t] (+)= sum_k y[t * K + k], summed in k order."""
    i_t = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m_d = o_d < D
    b_sum = tl.zeros((BLOCK,), tl.float32)
    for k in range(K):
        b_sum += tl.load(p_y + (i_t * K + k) * D + o_d, mask=m_d, other=0.0)
    if ACCUMULATE:
        b_sum += tl.load(p_out + i_t * D + o_d, mask=m_d, other=0.0)
    tl.store(p_out + i_t * D + o_d, b_sum, mask=m_d)


def moe_ffn(x, topk_ids, topk_weights, experts: GPUExperts, out=None, accumulate=False):
    """out[t] = sum_k w[t,k] * down_e(silu(gate_e x[t]) * up_e x[t]), e = ids[t,k] local, -1 skipped.
    x (T, D) f32/bf16, topk_ids (T, K) int64, topk_weights (T, K) f32 -> (T, D) f32 (into `out` if given;
    with accumulate, added to what `out` holds: the layer's other parts, without a kernel for the add)."""
    _check(x, topk_ids, topk_weights, experts)
    T, D = x.shape
    if out is None:
        if accumulate:
            raise ValueError("moe_ffn accumulates only into a given out")
        out = torch.empty(T, D, dtype=torch.float32, device=x.device)
    elif out.shape != (T, D) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 {(T, D)}, got {out.dtype} {tuple(out.shape)}")
    if experts.n_expert == 0 or topk_ids.numel() == 0:
        return out if accumulate else out.zero_()
    if topk_ids.numel() <= DECODE_PAIRS:
        return _decode(x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous(), experts, out, accumulate)
    return _prefill(x, topk_ids, topk_weights, experts, out, accumulate)


def _decode(x, ids, wts, ex: GPUExperts, out, accumulate):
    """The GEMV path: fixed grids from shapes only, ids read on the device."""
    (T, K), D, F = ids.shape, ex.hidden, ex.ffn
    P = T * K
    h = torch.empty(P, F, dtype=torch.float32, device=x.device)
    y = torch.empty(P, D, dtype=torch.float32, device=x.device)
    g, u, d = ex.gate, ex.up, ex.down
    _gate_up_kernel[(P, triton.cdiv(F, BLOCK_R))](
        x, ids, g, u, h, K, D, F, g.stride(0), g.stride(1), u.stride(0), u.stride(1),
        **gemv_meta(ex.gate_type, D, "G", ex.kept), **gemv_meta(ex.up_type, D, "U", ex.kept),
        BLOCK_R=BLOCK_R)
    _down_kernel[(P, triton.cdiv(D, BLOCK_R))](
        h, ids, wts, d, y, D, F, d.stride(0), d.stride(1), **gemv_meta(ex.down_type, F, "W", ex.kept),
        BLOCK_R=BLOCK_R)
    _pair_sum_kernel[(T, triton.cdiv(D, SUM_BLOCK))](y, out, K, D, ACCUMULATE=accumulate, BLOCK=SUM_BLOCK)
    return out


def _prefill(x, ids, wts, ex: GPUExperts, out, accumulate):
    """The batched path: pairs grouped by expert, one dequantization per used expert, torch's products."""
    T, K = ids.shape
    flat = ids.reshape(-1)                                   # (P,), pair p = t*K + k
    order = torch.argsort(flat, stable=True)                 # pairs grouped by expert, the -1s first
    counts_here = torch.bincount(flat + 1, minlength=ex.n_expert + 1)
    counts = counts_here.tolist()                            # the one sync
    if not accumulate:
        out.zero_()
    if GROUPED and ex.dtype == torch.bfloat16 and _grouped_products(x.device) and \
            ex.hidden % 8 == 0 and ex.ffn % 8 == 0:          # grouped products want 16-byte rows
        _prefill_grouped(x, order, counts, counts_here, wts.reshape(-1), K, ex, out)
    else:
        _prefill_each(x, order, counts, wts.reshape(-1), K, ex, out)
    return out


def _prefill_each(x, order, counts, w_flat, K, ex: GPUExperts, out):
    """out += each used expert's pairs, one expert at a time (three products and ~15 launches each)."""
    cdt = ex.dtype
    start = counts[0]
    for e, n in enumerate(counts[1:]):
        if n == 0:
            continue
        p = order[start:start + n]
        start += n
        t = p // K
        xe = x[t].to(cdt)                                    # (n, D)
        gate, up, down = (ex.matrix(name, e, cdt) for name in ("gate", "up", "down"))
        h = torch.nn.functional.silu((xe @ gate.T).float()) * (xe @ up.T).float()   # (n, F)
        out.index_add_(0, t, (h.to(cdt) @ down.T).float() * w_flat[p, None])


def _prefill_grouped(x, order, counts, counts_here, w_flat, K, ex: GPUExperts, out):
    """out += every used expert's pairs, consecutive experts in groups of at most DEQUANT_BYTES dequantized:
    per group three grouped products over the group's pairs (rows sorted by expert). The same roundings as
    _prefill_each: products in bf16, silu and the weights in float32."""
    cdt = ex.dtype
    p = order[counts[0]:]                                    # the pairs of experts here, by expert
    t = p // K
    xs = x[t].to(cdt)                                        # (P, D)
    ws = w_flat[p, None]
    ends = torch.cumsum(counts_here[1:], 0).to(torch.int32)  # row after each expert's last pair
    E, per_group = ex.n_expert, max(1, DEQUANT_BYTES // ex.dense_bytes(cdt))
    e = row = 0
    while e < E:
        if counts[1 + e] == 0:
            e += 1
            continue
        b = min(E, e + per_group)
        while counts[b] == 0:                                # trailing experts without pairs: left out
            b -= 1
        rows = slice(row, row + sum(counts[1 + e:1 + b]))
        offs = ends[e:b] - row                               # group ends within this group's rows
        gate, up, down = (ex.matrices(name, e, b, cdt).transpose(1, 2) for name in ("gate", "up", "down"))
        xg = xs[rows]
        h = torch.nn.functional.silu(torch._grouped_mm(xg, gate, offs=offs).float()) * \
            torch._grouped_mm(xg, up, offs=offs).float()
        y = torch._grouped_mm(h.to(cdt), down, offs=offs)
        out.index_add_(0, t[rows], y.float() * ws[rows])
        row, e = rows.stop, b


_GROUPED: dict[str, bool] = {}


def _grouped_products(device: torch.device) -> bool:
    """Whether torch computes bf16 grouped products on this device (torch 2.8+; CUDA needs sm90 or newer):
    tried once per device on a small case and compared with plain products."""
    key = str(device)
    if key not in _GROUPED:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(24, 16, generator=g).to(device, torch.bfloat16)
                b = torch.randn(3, 32, 16, generator=g).to(device, torch.bfloat16)
                offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
                y = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)
                want = torch.cat([a[:8] @ b[0].T, a[8:] @ b[2].T])
                ok = bool(torch.allclose(y.float(), want.float(), rtol=2e-2, atol=2e-2))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED[key] = ok
    return _GROUPED[key]
