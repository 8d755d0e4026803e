"""One-token products on Q4_K and Q6_K blocks on the GPU, with every thread's share of the blocks set by hand.

Used by kernels/gpu/linear.py for the attention projections, shared experts, dense FFNs and head of a placed
model when a step has at most a few tokens. Written in Gluon, Triton's dialect with explicit layouts: in
plain Triton the layouts it chose for a block's words, x and the scales differed, so each step went through
shuffles and shared memory, and the portable kernel (kernels/gpu/linear.py) unpacks with byte loads and one
int->float conversion a value (quarter rate on an H200): 12-15 instructions per value in its loop's SASS
(Triton 3.6), against 4.4-7 here.

What each thread does per step, for RT rows: loads whole 32-bit words of the blocks (128-bit loads), turns
each 4- or 6-bit value q into the float 0.5 + q / 256 with one byte permute (`prmt`: q as byte 2 of a float
whose byte 3 is 0x3F), and sums f * x; the scales are applied once per sub-block, using
    sum(q x) = 256 sum(f x) - 128 sum(x),
and the x sums are shared by the thread's rows. Nothing crosses threads until the final sum per row.

Q6_K blocks are 210 bytes, so their words are not aligned: `q6k_planes` rearranges each row once, at load,
into planes [ql nb*128 | qh nb*64 | scales nb*16 | d nb*2 | zero pad to 16 bytes]; `q6k_rows` turns them back.

Letters: M tokens, N n_in, O n_out, nb = N / 256 blocks per row; a chunk is 64 values of a Q4_K block
(its sub-blocks 2g and 2g + 1) or one 128-value half of a Q6_K block.
"""
from __future__ import annotations

import logging
import os

import torch

from dslocal.quant.ggml import TYPE_INFO, GGMLType

log = logging.getLogger(__name__)

try:   # Gluon came with Triton 3.4; older Tritons take kernels/gpu/linear.py's portable GEMV
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:   # pragma: no cover - depends on the installed Triton
    gluon = gl = None

TYPES = frozenset({GGMLType.Q4_K, GGMLType.Q6_K})
ENABLED = True     # False: every type takes the portable kernel (for comparisons)
_warned = []


def usable(device: torch.device) -> bool:
    """Whether weights on `device` take these kernels: CUDA, a Triton with Gluon, not the interpreter."""
    if not ENABLED or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if gluon is None and not _warned:
        _warned.append(True)
        log.warning("this Triton has no Gluon: one-token products on Q4_K / Q6_K blocks take the slower portable "
                    "kernel")
    return gluon is not None


# --- the Q6_K plane layout --------------------------------------------------------------------------------

Q6K_PARTS = ((0, 128), (128, 192), (192, 208), (208, 210))   # ql, qh, scales, d: byte ranges of a block


def q6k_plane_bytes(n_in: int) -> int:
    """Bytes of one row in the plane layout: the blocks' bytes, padded to a multiple of 16."""
    nb = n_in // 256
    return (nb * TYPE_INFO[GGMLType.Q6_K].type_size + 15) // 16 * 16


def q6k_planes(rows: torch.Tensor) -> torch.Tensor:
    """uint8 (O, nb * 210) GGUF rows -> (O, q6k_plane_bytes) planes, on rows' device."""
    O, nb = rows.shape[0], rows.shape[1] // 210
    blocks = rows.view(O, nb, 210)
    out = torch.zeros(O, q6k_plane_bytes(nb * 256), dtype=torch.uint8, device=rows.device)
    at = 0
    for lo, hi in Q6K_PARTS:
        out[:, at:at + nb * (hi - lo)] = blocks[:, :, lo:hi].reshape(O, nb * (hi - lo))
        at += nb * (hi - lo)
    return out


def q6k_rows(planes: torch.Tensor, n_in: int) -> torch.Tensor:
    """The inverse of q6k_planes: (O, q6k_plane_bytes) -> uint8 (O, nb * 210) GGUF rows."""
    O, nb = planes.shape[0], n_in // 256
    parts, at = [], 0
    for lo, hi in Q6K_PARTS:
        parts.append(planes[:, at:at + nb * (hi - lo)].reshape(O, nb, hi - lo))
        at += nb * (hi - lo)
    return torch.cat(parts, dim=2).reshape(O, nb * 210)


# --- kernels ------------------------------------------------------------------------------------------------

if gluon is not None:
    @gluon.jit
    def _byte_float(q, sel):
        """0.5 + b / 256 for the byte b (< 128) of q that sel = 0x7044 + 256 i picks (byte i)."""
        return gl.inline_asm_elementwise("prmt.b32 $0, $1, 0x3F000000, $2;", "=r,r,r", [q, sel],
                                         dtype=gl.int32, is_pure=True, pack=1).to(gl.float32, bitcast=True)

    @gluon.jit
    def _q4k_gemv(p_x, p_w, p_y, N, O, row_stride,
                  RT: gl.constexpr, TR: gl.constexpr, TC: gl.constexpr, WR: gl.constexpr, WC: gl.constexpr):
        """y[t, r] = w[r] . x[t]. Tile (rows, chunks, 8 words, 4 bytes i): chunk c is block c // 4's qs bytes
        32g .. 32g + 31 (g = c % 4); byte 4w + i holds value 64g + 4w + i (low nibble) and that + 32 (high)."""
        L4: gl.constexpr = gl.BlockedLayout(size_per_thread=[RT, 1, 8, 4], threads_per_warp=[TR, TC, 1, 1],
                                            warps_per_cta=[WR, WC, 1, 1], order=[3, 2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(3, L4)          # (R, NC, 8) words
        LS: gl.constexpr = gl.SliceLayout(2, LW)          # (R, NC) a chunk's scales
        LX: gl.constexpr = gl.SliceLayout(0, L4)          # (NC, 8, 4) x
        R: gl.constexpr = RT * TR * WR
        NC: gl.constexpr = TC * WC
        i_t = gl.program_id(0)
        i_r = gl.program_id(1)
        n_c = (N // 256) * 4
        p_w32 = p_w.to(gl.pointer_type(gl.int32))
        row_words = gl.multiple_of(row_stride // 4, 4)    # a row is nb * 36 words
        # (R, NC): the scales' rows and chunks
        o_r = i_r * R + gl.arange(0, R, layout=gl.SliceLayout(1, LS))
        m_r = o_r < O
        o_c = gl.arange(0, NC, layout=gl.SliceLayout(0, LS))
        p_row = p_w + gl.expand_dims(o_r.to(gl.int64) * row_stride, 1)
        # (R, NC, 8): words
        o_rw = i_r * R + gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))
        o_cw = gl.arange(0, NC, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))
        o_w = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        p_roww = p_w32 + gl.expand_dims(gl.expand_dims(o_rw.to(gl.int64) * row_words, 1), 2) \
            + gl.expand_dims(gl.expand_dims(o_w, 0), 1)
        m_rw = gl.expand_dims(gl.expand_dims(o_rw < O, 1), 2)
        # (NC, 8, 4): x offsets 4w + i within a chunk's low run
        o_cx = gl.arange(0, NC, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
        o_wx = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX)))
        o_ix = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
        o_wi = gl.expand_dims(gl.expand_dims(o_wx * 4, 0), 2) + gl.expand_dims(gl.expand_dims(o_ix, 0), 1)
        # (1, 1, 1, 4): prmt selectors of byte i
        o_i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        sel = gl.expand_dims(gl.expand_dims(gl.expand_dims(0x7044 + o_i * 256, 0), 1), 2)

        p_xt = p_x + i_t * N
        acc = gl.zeros([R, NC], gl.float32, layout=LS)
        for c0 in range(0, n_c, NC):
            c_w = c0 + o_cw
            o_blk = gl.multiple_of((c_w // 4) * 36 + 4 + (c_w % 4) * 8, 4)    # words: 16-byte header, 8 per g
            m_w = m_rw & gl.expand_dims(gl.expand_dims(c_w < n_c, 0), 2)
            w = gl.load(p_roww + gl.expand_dims(gl.expand_dims(o_blk, 0), 2), mask=m_w, other=0)
            c_x = c0 + o_cx
            o_x = gl.expand_dims(gl.expand_dims((c_x // 4) * 256 + (c_x % 4) * 64, 1), 2) + o_wi
            m_x = gl.expand_dims(gl.expand_dims(c_x < n_c, 1), 2)
            x_lo = gl.expand_dims(gl.load(p_xt + o_x, mask=m_x, other=0.0).to(gl.float32), 0)
            x_hi = gl.expand_dims(gl.load(p_xt + o_x + 32, mask=m_x, other=0.0).to(gl.float32), 0)
            f_lo = _byte_float(gl.expand_dims(w & 0x0F0F0F0F, 3), sel)
            f_hi = _byte_float(gl.expand_dims((w >> 4) & 0x0F0F0F0F, 3), sel)
            s_lo = 256.0 * gl.sum(gl.sum(f_lo * x_lo, axis=3), axis=2)            # (R, NC) 128 sum x + sum q x
            s_hi = 256.0 * gl.sum(gl.sum(f_hi * x_hi, axis=3), axis=2)
            xs_lo = gl.sum(gl.sum(x_lo, axis=3), axis=2)                          # (1, NC)
            xs_hi = gl.sum(gl.sum(x_hi, axis=3), axis=2)
            # d, dmin and the 6-bit scales / mins of sub-blocks 2g, 2g + 1 (ggml's get_scale_min_k4), with
            # the 12 scale bytes s read in pairs: A = s[k], s[k+1]; B = s[k+4..]; C = s[k+8..]; k = 2 (g % 2)
            c_s = c0 + o_c
            m_s = gl.expand_dims(m_r, 1) & gl.expand_dims(c_s < n_c, 0)
            p_blk = p_row + gl.expand_dims((c_s // 4) * 144, 0)
            g = gl.expand_dims(c_s % 4, 0)
            dd = gl.load(p_blk.to(gl.pointer_type(gl.int32)), mask=m_s, other=0)
            d = (dd & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            dmin = (dd >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            p_a = (p_blk + 4 + 2 * (g % 2)).to(gl.pointer_type(gl.int16))
            A = gl.load(p_a, mask=m_s, other=0).to(gl.int32)
            B = gl.load(p_a + 2, mask=m_s, other=0).to(gl.int32)
            C = gl.load(p_a + 4, mask=m_s, other=0).to(gl.int32)
            up = g >= 2
            sc = gl.where(up, (C & 0x0F0F) | ((A >> 2) & 0x3030), A & 0x3F3F)
            mn = gl.where(up, ((C >> 4) & 0x0F0F) | ((B >> 2) & 0x3030), B & 0x3F3F)
            dl_lo = d * (sc & 255).to(gl.float32)
            dl_hi = d * ((sc >> 8) & 255).to(gl.float32)
            ml_lo = dmin * (mn & 255).to(gl.float32)
            ml_hi = dmin * ((mn >> 8) & 255).to(gl.float32)
            # value = dl q - ml: sum = dl (s - 128 xs) - ml xs
            acc += dl_lo * s_lo + dl_hi * s_hi - (128.0 * dl_lo + ml_lo) * xs_lo - (128.0 * dl_hi + ml_hi) * xs_hi
        y = gl.sum(acc, axis=1)
        gl.store(p_y + i_t * O + o_r, y.to(p_y.dtype.element_ty), mask=m_r)

    @gluon.jit
    def _q6k_gemv(p_x, p_w, p_y, N, O, row_stride,
                  RT: gl.constexpr, TR: gl.constexpr, TC: gl.constexpr, WR: gl.constexpr, WC: gl.constexpr,
                  ST: gl.constexpr):
        """y[t, r] = w[r] . x[t], w in q6k_planes. Chunk c = half h of block b (c = 2b + h); its qh word w and
        ql words w, w + 8 hold, for l = 4w + i, the half's values l, l + 32, l + 64, l + 96 (planes k = 0..3).
        Tile (rows, chunks, 2 s, 4 w', 4 i) with w = 4s + w'; values 32k + 16s + .. share scale 2k + s."""
        L5: gl.constexpr = gl.BlockedLayout(size_per_thread=[RT, 1, 2 // ST, 4, 4],
                                            threads_per_warp=[TR, TC, ST, 1, 1],
                                            warps_per_cta=[WR, WC, 1, 1, 1], order=[4, 3, 2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(4, L5)          # (R, NC, 2, 4) words
        LS: gl.constexpr = gl.SliceLayout(3, LW)          # (R, NC, 2) per sub-block
        LC: gl.constexpr = gl.SliceLayout(2, LS)          # (R, NC) per chunk
        LX: gl.constexpr = gl.SliceLayout(0, L5)          # (NC, 2, 4, 4) x
        R: gl.constexpr = RT * TR * WR
        NC: gl.constexpr = TC * WC
        i_t = gl.program_id(0)
        i_r = gl.program_id(1)
        nb = N // 256
        n_c = nb * 2
        p_w32 = p_w.to(gl.pointer_type(gl.int32))
        row_words = gl.multiple_of(row_stride // 4, 4)    # rows are padded to 16 bytes
        # (R, NC)
        o_r = i_r * R + gl.arange(0, R, layout=gl.SliceLayout(1, LC))
        m_r = o_r < O
        o_c = gl.arange(0, NC, layout=gl.SliceLayout(0, LC))
        r2 = gl.expand_dims(o_r.to(gl.int64) * row_words, 1)
        # (R, NC, 2, 4)
        o_rw = i_r * R + gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LW))))
        o_cw = gl.arange(0, NC, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LW))))
        o_s = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LW))))
        o_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LW))))
        p_roww = p_w32 + gl.expand_dims(gl.expand_dims(gl.expand_dims(o_rw.to(gl.int64) * row_words, 1), 2), 3) \
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(o_s * 4, 0), 1), 3) \
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(o_w, 0), 1), 2)
        m_rw = gl.expand_dims(gl.expand_dims(gl.expand_dims(o_rw < O, 1), 2), 3)
        # (NC, 2, 4, 4): x offsets 16s + 4w' + i within a plane's 32 values
        o_cx = gl.arange(0, NC, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LX))))
        o_sx = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LX))))
        o_wx = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LX))))
        o_ix = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LX))))
        o_swi = gl.expand_dims(gl.expand_dims(gl.expand_dims(o_sx * 16, 0), 2), 3) \
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(o_wx * 4, 0), 1), 3) \
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(o_ix, 0), 1), 2)
        # (1, 1, 1, 1, 4): prmt selectors of byte i; (1, 1, 2): sub-block s
        o_i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
        sel = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(0x7044 + o_i * 256, 0), 1), 2), 3)
        o_ss = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, LS)))
        s8 = gl.expand_dims(gl.expand_dims(o_ss * 8, 0), 1)

        p_xt = p_x + i_t * N
        acc = gl.zeros([R, NC, 2], gl.float32, layout=LS)
        for c0 in range(0, n_c, NC):
            c_w = gl.expand_dims(gl.expand_dims(gl.expand_dims(c0 + o_cw, 0), 2), 3)
            m_w = m_rw & (c_w < n_c)
            p_ql = p_roww + c_w * 16                        # ql words 16c + w, 16c + w + 8
            ql_a = gl.load(p_ql, mask=m_w, other=0)
            ql_b = gl.load(p_ql + 8, mask=m_w, other=0)
            qh = gl.load(p_roww + nb * 32 + c_w * 8, mask=m_w, other=0)    # qh plane: word 8c + w
            # the four planes' 6-bit values, one byte each: low 4 bits from ql, high 2 from qh
            q0 = gl.expand_dims((ql_a & 0x0F0F0F0F) | ((qh << 4) & 0x30303030), 4)
            q1 = gl.expand_dims((ql_b & 0x0F0F0F0F) | ((qh << 2) & 0x30303030), 4)
            q2 = gl.expand_dims(((ql_a >> 4) & 0x0F0F0F0F) | (qh & 0x30303030), 4)
            q3 = gl.expand_dims(((ql_b >> 4) & 0x0F0F0F0F) | ((qh >> 2) & 0x30303030), 4)
            c_x = c0 + o_cx
            o_x = gl.expand_dims(gl.expand_dims(gl.expand_dims(c_x * 128, 1), 2), 3) + o_swi
            m_x = gl.expand_dims(gl.expand_dims(gl.expand_dims(c_x < n_c, 1), 2), 3)
            x0 = gl.expand_dims(gl.load(p_xt + o_x, mask=m_x, other=0.0).to(gl.float32), 0)
            x1 = gl.expand_dims(gl.load(p_xt + o_x + 32, mask=m_x, other=0.0).to(gl.float32), 0)
            x2 = gl.expand_dims(gl.load(p_xt + o_x + 64, mask=m_x, other=0.0).to(gl.float32), 0)
            x3 = gl.expand_dims(gl.load(p_xt + o_x + 96, mask=m_x, other=0.0).to(gl.float32), 0)
            s0 = gl.sum(gl.sum(_byte_float(q0, sel) * x0, axis=4), axis=3)         # (R, NC, 2)
            s1 = gl.sum(gl.sum(_byte_float(q1, sel) * x1, axis=4), axis=3)
            s2 = gl.sum(gl.sum(_byte_float(q2, sel) * x2, axis=4), axis=3)
            s3 = gl.sum(gl.sum(_byte_float(q3, sel) * x3, axis=4), axis=3)
            xs0 = gl.sum(gl.sum(x0, axis=4), axis=3)                               # (1, NC, 2)
            xs1 = gl.sum(gl.sum(x1, axis=4), axis=3)
            xs2 = gl.sum(gl.sum(x2, axis=4), axis=3)
            xs3 = gl.sum(gl.sum(x3, axis=4), axis=3)
            # the half's 8 int8 scales are words 2c, 2c + 1 of the scale plane; d is the block's fp16
            c_s = c0 + o_c
            m_s = gl.expand_dims(m_r, 1) & gl.expand_dims(c_s < n_c, 0)
            p_sc = p_w32 + r2 + nb * 48 + gl.expand_dims(c_s * 2, 0)
            sc_a = gl.expand_dims(gl.load(p_sc, mask=m_s, other=0), 2)         # scales 0..3
            sc_b = gl.expand_dims(gl.load(p_sc + 1, mask=m_s, other=0), 2)     # scales 4..7
            p_d = p_w.to(gl.pointer_type(gl.int16)) + r2 * 2 + nb * 104 + gl.expand_dims(c_s // 2, 0)
            d = gl.expand_dims(gl.load(p_d, mask=m_s, other=0).to(gl.float16, bitcast=True).to(gl.float32), 2)
            # plane k, sub-block s: scale 2k + s, a signed byte of sc_a (k < 2) or sc_b
            d0 = d * ((sc_a << (24 - s8)) >> 24).to(gl.float32)
            d1 = d * ((sc_a << (8 - s8)) >> 24).to(gl.float32)
            d2 = d * ((sc_b << (24 - s8)) >> 24).to(gl.float32)
            d3 = d * ((sc_b << (8 - s8)) >> 24).to(gl.float32)
            # sum (q - 32) x = (256 s - 128 xs) - 32 xs
            acc += 256.0 * (d0 * s0 + d1 * s1 + d2 * s2 + d3 * s3) - 160.0 * (d0 * xs0 + d1 * xs1 + d2 * xs2 + d3 * xs3)
        y = gl.sum(gl.sum(acc, axis=2), axis=1)
        gl.store(p_y + i_t * O + o_r, y.to(p_y.dtype.element_ty), mask=m_r)


# Tilings (RT rows per thread, TR x TC threads over rows x chunks, WR warps over rows; WC = 1), largest first.
# More rows per thread share each x load and scale among more values, but leave fewer programs; a matrix
# takes the largest tiling that still gives 3/4 of the multiprocessors a program. Measured on an H200, one
# token, these tilings and one of 8 rows a program on 13 V2-Lite and V3 shapes (e.g. V3's attn_output, 7168 x
# 16384: 51, 52, 77, 125 us): this rule picks the fastest, or one within 12% of it.
TILINGS = {
    GGMLType.Q4_K: ((4, 4, 8, 4), (2, 4, 8, 4), (1, 4, 8, 4)),
    GGMLType.Q6_K: ((4, 2, 8, 4), (2, 2, 8, 4), (1, 2, 8, 4)),
}
_sms: dict[int, int] = {}


def tiling(t: GGMLType, O: int, M: int, device: torch.device) -> tuple:
    """The (RT, TR, TC, WR) tiling of an (O, N) weight of type t for M tokens on a CUDA device."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _sms:
        _sms[i] = torch.cuda.get_device_properties(i).multi_processor_count
    for rt, tr, tc, wr in TILINGS[t]:
        if -(-O // (rt * tr * wr)) * M * 4 >= 3 * _sms[i]:
            return rt, tr, tc, wr
    return TILINGS[t][-1]


def gemv(x: torch.Tensor, blocks: torch.Tensor, t: GGMLType, n_in: int, y: torch.Tensor, tile: tuple | None = None):
    """y (M, O) = x (M, N) @ W.T for W as Q4_K rows or Q6_K planes (blocks uint8 (O, row_bytes)), on CUDA."""
    M, O = x.shape[0], blocks.shape[0]
    rt, tr, tc, wr = tile or tiling(t, O, M, x.device)
    grid = (M, -(-O // (rt * tr * wr)))
    if t == GGMLType.Q4_K:
        _q4k_gemv[grid](x, blocks, y, n_in, O, blocks.stride(0), RT=rt, TR=tr, TC=tc, WR=wr, WC=1, num_warps=wr)
    else:
        st = 32 // (tr * tc)
        _q6k_gemv[grid](x, blocks, y, n_in, O, blocks.stride(0), RT=rt, TR=tr, TC=tc, WR=wr, WC=1, ST=st,
                        num_warps=wr)
