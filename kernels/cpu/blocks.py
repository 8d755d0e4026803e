"""GGUF blocks dotted with integer activations in 256-bit vectors (Numba intrinsics), one function per type.

Each type is `_<type>_w` (16 values of the block at flat byte p of the raw GGUF bytes w, uint8, any C-contiguous
shape) and `_<type>_end` (its float scales); `_block1` / `_block4` dot a block with values v.. of one or four
activation rows s (x16 int16 (N, D), 16-value sums xs int32 (N, D // 16), block scale xd = xd[s, v // 256])
and return acc (8 float32 lanes) plus the block's part.
The weights never leave the registers: a sub-block's quants are widened to 16 int16 lanes, multiplied by its
integer scale where the type has one (every such product fits int16), and summed with the activations in pairs
into 8 int32 lanes (pmaddwd; vpdpwssd with VNNI); the block's float scales then multiply the int32 lanes once.
K-quant mins and offsets (Q6_K's -32, Q3_K's -4) go through the 16-value activation sums (xs), one pmaddwd
per super-block: sum_l sc_g (q_l - 32) x_l = sum_l sc_g q_l x_l - 32 sum_g sc_g xs_g. Q4_0's -8 and Q5_0's -16
are added to the lanes; Q4_1's and Q5_1's min multiplies the block's activation sum. The same blocks on 8-bit
activations (the K-quants' `_u8` / `_m8`, the other 4- and 5-bit types' `_b`) come further down, with their own
drivers.

Why vectors by hand: with plain loops LLVM did vectorise the 32-value dot, but left the per-block work scalar
(scale unpacking, fp16 decoding, one horizontal sum per block): ~150 of the ~240 instructions per Q4_K
super-block, and Q5_0 / Q8_0 paid a float dequantization. The vector type below is LLVM's <16 x i16> /
<8 x i32> / <8 x float>; 256 bits because LLVM's Emerald Rapids tuning prefers them (NOTES.md).
Layouts follow ggml-common.h; quant/dequant.py has the same formats as bit diagrams.
"""
from __future__ import annotations

import llvmlite.binding as llb
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, models, register_model

from dslocal.quant.ggml import GGMLType

f32 = np.float32

# Type ids as plain ints for the branches inside compiled code (ggml_type values).
F32, F16, BF16 = int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q5_0),
                                int(GGMLType.Q5_1), int(GGMLType.Q8_0))
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (int(GGMLType.Q2_K), int(GGMLType.Q3_K), int(GGMLType.Q4_K),
                                int(GGMLType.Q5_K), int(GGMLType.Q6_K))


# --- 256-bit vector values in compiled code ---------------------------------------------------------------

class Lanes(types.Type):
    """A 256-bit vector in compiled code: 16 int16, 8 int32 or 8 float32 lanes."""
    def __init__(self, kind: str):
        self.kind = kind
        super().__init__(name=f"Lanes({kind})")


_i8, _i16, _i32, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V16, _V8I, _V8F = ir.VectorType(_i16, 16), ir.VectorType(_i32, 8), ir.VectorType(_f32, 8)
_LLVM = {"i16": _V16, "i32": _V8I, "f32": _V8F}
I16, I32, FV = Lanes("i16"), Lanes("i32"), Lanes("f32")


@register_model(Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _LLVM[fe_type.kind])


def _has(feature: str) -> bool:
    """Whether Numba compiles for an x86 CPU with this feature (read when a kernel compiles, not at import)."""
    features = numba.config.CPU_FEATURES if numba.config.CPU_FEATURES is not None else get_host_cpu_features()
    return llb.get_process_triple().startswith("x86_64") and f"+{feature}" in features.split(",")


def _op(name, result, build, arrays=()):
    """A Numba intrinsic `name` returning type `result`, LLVM IR from build(context, builder, sig, *args).
    Arguments at the positions in `arrays` must be C-contiguous arrays (the loads index their flat data)."""
    def typed(*args):
        if all(isinstance(args[i], types.Array) and args[i].layout == "C" for i in arrays):
            return result(*args), lambda context, builder, sig, a: build(context, builder, sig, *a)
    # Numba reads the typer's parameters to fold the call's arguments: one plain signature per arity
    typers = [lambda typingctx: typed(), lambda typingctx, a: typed(a), lambda typingctx, a, b: typed(a, b),
              lambda typingctx, a, b, c: typed(a, b, c), lambda typingctx, a, b, c, d: typed(a, b, c, d)]
    typer = typers[build.__code__.co_argcount - 3]
    typer.__name__ = name
    return intrinsic(typer)


def _vec(vt, values):
    """A constant vector of type vt; a single value is repeated in every lane."""
    values = list(values) if hasattr(values, "__iter__") else [values] * vt.count
    return ir.Constant(vt, values)


def _pick(b, v, lanes):
    """shufflevector: lane k of the result = lane lanes[k] of v."""
    return b.shuffle_vector(v, v, _vec(ir.VectorType(_i32, len(lanes)), lanes))


def _splat(b, v, vt):
    return _pick(b, b.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(_i32, 0)), [0] * vt.count)


def _call(b, name, ret, args, **kw):
    """Call the LLVM intrinsic `name` (its type from ret and the arguments)."""
    f = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return b.call(f, args, **kw)


def _as_f32(b, v):
    return b.fptrunc(v, _f32) if v.type != _f32 else v


def _as_i16(b, v):
    return b.trunc(v, _i16) if v.type.width > 16 else b.sext(v, _i16) if v.type.width < 16 else v


def _load(c, b, sig, arr, i, elt, at=0):
    """Unaligned load of LLVM type elt from flat element i of array arr (argument `at` of sig)."""
    data = c.make_array(sig.args[at])(c, b, arr).data
    value = b.load(b.bitcast(b.gep(data, [i]), elt.as_pointer()))
    value.align = 1
    return value


def _madd_ir(b, x, y):
    """pmaddwd: int32 lane i = x[2i] y[2i] + x[2i+1] y[2i+1]. LLVM did not match the generic form on x86."""
    if _has("avx2"):
        return _call(b, "llvm.x86.avx2.pmadd.wd", _V8I, [x, y])
    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    lo = b.mul(b.sext(_pick(b, x, even), _V8I), b.sext(_pick(b, y, even), _V8I))
    return b.add(lo, b.mul(b.sext(_pick(b, x, odd), _V8I), b.sext(_pick(b, y, odd), _V8I)))


def _maddubs_ir(b, u, s):
    """pmaddubsw: int16 lane i = u[2i] s[2i] + u[2i+1] s[2i+1] of the 32 bytes of u (unsigned) and s
    (signed), summed with saturation; the operands are 16 int16 lanes holding 32 bytes."""
    v32 = ir.VectorType(_i8, 32)
    if _has("avx2"):
        return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _V16, [b.bitcast(u, v32), b.bitcast(s, v32)])
    u, s = b.bitcast(u, v32), b.bitcast(s, v32)
    even, odd = list(range(0, 32, 2)), list(range(1, 32, 2))
    lo = b.mul(b.zext(_pick(b, u, even), _V16), b.sext(_pick(b, s, even), _V16))
    hi = b.mul(b.zext(_pick(b, u, odd), _V16), b.sext(_pick(b, s, odd), _V16))
    return _call(b, "llvm.sadd.sat.v16i16", _V16, [lo, hi])


def _f16_ir(c, b, sig, w, i, times):
    """The fp16 at byte i of w times `times`, in 8 float32 lanes. The bits are broadcast first: a scalar
    conversion was inserted into whatever register LLVM chose, once the accumulator, and that false dependency
    halved Q8_0's speed. F16C's vcvtph2ps where there is one, else exact integer arithmetic (NaN becomes inf)."""
    h = _splat(b, _load(c, b, sig, w, i, _i16), ir.VectorType(_i16, 8))
    if _has("f16c"):
        f = b.fpext(b.bitcast(h, ir.VectorType(ir.HalfType(), 8)), _V8F)
    else:   # exponent and mantissa moved into place, then 2**(127 - 15) fixes the bias; exponent 31 is inf
        h = b.zext(h, _V8I)
        mag = b.fmul(b.bitcast(b.shl(b.and_(h, _vec(_V8I, 0x7FFF)), _vec(_V8I, 13)), _V8F), _vec(_V8F, 2.0 ** 112))
        top = b.icmp_unsigned(">=", b.and_(h, _vec(_V8I, 0x7C00)), _vec(_V8I, 0x7C00))
        mag = b.bitcast(b.select(top, _vec(_V8F, float("inf")), mag), _V8I)
        f = b.bitcast(b.or_(mag, b.shl(b.and_(h, _vec(_V8I, 0x8000)), _vec(_V8I, 16))), _V8F)
    return b.fmul(f, _splat(b, _as_f32(b, times), _V8F))


def _lane_ir(c, b, sig, v, j):
    """Every lane = lane j of v. With AVX2 as a vpshufb (of the half of v that holds lane j, copied to both
    halves), which LLVM then lowers as the splat it prefers (2 instructions); the plain splat of Q2_K's scales
    (v & 15) was scalarised to vpextrw, and, vpbroadcastw from a general register (Q2_K 12.0 -> 13.8 G/s)."""
    if not _has("avx2"):
        return _splat(b, b.extract_element(v, j), v.type)
    return _shuffle_half(b, v, j, [0, 1] * 16)


def _shuffle_half(b, v, j, pattern):
    """vpshufb of the 128-bit half of v (int16 lanes) that holds lane j, copied to both halves: result byte k
    = byte 2 (j mod 8) + pattern[k] of that half."""
    v32 = ir.VectorType(_i8, 32)
    half = b.select(b.icmp_signed(">=", j, ir.Constant(j.type, 8)), _pick(b, v, list(range(8, 16)) * 2),
                    _pick(b, v, list(range(8)) * 2))
    byte = b.trunc(b.shl(b.and_(j, ir.Constant(j.type, 7)), ir.Constant(j.type, 1)), _i8)
    control = b.add(_splat(b, byte, v32), _vec(v32, pattern))
    return b.bitcast(_call(b, "llvm.x86.avx2.pshuf.b", v32, [b.bitcast(half, v32), control]), v.type)


def _lane_pair_ir(c, b, sig, v, j):
    """Lanes 0..7 = lane j of v, lanes 8..15 = lane j + 1 (j even): the scales of two sub-blocks of 16 for
    the 16 int16 lanes of a pmaddubsw over 32 values. With AVX2 one vpshufb of the half of v holding both."""
    if not _has("avx2"):
        lo = _splat(b, b.extract_element(v, j), v.type)
        hi = _splat(b, b.extract_element(v, b.add(j, ir.Constant(j.type, 1))), v.type)
        return b.shuffle_vector(lo, hi, _vec(ir.VectorType(_i32, 16), list(range(8)) + list(range(24, 32))))
    return _shuffle_half(b, v, j, [0, 1] * 8 + [2, 3] * 8)


def _bits_ir(c, b, sig, qh, shift, on, off):
    """Lane l = on where bit shift + l of the uint32 qh is set, else off (the fifth bits of Q5_0 / Q5_1)."""
    h = _splat(b, b.trunc(b.lshr(qh, b.trunc(shift, _i32)), _i16), _V16)
    is_set = b.icmp_unsigned("!=", b.and_(h, _vec(_V16, [1 << l for l in range(16)])), _vec(_V16, 0))
    return b.select(is_set, _splat(b, _as_i16(b, on), _V16), _splat(b, _as_i16(b, off), _V16))


def _k4_scales_ir(c, b, sig, w, i):
    """The 12 scale bytes of Q4_K / Q5_K (get_scale_min_k4, ggml-quants.c) -> lanes [sc0..sc7, m0..m7]:
    j < 4: sc = q[j] & 63, m = q[j + 4] & 63; j >= 4: sc = q[j + 4] & 15 | q[j - 4] >> 6 << 4,
    m = q[j + 4] >> 4 | q[j] >> 6 << 4."""
    q = b.zext(_load(c, b, sig, w, i, ir.VectorType(_i8, 16)), _V16)
    a = _pick(b, q, [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11])
    low = b.or_(b.and_(a, _vec(_V16, [63] * 4 + [15] * 4 + [63] * 4 + [0] * 4)),
                b.and_(b.lshr(a, _vec(_V16, 4)), _vec(_V16, [0] * 12 + [15] * 4)))
    high = b.and_(_pick(b, q, [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]), _vec(_V16, ([0] * 4 + [0xC0] * 4) * 2))
    return b.or_(low, b.lshr(high, _vec(_V16, 2)))


def _q3_scales_ir(c, b, sig, w, i):
    """The 12 scale bytes of Q3_K at i -> 16 lanes: (low 4 bits | high 2 bits << 4) - 32, where scale s has low
    bits q[s % 8] >> 4 (s // 8) and high bits q[8 + s % 4] >> 2 (s // 4) (ggml-quants.c dequantize_row_q3_K).
    The load ends at the block's last byte (i - 4 .. i + 11): never past the end of the tensor."""
    q = b.zext(_load(c, b, sig, w, b.sub(i, ir.Constant(i.type, 4)), ir.VectorType(_i8, 16)), _V16)
    low = b.lshr(_pick(b, q, [4 + s % 8 for s in range(16)]), _vec(_V16, [4 * (s // 8) for s in range(16)]))
    high = b.lshr(_pick(b, q, [12 + s % 4 for s in range(16)]), _vec(_V16, [2 * (s // 4) for s in range(16)]))
    v = b.or_(b.and_(low, _vec(_V16, 15)), b.shl(b.and_(high, _vec(_V16, 3)), _vec(_V16, 4)))
    return b.sub(v, _vec(_V16, 32))


def _opaque(b, v):
    """v, computed once into a register: an empty inline asm that LLVM cannot look through. Without it LLVM
    moved Q3_K's scale arithmetic past the 8-bit path's per-chunk lane shuffles and redid part of it for
    every chunk (108 -> 87 vector instructions per block, read from inspect_asm). Not in the int16 path:
    there it kept LLVM from unrolling the chunk loop."""
    if not _has("avx2"):
        return v
    return b.call(ir.InlineAsm(ir.FunctionType(v.type, [v.type]), "", "=x,0"), [v])


def _widen_u8(b, v):
    """16 bytes -> 16 int16 lanes, zero-extended as bytes interleaved with zeros, not as a zext: from
    `zext(v) >> 4` with one use LLVM made a byte shift (vgf2p8affineqb), Q5_0 at T = 1 10 % slower."""
    lanes = _vec(ir.VectorType(_i32, 32), [k // 2 + 16 * (k % 2) for k in range(32)])   # byte, zero, byte, ..
    z = b.shuffle_vector(v, ir.Constant(v.type, None), lanes)
    return b.bitcast(z, _V16)


def _fma_ir(c, b, sig, acc, a, times):
    """acc + float(a) * times (float32 lanes)."""
    return b.fadd(acc, b.fmul(b.sitofp(a, _V8F), times, flags=["contract"]), flags=["contract"])


def _prefetch_ir(c, b, sig, a, i):
    """prefetcht0 of the cache line holding byte i of a: a hint that never faults, even past a's end."""
    data = c.make_array(sig.args[0])(c, b, a).data
    _call(b, "llvm.prefetch.p0", ir.VoidType(), [b.gep(data, [i]), ir.Constant(_i32, 0), ir.Constant(_i32, 3),
                                                 ir.Constant(_i32, 1)])
    return c.get_dummy_value()


_prefetch = _op("_prefetch", types.none, _prefetch_ir, (0,))

# loads at flat element i of a C-contiguous array; 16 int16 lanes unless stated
_u8x16 = _op("_u8x16", I16, lambda c, b, sig, a, i: _widen_u8(b, _load(c, b, sig, a, i, ir.VectorType(_i8, 16))), (0,))
_i8x16 = _op("_i8x16", I16, lambda c, b, sig, a, i: b.sext(_load(c, b, sig, a, i, ir.VectorType(_i8, 16)), _V16), (0,))
_i16x16 = _op("_i16x16", I16, lambda c, b, sig, a, i: _load(c, b, sig, a, i, _V16), (0,))
_i32x16 = _op("_i32x16", I16, lambda c, b, sig, a, i: b.trunc(_load(c, b, sig, a, i, ir.VectorType(_i32, 16)), _V16),
              (0,))   # int32 values that fit int16 (the activation sums)
_u32 = _op("_u32", types.uint32, lambda c, b, sig, a, i: _load(c, b, sig, a, i, _i32), (0,))
_f16 = _op("_f16", FV, _f16_ir, (0,))
_k4_scales = _op("_k4_scales", I16, _k4_scales_ir, (0,))
_q3_scales = _op("_q3_scales", I16, _q3_scales_ir, (0,))
_q3_scales_once = _op("_q3_scales_once", I16,
                      lambda c, b, sig, w, i: _opaque(b, _q3_scales_ir(c, b, sig, w, i)), (0,))

# int16 lanes; k, n, j: integers (constants once LLVM has unrolled the loops around them)
_and = _op("_and", I16, lambda c, b, sig, v, k: b.and_(v, _splat(b, _as_i16(b, k), _V16)))
_shr = _op("_shr", I16, lambda c, b, sig, v, n: b.lshr(v, _splat(b, _as_i16(b, n), _V16)))
_shl = _op("_shl", I16, lambda c, b, sig, v, n: b.shl(v, _splat(b, _as_i16(b, n), _V16)))
_or = _op("_or", I16, lambda c, b, sig, x, y: b.or_(x, y))
_xor = _op("_xor", I16, lambda c, b, sig, v, k: b.xor(v, _splat(b, _as_i16(b, k), _V16)))
_add = _op("_add", I16, lambda c, b, sig, x, y: b.add(x, y))
_mul = _op("_mul", I16, lambda c, b, sig, x, y: b.mul(x, y))
_fill = _op("_fill", I16, lambda c, b, sig, k: _splat(b, _as_i16(b, k), _V16))
_lane = _op("_lane", I16, _lane_ir)
_lane_pair = _op("_lane_pair", I16, _lane_pair_ir)
_bits = _op("_bits", I16, _bits_ir)
# lanes [m0, m0, m1, m1, .., m7, m7] of _k4_scales: a min per 16 values, to pair with xs in one pmaddwd
_mins16 = _op("_mins16", I16, lambda c, b, sig, v: _pick(b, v, [8 + g // 2 for g in range(16)]))

_maddubs = _op("_maddubs", I16, lambda c, b, sig, u, s: _maddubs_ir(b, u, s))


def _dpbusd_ir(c, b, sig, acc, u, x, i):
    """acc (8 int32 lanes) + the products of the 32 unsigned bytes of u with the 32 int8 at flat element i
    of x, summed in fours (_vnni_ir)."""
    return _vnni_ir(b, acc, u, _load(c, b, sig, x, i, _V16, at=2))


def _vnni_ir(b, acc, u, s):
    """acc + the products of the 32 unsigned bytes of u with the 32 signed bytes of s, summed in fours (any
    256-bit vector types): vpdpbusd where the CPU has it, else pmaddubsw and pmaddwd by ones (u at most 63:
    a pair of products then fits int16)."""
    if _has("avxvnni") or (_has("avx512vnni") and _has("avx512vl")):
        return _call(b, "llvm.x86.avx512.vpdpbusd.256", _V8I, [acc, b.bitcast(u, _V8I), b.bitcast(s, _V8I)])
    return b.add(acc, _madd_ir(b, _maddubs_ir(b, b.bitcast(u, _V16), b.bitcast(s, _V16)), _vec(_V16, 1)))


def _nib32_ir(c, b, sig, a, i):
    """The 16 bytes at flat element i of a as 32 nibbles, one per byte: the low nibbles, then the high ones
    (the value order of Q4_0 / Q5_0 blocks)."""
    v = _load(c, b, sig, a, i, ir.VectorType(_i8, 16))
    both = b.bitcast(_pick(b, v, list(range(16)) * 2), _V16)
    return b.and_(b.lshr(both, _vec(_V16, [0] * 8 + [4] * 8)), _vec(_V16, 0x0F0F))


def _hi32_ir(c, b, sig, a, i):
    """Byte l = 16 where bit l of the little-endian u32 at flat element i of a is set, else 0 (Q5_0's fifth
    bits in place)."""
    bits = b.bitcast(_load(c, b, sig, a, i, _i32), ir.VectorType(ir.IntType(1), 32))
    v32 = ir.VectorType(_i8, 32)
    return b.bitcast(b.select(bits, _vec(v32, 16), _vec(v32, 0)), _V16)


_dpbusd = _op("_dpbusd", I32, _dpbusd_ir, (2,))
_nib32 = _op("_nib32", I16, _nib32_ir, (0,))
_hi32 = _op("_hi32", I16, _hi32_ir, (0,))

# int32 and float32 lanes
_madd = _op("_madd", I32, lambda c, b, sig, x, y: _madd_ir(b, x, y))
_dot = _op("_dot", I32, lambda c, b, sig, acc, x, y: b.add(acc, _madd_ir(b, b.bitcast(x, _V16),   # acc + pmaddwd(x, y)
                                                                        b.bitcast(y, _V16))))
_sum = _op("_sum", I32, lambda c, b, sig, x, y: b.add(x, y))
_zero_i32 = _op("_zero_i32", I32, lambda c, b, sig: _vec(_V8I, 0))
_zero = _op("_zero", FV, lambda c, b, sig: _vec(_V8F, 0.0))
_fma = _op("_fma", FV, _fma_ir)
_plus = _op("_plus", FV, lambda c, b, sig, acc, v: b.insert_element(acc, b.fadd(   # acc's lane 0 + v's lane 0
    b.extract_element(acc, ir.Constant(_i32, 0)), b.extract_element(v, ir.Constant(_i32, 0))), ir.Constant(_i32, 0)))
_hsum = _op("_hsum", types.float32, lambda c, b, sig, acc: _call(
    b, "llvm.vector.reduce.fadd.v8f32", _f32, [ir.Constant(_f32, -0.0), acc], fastmath=("reassoc",)))


# --- one block . activations, per type ----------------------------------------------------------------------
# A type is two functions. `_<type>_w(w, p, c)`: values 16c .. 16c + 15 of the block at byte p as 16 int16 lanes,
# times their integer sub-block scale where the type has one (c < 16 for K-quants, < 2 for 32-value types).
# `_<type>_end(acc, a, w, p, xs, s, v, xd)`: acc plus the block's float part for activation row s, given a, the
# int32 lanes of sum_l w16_l x16_l. The drivers `_block1` / `_block4` below run the chunks with constant c
# (LLVM unrolls the loop), so every lane index and shift is a constant; the chunks of one block share loads
# (the same 16 bytes hold two chunks' nibbles), which LLVM merges.

@njit(inline="always")
def _nibble(q, hi):
    """Low (hi = 0) or high nibbles of bytes zero-extended to int16 lanes (the shift needs no mask)."""
    return _shr(q, 4) if hi else _and(q, 15)


@njit(inline="always")
def _q4_k_w(w, p, c):
    # block_q4_K, 144 bytes: d @0, dmin @2, scales[12] @4, qs[128] @16 (value 64k + l = lo nibble of
    # qs[32k + l], value 64k + 32 + l = hi nibble); w = d * sc_j * q - dmin * m_j, sub-blocks j of 32
    k, hi = c >> 2, (c >> 1) & 1
    q = _u8x16(w, p + 16 + 32 * k + 16 * (c & 1))
    return _mul(_nibble(q, hi), _lane(_k4_scales(w, p + 4), 2 * k + hi))


@njit(inline="always")
def _q4_k_end(acc, a, w, p, xs, s, v, xd):
    acc = _fma(acc, a, _f16(w, p, xd))
    return _fma(acc, _madd(_mins16(_k4_scales(w, p + 4)), _i32x16(xs, s * xs.shape[1] + v // 16)), _f16(w, p + 2, -xd))


@njit(inline="always")
def _q5_k_w(w, p, c):
    # block_q5_K, 176 bytes: d @0, dmin @2, scales[12] @4, qh[32] @16 (bit b of qh[l] is bit 4 of value
    # 32b + l), qs[128] @48 as in Q4_K
    k, hi, l = c >> 2, (c >> 1) & 1, 16 * (c & 1)
    q = _nibble(_u8x16(w, p + 48 + 32 * k + l), hi)
    q = _or(q, _shl(_and(_shr(_u8x16(w, p + 16 + l), 2 * k + hi), 1), 4))
    return _mul(q, _lane(_k4_scales(w, p + 4), 2 * k + hi))


_q5_k_end = _q4_k_end   # same d, dmin and scale bytes


@njit(inline="always")
def _q6_k_w(w, p, c):
    # block_q6_K, 210 bytes: ql[128] @0, qh[64] @128, scales int8[16] @192, d @208; in half h, value
    # 128h + 32k + l has low bits from ql[64h + 32(k&1) + l] (hi nibble for k >= 2) and high bits 2k..2k+1
    # of qh[32h + l]; w = d * sc * (q - 32), sub-blocks of 16 (value 16c.. has scale c)
    h, k, l = c >> 3, (c >> 1) & 3, 16 * (c & 1)
    q = _and(_shr(_u8x16(w, p + 64 * h + 32 * (k & 1) + l), 4 * (k >> 1)), 15)
    q = _or(q, _shl(_and(_shr(_u8x16(w, p + 128 + 32 * h + l), 2 * k), 3), 4))
    return _mul(q, _lane(_i8x16(w, p + 192), c))


@njit(inline="always")
def _q6_k_end(acc, a, w, p, xs, s, v, xd):
    acc = _fma(acc, a, _f16(w, p + 208, xd))
    sums = _madd(_i8x16(w, p + 192), _i32x16(xs, s * xs.shape[1] + v // 16))
    return _fma(acc, sums, _f16(w, p + 208, f32(-32) * xd))


@njit(inline="always")
def _q2_k_w(w, p, c):
    # block_q2_K, 84 bytes: scales[16] @0 (lo nibble scale, hi nibble min), qs[64] @16 (value 128h + 32k + l
    # = bits 2k..2k+1 of qs[32h + l]), d @80, dmin @82; w = d * sc * q - dmin * m, sub-blocks of 16
    h, k, l = c >> 3, (c >> 1) & 3, 16 * (c & 1)
    return _mul(_and(_shr(_u8x16(w, p + 16 + 32 * h + l), 2 * k), 3), _lane(_and(_u8x16(w, p), 15), c))


@njit(inline="always")
def _q2_k_end(acc, a, w, p, xs, s, v, xd):
    acc = _fma(acc, a, _f16(w, p + 80, xd))
    return _fma(acc, _madd(_shr(_u8x16(w, p), 4), _i32x16(xs, s * xs.shape[1] + v // 16)), _f16(w, p + 82, -xd))


@njit(inline="always")
def _q3_k_w(w, p, c):
    # block_q3_K, 110 bytes: hmask[32] @0 (bit b of hmask[l] set: value 32b + l keeps +4), qs[64] @32 as in
    # Q2_K, scales[12] @96 (see _q3_scales_ir), d @108; w = d * sc * (q + 4 * hbit - 4), sub-blocks of 16
    h, k, l = c >> 3, (c >> 1) & 3, 16 * (c & 1)
    q = _or(_and(_shr(_u8x16(w, p + 32 + 32 * h + l), 2 * k), 3), _shl(_and(_shr(_u8x16(w, p + l), 4 * h + k), 1), 2))
    return _mul(q, _lane(_q3_scales(w, p + 96), c))


@njit(inline="always")
def _q3_k_end(acc, a, w, p, xs, s, v, xd):
    acc = _fma(acc, a, _f16(w, p + 108, xd))
    return _fma(acc, _madd(_q3_scales(w, p + 96), _i32x16(xs, s * xs.shape[1] + v // 16)),
                _f16(w, p + 108, f32(-4) * xd))


# --- the same blocks on 8-bit activations (the gate / up projections) ---------------------------------------
# A K-quant is two more functions over its 8 chunks of 32 values (value 32c + l, l < 32): `_<type>_u8(w, p, c)`,
# the unsigned quants as 32 bytes in 16 int16 lanes (masks keep the int16 shifts inside each byte), and
# `_<type>_m8(w, p, c)`, the int16 multipliers of the 16 lanes that pmaddubsw makes of them (the sub-block
# scale, or the scales of two sub-blocks of 16). pmaddubsw multiplies the quants by the int8 activations and
# adds pairs (at most 2 * 63 * 127, no saturation); pmaddwd by the multipliers gives int32 lanes of
# sum_l sc_l q_l x8_l. The type's offset or min comes in its `_end`, from the 8-bit activation sums.

@njit(inline="always")
def _q4_k_u8(w, p, c):
    return _and(_shr(_i16x16(w, p + 16 + 32 * (c >> 1)), 4 * (c & 1)), 0x0F0F)   # lo nibbles, then hi


@njit(inline="always")
def _q4_k_m8(w, p, c):
    return _lane(_k4_scales(w, p + 4), c)


@njit(inline="always")
def _q5_k_u8(w, p, c):
    hi = _shl(_and(_shr(_i16x16(w, p + 16), c), 0x0101), 4)                       # bit c of qh[l]
    return _or(_and(_shr(_i16x16(w, p + 48 + 32 * (c >> 1)), 4 * (c & 1)), 0x0F0F), hi)


_q5_k_m8 = _q4_k_m8


@njit(inline="always")
def _q6_k_u8(w, p, c):
    h, k = c >> 2, c & 3
    lo = _and(_shr(_i16x16(w, p + 64 * h + 32 * (k & 1)), 4 * (k >> 1)), 0x0F0F)
    return _or(lo, _shl(_and(_shr(_i16x16(w, p + 128 + 32 * h), 2 * k), 0x0303), 4))


@njit(inline="always")
def _q6_k_m8(w, p, c):
    return _lane_pair(_i8x16(w, p + 192), 2 * c)


@njit(inline="always")
def _q2_k_u8(w, p, c):
    return _and(_shr(_i16x16(w, p + 16 + 32 * (c >> 2)), 2 * (c & 3)), 0x0303)


@njit(inline="always")
def _q2_k_m8(w, p, c):
    return _lane_pair(_and(_u8x16(w, p), 15), 2 * c)


@njit(inline="always")
def _q3_k_u8(w, p, c):
    q = _and(_shr(_i16x16(w, p + 32 + 32 * (c >> 2)), 2 * (c & 3)), 0x0303)
    return _or(q, _shl(_and(_shr(_i16x16(w, p), c), 0x0101), 2))                  # +4 where hmask bit c is set


@njit(inline="always")
def _q3_k_m8(w, p, c):
    return _lane_pair(_q3_scales_once(w, p + 96), 2 * c)


@njit(inline="always")
def _q8_0_w(w, p, c):
    # block_q8_0, 34 bytes: d @0, qs int8[32] @2; w = d * q
    return _i8x16(w, p + 2 + 16 * c)


@njit(inline="always")
def _d_end(acc, a, w, p, xs, s, v, xd):
    """Types whose only float scale is d @0 (Q8_0, Q4_0, Q5_0)."""
    return _fma(acc, a, _f16(w, p, xd))


@njit(inline="always")
def _q4_0_w(w, p, c):
    # block_q4_0, 18 bytes: d @0, qs[16] @2 (value l = lo nibble of qs[l], value l + 16 = hi nibble);
    # w = d * (q - 8)
    return _add(_nibble(_u8x16(w, p + 2), c), _fill(-8))


@njit(inline="always")
def _q4_1_w(w, p, c):
    # block_q4_1, 20 bytes: d @0, m @2, qs[16] @4 as in Q4_0; w = d * q + m (m times the block's x sum)
    return _nibble(_u8x16(w, p + 4), c)


@njit(inline="always")
def _dm_end(acc, a, w, p, xs, s, v, xd):
    """Types with d @0 and a min m @2 (Q4_1, Q5_1): m multiplies the block's activation sum."""
    g = v // 16
    return _plus(_fma(acc, a, _f16(w, p, xd)), _f16(w, p + 2, xd * f32(xs[s, g] + xs[s, g + 1])))


@njit(inline="always")
def _q5_0_w(w, p, c):
    # block_q5_0, 22 bytes: d @0, qh u32 @2 (bit l: bit 4 of value l), qs[16] @6 (low 4 bits as in Q4_0);
    # w = d * (q - 16): the fifth bit and the offset together add 0 or -16
    return _add(_nibble(_u8x16(w, p + 6), c), _bits(_u32(w, p + 2), 16 * c, 0, -16))


@njit(inline="always")
def _q5_1_w(w, p, c):
    # block_q5_1, 24 bytes: d @0, m @2, qh u32 @4, qs[16] @8 as in Q5_0; w = d * q + m
    return _or(_nibble(_u8x16(w, p + 8), c), _bits(_u32(w, p + 4), 16 * c, 16, 0))


# --- the 32-value types on 8-bit activations in blocks of 32 (llama.cpp's Q8_0 input for these types) --------
# x8 int8 (N, D), one float scale per 32 values (xd (N, D // 32)), and xo int32 (N, D // 4): per block the 8
# lanes (-16 * the block's sum of x8, 0, .., 0) (rows.py quantize_row32). A block's 32 quants go in as unsigned
# bytes (`_<type>_b`), and one vpdpbusd dots them with x8. A type's unsigned quants are its values plus `zero`
# (Q4_0 8, Q5_0 16, Q8_0 128), so the int32 sum starts from -zero * the block's sum of x8, which the offset
# lanes give by an exact shift (`_start32`): sum_l (q_l - 16) x_l = sum_l q_l x_l - 16 sum_l x_l for Q5_0.
# Q4_1 / Q5_1 (zero 0: the sum starts at zero): the min times the same lanes, in float (`_dm32_end`).

@njit(inline="always")
def _q4_0_b(w, p):
    return _nib32(w, p + 2)


@njit(inline="always")
def _q5_0_b(w, p):
    return _or(_nib32(w, p + 6), _hi32(w, p + 2))


@njit(inline="always")
def _q4_1_b(w, p):
    return _nib32(w, p + 4)


@njit(inline="always")
def _q5_1_b(w, p):
    return _or(_nib32(w, p + 8), _hi32(w, p + 4))


@njit(inline="always")
def _q8_0_b(w, p):
    # Q8_0's int8 quants plus 128 (its tiles of eight only: its rows take x in 11 bits, rows.py)
    return _xor(_i16x16(w, p + 2), 0x8080)


@njit(inline="always")
def _start32(o, zero):
    """The int32 lanes a block's dot starts from: -zero * its sum of x8 (zero 8, 16 or 128) from its offset
    lanes o, which hold -16 * that sum, or zeros (zero 0: a type with a min)."""
    if zero == 8:
        return _sar(o, 1)
    if zero == 128:
        return _sal(o, 3)
    return o if zero else _zero_i32()


@njit(inline="always")
def _dm32_end(acc, a, w, p, xo, s, v, xd):
    """Q4_1 / Q5_1 on 8-bit input: d @0 times the int32 lanes, and the min m @2 times the block's sum of x8,
    which the offset lanes hold times -16 (exact: a power of two)."""
    acc = _fma(acc, a, _f16(w, p, xd))
    return _fma(acc, _v8i(xo, s * xo.shape[1] + (v >> 2)), _f16(w, p + 2, xd * f32(-1 / 16)))


@njit(inline="always")
def _block1_32(b8, end, zero, acc, w, p, x8, xo, s, v, xd):
    """acc + the 32-value block at byte p (its bytes from b8: the values + zero, 0 for the types with a min)
    . values v.. of activation row s in 8 bits (xd: that block's scale)."""
    a = _dpbusd(_start32(_v8i(xo, s * xo.shape[1] + (v >> 2)), zero), b8(w, p), x8, s * x8.shape[1] + v)
    return end(acc, a, w, p, xo, s, v, xd)


@njit(inline="always")
def _block1(chunk, end, n, acc, w, p, x16, xs, s, v, xd):
    """acc (8 f32 lanes) + the block at byte p (n chunks of 16 values) . values v.. of activation row s."""
    x = s * x16.shape[1] + v
    a = _zero_i32()
    for k in range(n // 2):   # nested loops of 2: LLVM unrolled a single loop of 15 only in part
        for m in range(2):
            q, o = chunk(w, p, 2 * k + m), 32 * k + 16 * m
            a = _madd(q, _i16x16(x16, x)) if o == 0 else _dot(a, q, _i16x16(x16, x + o))   # no zeroed register
    return end(acc, a, w, p, xs, s, v, xd)


@njit(inline="always")
def _block4(chunk, end, n, acc0, acc1, acc2, acc3, w, p, x16, xs, s0, s1, s2, s3, v, xd0, xd1, xd2, xd3):
    """_block1 for rows s0..s3: each chunk is unpacked once and dotted with four tokens (int32 sums in
    registers), so for many tokens the pmaddwd, not the unpacking, sets the pace."""
    D = x16.shape[1]
    x0, x1, x2, x3 = s0 * D + v, s1 * D + v, s2 * D + v, s3 * D + v
    a0, a1, a2, a3 = _zero_i32(), _zero_i32(), _zero_i32(), _zero_i32()
    b0, b1, b2, b3 = _zero_i32(), _zero_i32(), _zero_i32(), _zero_i32()
    for k in range(n // 2):   # two int32 sums per token (even / odd chunks): eight chains of pmaddwd, not four
        q, o = chunk(w, p, 2 * k), 32 * k
        if k == 0:
            a0, a1 = _madd(q, _i16x16(x16, x0)), _madd(q, _i16x16(x16, x1))
            a2, a3 = _madd(q, _i16x16(x16, x2)), _madd(q, _i16x16(x16, x3))
        else:
            a0, a1 = _dot(a0, q, _i16x16(x16, x0 + o)), _dot(a1, q, _i16x16(x16, x1 + o))
            a2, a3 = _dot(a2, q, _i16x16(x16, x2 + o)), _dot(a3, q, _i16x16(x16, x3 + o))
        q, o = chunk(w, p, 2 * k + 1), 32 * k + 16
        if k == 0:
            b0, b1 = _madd(q, _i16x16(x16, x0 + o)), _madd(q, _i16x16(x16, x1 + o))
            b2, b3 = _madd(q, _i16x16(x16, x2 + o)), _madd(q, _i16x16(x16, x3 + o))
        else:
            b0, b1 = _dot(b0, q, _i16x16(x16, x0 + o)), _dot(b1, q, _i16x16(x16, x1 + o))
            b2, b3 = _dot(b2, q, _i16x16(x16, x2 + o)), _dot(b3, q, _i16x16(x16, x3 + o))
    return (end(acc0, _sum(a0, b0), w, p, xs, s0, v, xd0), end(acc1, _sum(a1, b1), w, p, xs, s1, v, xd1),
            end(acc2, _sum(a2, b2), w, p, xs, s2, v, xd2), end(acc3, _sum(a3, b3), w, p, xs, s3, v, xd3))


@njit(inline="always")
def _block1_8(u8, end, m8, acc, w, p, x8, xs, s, v, xd):
    """acc + the K-quant block at byte p . values v.. of activation row s in 8 bits (see the `_u8` types)."""
    x = s * x8.shape[1] + v
    a = _zero_i32()
    for c in range(8):
        a = _dot(a, _maddubs(u8(w, p, c), _i16x16(x8, x + 32 * c)), m8(w, p, c))
    return end(acc, a, w, p, xs, s, v, xd)


# --- tiles of eight tokens whose lanes are the tokens (rows.py _rows_tiles) -----------------------------------
# With four tokens or more, a K-quant row is first written out once: its quants as unsigned bytes (one per
# value), its sub-block scales as floats (d * sc), and the int16 multipliers of its 16-value activation sums
# (mins or offsets) with their float factor. The tokens' 8-bit activations are interleaved once per call, eight
# tokens at a time, in groups of four values: lane t of a 32-byte vector holds token t's four bytes. Four of a
# row's quants broadcast to every lane then meet eight tokens in one vpdpbusd; int32 lane t sums token t's
# products over a sub-block, and one float multiply-add by the sub-block's scale serves all eight tokens. Per
# 256 values and eight tokens: 64 vpdpbusd, 8 or 16 conversions and multiply-adds, 8 pmaddwd for the sums;
# no per-token unpacking and no horizontal sums (the tiles of four above spent ~6 instructions per 32 values
# and token).
# A type is `_<type>_u8` (above) and `_<type>_t8(w, p)`: the block's sub-block scales (int16 lanes, the first
# 8 or 16), d (8 float lanes), the 16 multipliers of its 16-value activation sums (int16 lanes) and their
# factor (8 float lanes): w = d * sc_j * u - factor-side term, as in the type's `_end`.

def _store_ir(c, b, sig, a, i, v):
    data = c.make_array(sig.args[0])(c, b, a).data
    st = b.store(v, b.bitcast(b.gep(data, [i]), v.type.as_pointer()))
    st.align = 1
    return c.get_dummy_value()


_put = _op("_put", types.none, _store_ir, (0,))          # a vector stored at flat element i of an array
_splat32 = _op("_splat32", I32, lambda c, b, sig, a, i: _splat(b, _load(c, b, sig, a, i, _i32), _V8I), (0,))
_v8i = _op("_v8i", I32, lambda c, b, sig, a, i: _load(c, b, sig, a, i, _V8I), (0,))
_v8f = _op("_v8f", FV, lambda c, b, sig, a, i: _load(c, b, sig, a, i, _V8F), (0,))
_vnni = _op("_vnni", I32, lambda c, b, sig, acc, u, s: _vnni_ir(b, acc, u, s))
_float = _op("_float", FV, lambda c, b, sig, a: b.sitofp(a, _V8F))
_fsplat = _op("_fsplat", FV, lambda c, b, sig, f: _splat(b, f, _V8F))
_mul_add = _op("_mul_add", FV, lambda c, b, sig, acc, x, y: b.fadd(acc, b.fmul(x, y, flags=["contract"]),
                                                                   flags=["contract"]))
_times = _op("_times", FV, lambda c, b, sig, x, y: b.fmul(x, y))
_sar = _op("_sar", I32, lambda c, b, sig, v, n: b.ashr(v, _splat(b, b.trunc(n, _i32), _V8I)))
_sal = _op("_sal", I32, lambda c, b, sig, v, n: b.shl(v, _splat(b, b.trunc(n, _i32), _V8I)))
_lane_f = _op("_lane_f", types.float32, lambda c, b, sig, v, k: b.extract_element(v, k))
# the float32 whose bits are the int32 v
_bits_f32 = _op("_bits_f32", types.float32, lambda c, b, sig, v: b.bitcast(b.trunc(v, _i32) if v.type.width > 32
                                                                            else v, _f32))
# int16 lanes 8h .. 8h + 7 as floats
_half_f = _op("_half_f", FV, lambda c, b, sig, v, h: b.sitofp(b.sext(b.select(
    b.icmp_signed("!=", h, ir.Constant(h.type, 0)), _pick(b, v, list(range(8, 16))), _pick(b, v, list(range(8)))),
    _V8I), _V8F))


@njit(inline="always")
def _q4_k_t8(w, p):
    sc = _k4_scales(w, p + 4)
    return sc, _f16(w, p, f32(1)), _mins16(sc), _f16(w, p + 2, f32(-1))


_q5_k_t8 = _q4_k_t8


@njit(inline="always")
def _q6_k_t8(w, p):
    sc = _i8x16(w, p + 192)
    return sc, _f16(w, p + 208, f32(1)), sc, _f16(w, p + 208, f32(-32))


@njit(inline="always")
def _q2_k_t8(w, p):
    s = _u8x16(w, p)
    return _and(s, 15), _f16(w, p + 80, f32(1)), _shr(s, 4), _f16(w, p + 82, f32(-1))


@njit(inline="always")
def _q3_k_t8(w, p):
    sc = _q3_scales(w, p + 96)
    return sc, _f16(w, p + 108, f32(1)), sc, _f16(w, p + 108, f32(-4))


@njit(inline="always")
def _unpack8(u8, t8, n_sub, w, p, blk, wq, ws, wk, wm):
    """The K-quant block at byte p of w as block blk of a row's scratch: wq uint8 [256 blk ..] its quants, one
    byte each; ws f32 [16 blk ..] its n_sub (8 or 16) sub-block scales d * sc; wk int32 [8 blk ..] the
    multipliers of its 16-value activation sums, two int16 in each; wm f32 [blk] their factor."""
    for c in range(8):
        _put(wq, 256 * blk + 32 * c, u8(w, p, c))
    sc, d, k, kf = t8(w, p)
    _put(ws, 16 * blk, _times(_half_f(sc, 0), d))
    if n_sub == 16:
        _put(ws, 16 * blk + 8, _times(_half_f(sc, 1), d))
    _put(wk, 8 * blk, k)
    wm[blk] = _lane_f(kf, 0)


@njit(inline="always")
def _tile8(n_sub, acc, q, s, k, m, blk, xt, xk, xd):
    """acc (four float vectors, one per row; lanes: eight tokens) + block blk of four rows . the tile's values
    256 blk ... The rows' scratch (_unpack8) comes as four-tuples: q, s, k, m. Tile: xt int32 [8 g + t] token
    t's four bytes of group g; xk int32 [8 c + t] token t's 16-value sums 2c and 2c + 1 as int16; xd f32
    [8 blk + t] its scales. Four rows share each token vector load (1.25 loads per vpdpbusd; two rows: 1.5)."""
    q0, q1, q2, q3 = q
    s0, s1, s2, s3 = s
    g0, g1, g2, g3 = _zero(), _zero(), _zero(), _zero()
    per = 64 // n_sub                                    # groups of four values in a sub-block
    for j in range(n_sub):
        a0, a1, a2, a3 = _zero_i32(), _zero_i32(), _zero_i32(), _zero_i32()
        for g in range(per):
            i = 64 * blk + per * j + g
            x = _v8i(xt, 8 * i)
            a0, a1 = _vnni(a0, _splat32(q0, 4 * i), x), _vnni(a1, _splat32(q1, 4 * i), x)
            a2, a3 = _vnni(a2, _splat32(q2, 4 * i), x), _vnni(a3, _splat32(q3, 4 * i), x)
        f = 16 * blk + j
        g0, g1 = _mul_add(g0, _float(a0), _fsplat(s0[f])), _mul_add(g1, _float(a1), _fsplat(s1[f]))
        g2, g3 = _mul_add(g2, _float(a2), _fsplat(s2[f])), _mul_add(g3, _float(a3), _fsplat(s3[f]))
    k0, k1, k2, k3 = k
    a0, a1, a2, a3 = _zero_i32(), _zero_i32(), _zero_i32(), _zero_i32()
    for c in range(8):
        x, i = _v8i(xk, 8 * (8 * blk + c)), 8 * blk + c
        a0, a1 = _dot(a0, x, _splat32(k0, i)), _dot(a1, x, _splat32(k1, i))
        a2, a3 = _dot(a2, x, _splat32(k2, i)), _dot(a3, x, _splat32(k3, i))
    m0, m1, m2, m3 = m
    g0, g1 = _mul_add(g0, _float(a0), _fsplat(m0[blk])), _mul_add(g1, _float(a1), _fsplat(m1[blk]))
    g2, g3 = _mul_add(g2, _float(a2), _fsplat(m2[blk])), _mul_add(g3, _float(a3), _fsplat(m3[blk]))
    d = _v8f(xd, 8 * blk)
    c0, c1, c2, c3 = acc
    return _mul_add(c0, g0, d), _mul_add(c1, g1, d), _mul_add(c2, g2, d), _mul_add(c3, g3, d)


# The 32-value types the same way, on 8-bit input in blocks of 32 (rows.py quantize_row32): a block is 32
# bytes of quants (`_<type>_b`, above), its d and, for Q4_1 / Q5_1, its min (`_<type>_t32`); the tile's xk
# holds, per block and token, -16 times the block's sum of x8, from which the dot starts (-zero times the sum:
# `_start32`) or which the min multiplies (zero 0), as in `_block1_32`. Q8_0 too (zero 128), whose tiles
# take x in 8 bits while its rows take 11.

@njit(inline="always")
def _d32_t32(w, p):
    return _f16(w, p, f32(1)), _zero()


@njit(inline="always")
def _dm32_t32(w, p):
    return _f16(w, p, f32(1)), _f16(w, p + 2, f32(-1 / 16))


@njit(inline="always")
def _unpack32(b8, t32, zero, w, p, blk, wq, ws, wk, wm):
    """The 32-value block at byte p of w as block blk of a row's scratch (the layout of _unpack8): wq uint8
    [32 blk ..] its quants, one byte each; ws f32 [blk] its d; wm f32 [blk] its min / -16 (0: no min)."""
    _put(wq, 32 * blk, b8(w, p))
    d, m = t32(w, p)
    ws[blk] = _lane_f(d, 0)
    wm[blk] = _lane_f(m, 0)


@njit(inline="always")
def _tile8_32(zero, acc, q, s, k, m, blk, xt, xk, xd):
    """_tile8 for block blk (32 values) of four rows of a 32-value type: xk int32 [8 blk + t] token t's -16 *
    the block's sum of x8, xd f32 [8 blk + t] its scale."""
    q0, q1, q2, q3 = q
    o = _v8i(xk, 8 * blk)
    a0 = _start32(o, zero)
    a1, a2, a3 = a0, a0, a0
    for g in range(8):
        i = 8 * blk + g
        x = _v8i(xt, 8 * i)
        a0, a1 = _vnni(a0, _splat32(q0, 4 * i), x), _vnni(a1, _splat32(q1, 4 * i), x)
        a2, a3 = _vnni(a2, _splat32(q2, 4 * i), x), _vnni(a3, _splat32(q3, 4 * i), x)
    d = _v8f(xd, 8 * blk)
    s0, s1, s2, s3 = s
    c0, c1, c2, c3 = acc
    c0 = _mul_add(c0, _float(a0), _times(d, _fsplat(s0[blk])))
    c1 = _mul_add(c1, _float(a1), _times(d, _fsplat(s1[blk])))
    c2 = _mul_add(c2, _float(a2), _times(d, _fsplat(s2[blk])))
    c3 = _mul_add(c3, _float(a3), _times(d, _fsplat(s3[blk])))
    if not zero:
        o = _float(o)
        m0, m1, m2, m3 = m
        c0, c1 = _mul_add(c0, o, _times(d, _fsplat(m0[blk]))), _mul_add(c1, o, _times(d, _fsplat(m1[blk])))
        c2, c3 = _mul_add(c2, o, _times(d, _fsplat(m2[blk]))), _mul_add(c3, o, _times(d, _fsplat(m3[blk])))
    return c0, c1, c2, c3
