"""The MoE router in Triton: its logits for a decode step's few tokens (router_logits), then one kernel for
gating, group-limited top-k, weights, counts (route).

Shapes: M tokens, E experts, K experts per token, G expert groups of E/G. Same result as runtime/model.py
Router.route from the logits on (DeepSeek-V3 paper section 2.1.2; llama.cpp build_moe_ffn), plus the
bookkeeping of offload/hybrid.py OffloadedMoE.forward (routing counts, expert id -> CPU id). One program per
token row; the E logits sit in registers as a (G, E/G) tile (one group per row, both sides padded to a power
of two, so E = 160 = 8 x 20 takes an 8 x 32 tile) and never go back to memory:
  1. probs = sigmoid(logits), or softmax over the row;  sel = probs + bias (the bias only selects).
  2. With groups: each group's score is the sum of its two best sel; the n_group_used best groups are kept
     and the sel of every other expert becomes -inf.
  3. K rounds of "take the max of sel, then set it to -inf" give the ids in descending sel, as torch.topk
     orders them. On an exact tie the lowest index wins (tl.max with tie_break_left); torch.topk does not
     promise which of equal values it returns, so on exact ties the ids may differ from the reference's.
  4. The weights are the probs of the chosen ids, recomputed from their K logits with the same formula:
     divided by their sum (clamped at 2^-14, as Router.route) with norm, then times scale.
  5. Optionally counts[ids] += 1 (atomic adds, as scatter_add_) and cpu_ids = cpu_id[ids].
The grid depends only on M and every shape on the config, so a CUDA graph can capture the launch.
On the GPU tl.exp is ex2.approx of x * log2(e): a few ulp off torch's exp for router-sized |x|, so weights
differ from torch's in the last bits, and ids can differ only where two sel values are that close.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dslocal.runtime.config import GATING_SIGMOID, GATING_SOFTMAX

NORM_MIN = tl.constexpr(6.103515625e-5)   # 2^-14: the floor on the weight sum in Router.route
LOGITS_MAX_ROWS = 4      # router_logits runs its own kernel up to this many tokens (decode), torch's beyond
LOGITS_BLOCK_E = 2       # experts per program: V2-Lite's 64 take 32 programs, V3's 256 take 128
LOGITS_BLOCK_D = 512


@triton.jit
def _logits_kernel(p_x, p_w, p_out, stride_x, D, E, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (M, cdiv(E, BLOCK_E)): logits[m, e] = sum_d x[m, d] w[e, d], x in its own dtype, sums in fp32."""
    i_m, i_e = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_e = i_e * BLOCK_E + tl.arange(0, BLOCK_E)
    m_e = o_e < E
    b_acc = tl.zeros((BLOCK_E, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_x = tl.load(p_x + i_m * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_w = tl.load(p_w + o_e[:, None].to(tl.int64) * D + o_d[None, :], mask=m_e[:, None] & m_d[None, :],
                      other=0.0)
        b_acc += b_w.to(tl.float32) * b_x[None, :]
    tl.store(p_out + i_m * E + o_e, tl.sum(b_acc, 1), mask=m_e)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router.logits: x (M, D) in any float dtype, weight (E, D) fp32 -> (M, E) fp32 = x.float() @ weight.t().
    For a decode step's few rows one kernel reads x as it is (torch needs a float copy of x first and
    then two kernels for the product); longer inputs go to torch."""
    M, D = x.shape
    if M > LOGITS_MAX_ROWS or weight.dtype != torch.float32 or not weight.is_contiguous():
        return x.float() @ weight.float().t()
    if weight.shape[1] != D or x.stride(-1) != 1 or weight.device != x.device:
        raise ValueError(f"router_logits: x {tuple(x.shape)} against weight {tuple(weight.shape)}")
    E = weight.shape[0]
    out = torch.empty((M, E), dtype=torch.float32, device=x.device)
    if M:
        _logits_kernel[(M, triton.cdiv(E, LOGITS_BLOCK_E))](x, weight, out, x.stride(0), D, E,
                                                          BLOCK_E=LOGITS_BLOCK_E, BLOCK_D=LOGITS_BLOCK_D,
                                                          num_warps=4)
    return out


@triton.jit
def _gate(b_logit, b_max, b_sum, SIGMOID: tl.constexpr):
    """probs from logits: sigmoid, or softmax given the row's max logit and sum of exp(logit - max)."""
    if SIGMOID:
        return tl.sigmoid(b_logit)
    return tl.exp(b_logit - b_max) / b_sum


@triton.jit
def _route_kernel(p_logits, p_bias, p_ids, p_w, p_cpu_id, p_cpu_ids, p_counts, stride_m, E, EG, scale,
                  K: tl.constexpr, N_GROUP_USED: tl.constexpr, SIGMOID: tl.constexpr, NORM: tl.constexpr,
                  GROUPED: tl.constexpr, CPU_IDS: tl.constexpr, COUNTS: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (M,): row i_m of logits (M, E) -> ids, w (M, K) [, cpu_ids (M, K)]; counts (E,) += chosen."""
    i_m = tl.program_id(0).to(tl.int64)
    o_g = tl.arange(0, BLOCK_G)
    o_j = tl.arange(0, BLOCK_EG)
    # without groups the tile is one row of E (EG = E, BLOCK_G = 1)
    o_e = o_g[:, None] * EG + o_j[None, :]                                            # (BLOCK_G, BLOCK_EG)
    m_e = (o_j[None, :] < EG) & (o_e < E)
    p_row = p_logits + i_m * stride_m
    b_logit = tl.load(p_row + o_e, mask=m_e, other=float("-inf"))
    b_max, b_sum = 0.0, 1.0
    if not SIGMOID:
        b_max = tl.max(tl.max(b_logit, 1), 0)
        b_sum = tl.sum(tl.sum(tl.exp(b_logit - b_max), 1), 0)                       # padding adds exp(-inf) = 0
    b_bias = tl.load(p_bias + o_e, mask=m_e, other=0.0)
    b_sel = tl.where(m_e, _gate(b_logit, b_max, b_sum, SIGMOID) + b_bias, float("-inf"))

    if GROUPED:
        # group score: best sel plus second best, the best removed by its position so that a tie counts twice
        b_top1, i_top1 = tl.max(b_sel, 1, return_indices=True, return_indices_tie_break_left=True)
        b_top2 = tl.max(tl.where(o_j[None, :] == i_top1[:, None], float("-inf"), b_sel), 1)
        b_score = b_top1 + b_top2                                                     # (BLOCK_G,), padding -inf
        m_keep = o_g < 0
        for _ in tl.static_range(N_GROUP_USED):
            _, i_g = tl.max(b_score, 0, return_indices=True, return_indices_tie_break_left=True)
            m_keep = m_keep | (o_g == i_g)
            b_score = tl.where(o_g == i_g, float("-inf"), b_score)
        b_sel = tl.where(m_keep[:, None], b_sel, float("-inf"))

    # top-k on the flattened tile: position f = g * BLOCK_EG + j is monotone in expert g * EG + j, so the
    # lowest position among equal maxima is also the lowest expert id
    b_sel = tl.reshape(b_sel, (BLOCK_G * BLOCK_EG,))
    o_f = tl.arange(0, BLOCK_G * BLOCK_EG)
    o_k = tl.arange(0, BLOCK_K)
    b_f = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k in tl.static_range(K):
        _, i_f = tl.max(b_sel, 0, return_indices=True, return_indices_tie_break_left=True)
        b_f = tl.where(o_k == k, i_f, b_f)
        b_sel = tl.where(o_f == i_f, float("-inf"), b_sel)
    m_k = o_k < K
    b_ids = (b_f // BLOCK_EG) * EG + b_f % BLOCK_EG                                  # (BLOCK_K,) expert ids

    b_w = tl.where(m_k, _gate(tl.load(p_row + b_ids, mask=m_k, other=0.0), b_max, b_sum, SIGMOID), 0.0)
    if NORM:
        b_w = b_w / tl.maximum(tl.sum(b_w, 0), NORM_MIN)
    b_w = b_w * scale
    o_out = i_m * K + o_k
    tl.store(p_ids + o_out, b_ids.to(tl.int64), mask=m_k)
    tl.store(p_w + o_out, b_w, mask=m_k)
    if CPU_IDS:
        tl.store(p_cpu_ids + o_out, tl.load(p_cpu_id + b_ids, mask=m_k), mask=m_k)
    if COUNTS:
        # only atomicity is needed: nothing reads counts in this kernel
        tl.atomic_add(p_counts + b_ids, tl.full((BLOCK_K,), 1, tl.int64), mask=m_k, sem="relaxed")


def _check_table(t, E, device, name):
    """Raises unless t is a contiguous int64 (E,) tensor on device."""
    if t.shape != (E,) or t.dtype != torch.int64 or not t.is_contiguous() or t.device != device:
        raise ValueError(f"route needs {name} as a contiguous int64 ({E},) tensor on {device}")


def route(logits, bias, k, gating, n_group=1, n_group_used=1, norm_weights=True, scale=1.0,
          cpu_id=None, counts=None):
    """Router.route from its logits: logits (M, E) fp32, bias (E,) fp32 -> ids (M, K) int64 in descending
    sel, weights (M, K) fp32[, cpu_ids (M, K) int64 = cpu_id[ids] when cpu_id (E,) is given]. counts (E,)
    int64, when given, gets += 1 for every chosen (token, expert). scale 0.0 means none, as in the GGUF."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError("route needs logits as an (M, E) float32 tensor contiguous along E")
    M, E = logits.shape
    device = logits.device
    if bias.shape != (E,) or bias.dtype != torch.float32 or not bias.is_contiguous() or bias.device != device:
        raise ValueError(f"route needs bias as a contiguous float32 ({E},) tensor on {device}")
    if gating not in (GATING_SIGMOID, GATING_SOFTMAX):
        raise ValueError(f"route does not know gating function {gating}")
    grouped = n_group > 1
    G = n_group if grouped else 1
    if grouped and (E % G or E // G < 2 or not 0 < n_group_used < G or k > n_group_used * (E // G)):
        raise ValueError(f"route cannot choose {k} of {E} experts from {n_group_used} of {n_group} groups")
    if not 0 < k <= E:
        raise ValueError(f"route cannot choose {k} of {E} experts")
    if cpu_id is not None:
        _check_table(cpu_id, E, device, "cpu_id")
    if counts is not None:
        _check_table(counts, E, device, "counts")
    ids = torch.empty((M, k), dtype=torch.int64, device=device)
    weights = torch.empty((M, k), dtype=torch.float32, device=device)
    cpu_ids = torch.empty((M, k), dtype=torch.int64, device=device) if cpu_id is not None else None
    if M > 0:
        _route_kernel[(M,)](
            logits, bias, ids, weights, cpu_id, cpu_ids, counts, logits.stride(0), E, E // G,
            1.0 if scale == 0.0 else float(scale),
            K=k, N_GROUP_USED=n_group_used if grouped else 0, SIGMOID=gating == GATING_SIGMOID,
            NORM=bool(norm_weights), GROUPED=grouped, CPU_IDS=cpu_id is not None, COUNTS=counts is not None,
            BLOCK_G=triton.next_power_of_2(G), BLOCK_EG=triton.next_power_of_2(E // G),
            # one warp: at most 8 x 32 values, and every reduction (about K + n_group_used of them) stays in shuffles
            BLOCK_K=triton.next_power_of_2(k), num_warps=1)
    if cpu_id is not None:
        return ids, weights, cpu_ids
    return ids, weights
