"""The MoE router's choice for a decode step's few tokens on the CPU (Numba; runtime/model.py Router.route is
the reference, kernels/gpu/router.py the same on the GPU).

    route(logits, bias, gating, n_group, n_group_used, norm, scale, ids, w, counts)

From the logits (M, E) float32 of M tokens: ids (M, K) and weights (M, K) written in place, counts (E,) int64
raised by one per chosen expert (the routing counts offload/hotness.py keeps). Per token, as Router.route:
  1. probs = sigmoid(logits), or softmax over the row; sel = probs + bias (the bias only selects).
  2. With groups: each group's score is the sum of its two best sel; the n_group_used best groups are kept
     and the sel of every other expert becomes -inf.
  3. K rounds of "take the largest sel, then set it to -inf" give the ids in descending sel, as torch.topk
     orders them. On an exact tie the lowest index wins; torch.topk does not promise which of equal values
     it returns, so on exact ties the ids may differ from the reference's.
  4. The weights are the chosen ids' probs: divided by their sum (at least 2^-14) with norm, then times
     scale unless it is 0 or 1.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from dslocal.runtime.config import GATING_SIGMOID

NORM_MIN = 6.103515625e-5     # 2^-14: the floor on the weight sum, as Router.route


@njit(cache=True, nogil=True)
def route(logits, bias, gating, n_group, n_group_used, norm, scale, ids, w, counts):
    """See the module's docstring. logits (M, E), bias (E,) float32; ids (M, K) int64 and w (M, K) float32
    are written; counts (E,) int64 is added to."""
    M, E = logits.shape
    K = ids.shape[1]
    probs = np.empty(E, np.float32)
    sel = np.empty(E, np.float32)
    for m in range(M):
        if gating == GATING_SIGMOID:
            for e in range(E):
                probs[e] = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-logits[m, e])))
        else:
            top = logits[m, 0]
            for e in range(1, E):
                top = max(top, logits[m, e])
            total = np.float32(0.0)
            for e in range(E):
                probs[e] = np.float32(math.exp(logits[m, e] - top))
                total += probs[e]
            for e in range(E):
                probs[e] /= total
        for e in range(E):
            sel[e] = probs[e] + bias[e]
        if n_group > 1:
            _keep_groups(sel, n_group, n_group_used)
        for k in range(K):
            best = 0
            for e in range(1, E):
                if sel[e] > sel[best]:
                    best = e
            ids[m, k] = best
            w[m, k] = probs[best]
            sel[best] = -np.inf
            counts[best] += 1
        if norm:
            total = np.float32(0.0)
            for k in range(K):
                total += w[m, k]
            total = max(total, np.float32(NORM_MIN))
            for k in range(K):
                w[m, k] /= total
        if scale != 0.0 and scale != 1.0:
            for k in range(K):
                w[m, k] *= np.float32(scale)


@njit(inline="always")
def _keep_groups(sel, n_group, n_group_used):
    """sel (E,) set to -inf outside the n_group_used groups whose two best values sum highest."""
    size = sel.shape[0] // n_group
    score = np.empty(n_group, np.float32)
    for g in range(n_group):
        a, b = -np.inf, -np.inf                     # the group's best and second best
        for e in range(g * size, (g + 1) * size):
            if sel[e] > a:
                a, b = sel[e], a
            elif sel[e] > b:
                b = sel[e]
        score[g] = a + b
    keep = np.zeros(n_group, np.bool_)
    for _ in range(n_group_used):
        best = -1
        for g in range(n_group):
            if not keep[g] and (best < 0 or score[g] > score[best]):
                best = g
        keep[best] = True
    for g in range(n_group):
        if not keep[g]:
            for e in range(g * size, (g + 1) * size):
                sel[e] = -np.inf
