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
    e = ids[t,k]. x (T, D) f32, topk_ids (T, K) int, topk_weights (T, K) f32 -> (T, D) f32, torch or numpy
    as x is. The loop of DeepSeek-V3's inference/model.py MoE.forward, in float32."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    ids = torch.as_tensor(topk_ids).long()
    wts = torch.as_tensor(topk_weights, dtype=torch.float32)
    y = torch.zeros_like(xt)
    for e in torch.unique(ids).tolist():
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
