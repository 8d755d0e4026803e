"""Reference versions of the fast ops, in plain torch on dequantized weights. Written once; tests import them.

Letters: T tokens, D hidden, K experts per token, E experts, F expert ffn.
"""
from __future__ import annotations

import numpy as np
import torch

from dslocal.kernels.experts import ExpertTensors
from dslocal.quant.dequant import dequantize


def moe_ffn(x, topk_ids, topk_weights, experts: ExpertTensors, out=None):
    """Routed-expert FFN of one layer: out[t] = sum_k w[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),
    e = ids[t,k], skipping pairs with id -1. x (T, D) f32, topk_ids (T, K) int, topk_weights (T, K) f32 ->
    (T, D) f32, torch or numpy as x is. The loop of DeepSeek-V3's inference/model.py MoE.forward, in float32."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    ids = torch.as_tensor(topk_ids).long()
    wts = torch.as_tensor(topk_weights, dtype=torch.float32)
    y = torch.zeros_like(xt)
    for e in torch.unique(ids).tolist():
        if e < 0:      # -1: an expert computed elsewhere (the other device)
            continue
        t, k = torch.where(ids == e)
        gate = torch.from_numpy(dequantize(experts.gate[e], experts.gate_type))   # (F, D)
        up = torch.from_numpy(dequantize(experts.up[e], experts.up_type))         # (F, D)
        down = torch.from_numpy(dequantize(experts.down[e], experts.down_type))   # (D, F)
        h = torch.nn.functional.silu(xt[t] @ gate.T) * (xt[t] @ up.T)           # (n, F)
        y.index_add_(0, t, (h @ down.T) * wts[t, k, None])
    if out is not None:
        torch.as_tensor(out).copy_(y)
        return out
    return y.numpy() if isinstance(x, np.ndarray) else y


def mla_decode(q_lat, q_pe, kv, pe, length, scale):
    """Absorbed MLA attention of T new queries, the last T of `length` cached positions, in fp32: the math of
    runtime/model.py MLA.forward. q_lat (B, T, H, C), q_pe (B, T, H, R), kv (B, S_max, C), pe (B, S_max, R),
    length int or 0-d int tensor -> o_lat (B, T, H, C) fp32."""
    S, T = int(length), q_lat.shape[1]
    c_kv, k_pe = kv[:, :S].float(), pe[:, :S].float()                            # (B, S, C), (B, S, R)
    scores = (torch.einsum("bthc,bsc->bths", q_lat.float(), c_kv)
              + torch.einsum("bthr,bsr->bths", q_pe.float(), k_pe)) * scale
    q_pos = torch.arange(S - T, S, device=kv.device)
    mask = torch.arange(S, device=kv.device)[None, :] > q_pos[:, None]             # (T, S)
    scores = scores.masked_fill(mask[None, :, None, :], float("-inf"))
    return torch.einsum("bths,bsc->bthc", scores.softmax(dim=-1), c_kv)


def rms_norm(x, weight, eps, residual=None):
    """y = x * rsqrt(mean(x^2) + eps) * weight in fp32, returned in x's dtype (runtime/model.py RMSNorm). With
    a residual, x + residual (in x's dtype, as the residual stream adds) is normalized and returned as the new
    residual; without one the new residual is x itself. x, residual (..., D), weight (D,) -> y, new_residual."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype), x
